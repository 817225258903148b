"""The dependency graph every structural edit of prunebench goes through.

torch-pruning's :class:`~torch_pruning.DependencyGraph` follows convolutions, linear layers,
normalisations and element-wise operations on its own. A module it cannot see through (a
parameter-free shortcut that pads channels, for instance) needs a *customized pruner*: a
:class:`torch_pruning.pruner.BasePruningFunc` that says how the module's input and output
channels shrink. An architecture declares those for its own module types
(``Architecture(customized_pruners={MyModule: MyPruner})``); declaring them registers them
here, and :func:`build_graph` hands every registered pruner whose module type occurs in the
model to torch-pruning. Surgery, the cost model, compensation and the criteria that walk the
graph all call :func:`build_graph`, so they all see the same graph.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from prunebench.errors import PluginError

__all__ = ["build_graph", "customized_pruners", "register_pruners"]

PrunerFactory = Callable[[], Any]

_PRUNERS: dict[type, PrunerFactory] = {}


def register_pruners(pruners: Mapping[type, PrunerFactory], owner: str = "") -> None:
    """Make ``{module type: pruner factory}`` known to every graph :func:`build_graph` builds.

    A factory is called once per graph (a pruner class is a factory). Registering the same
    factory again is a no-op; a different factory for a type already registered is a
    :class:`PluginError`, since two architectures would then disagree on how it prunes.
    """
    for module_type, factory in pruners.items():
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise PluginError(f"{owner or 'customized_pruners'}: key {module_type!r} is not an nn.Module type")
        if not callable(factory):
            raise PluginError(f"{owner or 'customized_pruners'}: pruner for {module_type.__name__} is not callable")
        known = _PRUNERS.get(module_type)
        if known is not None and known is not factory:
            raise PluginError(
                f"{owner or 'customized_pruners'}: a different pruner is already registered for "
                f"{module_type.__qualname__} ({known!r})"
            )
        _PRUNERS[module_type] = factory


def customized_pruners(model: nn.Module) -> dict[type, Any]:
    """Fresh pruner instances for the registered module types that occur in ``model``."""
    present = {type(m) for m in model.modules()}
    return {t: factory() for t, factory in _PRUNERS.items() if t in present}


def build_graph(model: nn.Module, example_inputs: Tensor) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of ``model``, with the registered customized pruners.

    Tracing needs autograd and leaves the model in eval mode (torch-pruning's behaviour); the
    model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs, customized_pruners=customized_pruners(model)
            )
    finally:
        model.train(was_training)
