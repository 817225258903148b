"""The one surgery step every criterion shares, and the replayable plan it records.

Channels are removed through torch-pruning's DependencyGraph, so a conv losing output
channels also shrinks its BatchNorm and the input channels of every consumer. Prunable
convs that the graph couples (e.g. through a residual addition) form one *unit* and are
pruned together, with their scores summed (torch-pruning's group reduction).

A plan is a list of JSON-able steps applied in order to a freshly built architecture::

    {"op": "prune", "layer": "layer1.0.conv1", "keep": [0, 3, 4, ...]}
    {"op": "replace", "module": "layer2.1.conv1", "criterion": "ht2", "spec": {...}}

A compressed model is saved as (architecture, plan, state dict) and rebuilt from those
three, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from prunebench.errors import ConfigError, PluginError
from prunebench.graph import build_graph
from prunebench.storage.checkpoints import atomic_torch_save

__all__ = [
    "Unit", "build_graph", "load_compressed", "prune_kept", "pruning_units",
    "replay", "save_compressed", "set_module",
]

_OUT_FUNCS = {id(tp.prune_conv_out_channels.__func__), id(tp.prune_depthwise_conv_out_channels.__func__)}


def _is_conv_out(dep) -> bool:
    fn = getattr(dep.handler, "__func__", None)
    return fn is not None and id(fn) in _OUT_FUNCS


@dataclass(frozen=True)
class Unit:
    """Prunable convs whose output channels the dependency graph ties together."""

    root: str
    members: tuple[str, ...]
    channels: int


def pruning_units(model: nn.Module, example_inputs: Tensor, prunable: Sequence[str]) -> list[Unit]:
    """Group ``prunable`` convs into units; a unit is named after its first member in ``prunable``."""
    modules = dict(model.named_modules())
    missing = [n for n in prunable if n not in modules]
    if missing:
        raise PluginError(f"architecture declares prunable layers that do not exist: {missing[:5]}")
    graph = build_graph(model, example_inputs)
    names = {id(m): n for n, m in model.named_modules()}
    position = {n: i for i, n in reversed(list(enumerate(prunable)))}
    seen: set[str] = set()
    units = []
    for name in prunable:
        if name in seen:
            continue
        conv = modules[name]
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        members = [name]
        for dep, _ in group:
            other = names.get(id(dep.target.module))
            if other and other != name and other in position and _is_conv_out(dep):
                if modules[other].out_channels == conv.out_channels and other not in members:
                    members.append(other)
        members = [name, *sorted(members[1:], key=position.__getitem__)]  # in the architecture's order
        seen.update(members)
        units.append(Unit(root=name, members=tuple(members), channels=conv.out_channels))
    return units


def prune_kept(
    model: nn.Module, example_inputs: Tensor, kept: Mapping[str, Tensor | Sequence[int]]
) -> list[dict[str, Any]]:
    """Remove every output channel of each named conv that is not in ``kept[name]``.

    Works in place and returns the plan steps. Layers keeping all channels are skipped.
    Convs whose output channels the graph couples (one unit) lose their channels together:
    naming several members of one unit is allowed when they keep the same channels, and only
    the first one becomes a plan step.
    """
    graph = build_graph(model, example_inputs)
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    done: dict[str, tuple[str, list[int]]] = {}  # member -> (name it was pruned under, kept)
    steps = []
    for name, keep in kept.items():
        conv = modules[name]
        keep_list = sorted({int(i) for i in (keep.tolist() if isinstance(keep, Tensor) else keep)})
        if name in done:
            first, first_keep = done[name]
            if keep_list != first_keep:
                raise PluginError(
                    f"{name!r} and {first!r} share their output channels (one pruning unit) but the plan "
                    "keeps different channels of them; give one kept set per unit"
                )
            continue
        n = conv.out_channels
        if not keep_list:
            raise ConfigError(f"plan removes every channel of {name!r}; at least one must stay")
        if keep_list[-1] >= n or keep_list[0] < 0:
            raise PluginError(f"kept indices for {name!r} out of range 0..{n - 1}")
        removed = sorted(set(range(n)) - set(keep_list))
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=removed or [0])
        for dep, _ in group:
            other = names.get(id(dep.target.module))
            if other is not None and _is_conv_out(dep) and modules[other].out_channels == n:
                done.setdefault(other, (name, keep_list))
        if removed:
            if not graph.check_pruning_group(group):
                raise PluginError(f"torch-pruning refused to prune {name!r} (would remove all channels)")
            group.prune()
        steps.append({"op": "prune", "layer": name, "keep": keep_list, "channels": n})
    return steps


def set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _changed_by_batch(model: nn.Module, step: Mapping[str, Any]) -> bool:
    """The step was recorded on a layer of another width than it has now (``channels`` is recorded)."""
    if "channels" not in step:
        return False
    module = dict(model.named_modules()).get(step["layer"])
    return getattr(module, "out_channels", step["channels"]) != step["channels"]


def replay(model: nn.Module, example_inputs: Tensor, plan: Sequence[Mapping[str, Any]]) -> nn.Module:
    """Apply a recorded plan to a freshly built model (shapes only; weights come later)."""
    from prunebench import registry

    prune_batch: dict[str, list[int]] = {}

    def flush() -> None:
        if prune_batch:
            prune_kept(model, example_inputs, dict(prune_batch))
            prune_batch.clear()

    for step in plan:
        op = step.get("op")
        if op == "prune":
            # A layer pruned again later (iterative pruning), or one whose channels an earlier step
            # of the batch changes (another member of its unit, named in an earlier call): the
            # step's indices refer to the channels left after those steps, so apply them first.
            if step["layer"] in prune_batch or (prune_batch and _changed_by_batch(model, step)):
                flush()
            prune_batch[step["layer"]] = list(step["keep"])
        elif op == "replace":
            flush()
            crit = registry.criteria.get(step["criterion"])
            original = model.get_submodule(step["module"])
            set_module(model, step["module"], crit.rebuild_module(original, step["spec"]))
        else:
            raise PluginError(f"unknown plan step {op!r}")
    flush()
    return model


def compressed_payload(
    arch: str, arch_kwargs: Mapping[str, Any], plan: Sequence[Mapping[str, Any]], model: nn.Module,
    input_shape: Sequence[int], meta: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """(architecture, plan, state dict) as plain data — loadable with weights_only=True."""
    return {
        "format": FORMAT,
        "arch": arch,
        "arch_kwargs": json.dumps(dict(arch_kwargs)),
        "input_shape": list(input_shape),
        "plan": json.dumps(list(plan)),
        "meta": json.dumps(dict(meta or {})),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_compressed(
    path: Path, arch: str, arch_kwargs: Mapping[str, Any], plan: Sequence[Mapping[str, Any]],
    model: nn.Module, input_shape: Sequence[int], meta: Mapping[str, Any] | None = None,
) -> None:
    """Atomically write (architecture, plan, state dict) — loadable with weights_only=True."""
    atomic_torch_save(compressed_payload(arch, arch_kwargs, plan, model, input_shape, meta), path)


FORMAT = "prunebench-compressed/1"
_FIELDS = ("arch", "arch_kwargs", "input_shape", "plan", "meta", "state_dict")


def load_compressed(path: Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a compressed model from architecture + plan + state dict.

    Loads with ``weights_only=True``; a file that is not a prunebench compressed model (or is
    truncated, or whose plan or weights do not fit its architecture) raises a one-line
    :class:`~prunebench.errors.CheckpointError` naming it.
    """
    from prunebench import registry
    from prunebench.errors import CheckpointError
    from prunebench.storage import checkpoints

    what = "compressed model"
    payload = checkpoints.read(path, what)
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a prunebench compressed-model file (no format {FORMAT!r})")
    missing = [k for k in _FIELDS if k not in payload]
    if missing:
        raise CheckpointError(f"{what} {path} lacks {', '.join(missing)}")
    try:
        arch_kwargs = json.loads(payload["arch_kwargs"])
        plan = json.loads(payload["plan"])
        meta = json.loads(payload["meta"])
        shape = [int(v) for v in payload["input_shape"]]
        if not isinstance(arch_kwargs, dict) or not isinstance(plan, list) or len(shape) < 2:
            raise ValueError("arch_kwargs must be an object, plan a list, input_shape [N, C, ...]")
        if not isinstance(payload["arch"], str):
            raise ValueError(f"arch must be an architecture name, got a {type(payload['arch']).__name__}")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} has malformed fields ({exc})") from None
    arch = registry.architectures.get(payload["arch"])
    try:
        model = arch.build(**arch_kwargs)
        replay(model, torch.zeros(1, *shape[1:]), plan)
    except (ConfigError, PluginError, KeyError, IndexError, TypeError, ValueError, AttributeError,
            RuntimeError) as exc:
        raise CheckpointError(f"{what} {path}: its plan does not apply to {payload['arch']} "
                              f"({type(exc).__name__}: {exc})") from None
    checkpoints.load_state(model, path, what, payload={"state_dict": payload["state_dict"]})
    model.to(map_location)
    info = {"arch": payload["arch"], "plan": plan, "meta": meta}
    return model, info
