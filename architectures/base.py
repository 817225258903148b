"""The architecture plug-in type."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from prunebench.errors import ConfigError, PluginError, suggest
from prunebench.graph import register_pruners


def all_convs(model: nn.Module) -> list[str]:
    """Every Conv2d in the model (default for plain feed-forward nets)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def last_linear(model: nn.Module) -> list[str]:
    """The final Linear layer (the classifier), which must keep its outputs."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1:]


@dataclass(frozen=True)
class Architecture:
    """A registered architecture.

    ``build(num_classes, in_channels)`` returns a fresh, randomly initialised model.
    ``prunable(model)`` lists the convolutions whose *output* channels the harness may
    remove through torch-pruning's DependencyGraph in the architecture's default *scope*,
    named ``default_scope``; ``scopes`` adds other named scopes (``{name: layers function}``),
    chosen per run with ``--scope NAME``. For the option-A CIFAR ResNets the default scope
    ``inner`` is the first conv of each block, and ``all`` adds the stem and every block's
    second conv, whose channels the residual additions tie into one group per stage.
    ``protected(model)`` lists modules whose outputs must never shrink (the classifier).
    ``customized_pruners`` maps module types the dependency graph cannot see through to
    torch-pruning pruner factories (``tp.pruner.BasePruningFunc`` subclasses); they are
    registered with :mod:`prunebench.graph` when the architecture is created, so every graph
    prunebench builds handles those modules.
    """

    name: str
    build: Callable[..., nn.Module]
    family: str  # "cifar" (small inputs) or "imagenet"
    input_size: int  # the resolution MACs are quoted at (32 for CIFAR, 224 for ImageNet)
    description: str
    prunable: Callable[[nn.Module], list[str]] = all_convs
    protected: Callable[[nn.Module], list[str]] = last_linear
    pruning_note: str = ""
    default_scope: str = "default"
    scopes: Mapping[str, Callable[[nn.Module], list[str]]] = field(default_factory=dict)
    scope_notes: Mapping[str, str] = field(default_factory=dict)
    customized_pruners: Mapping[type, Callable[[], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_scope in self.scopes:
            raise PluginError(
                f"architecture {self.name!r}: scope {self.default_scope!r} is the default scope "
                "(`prunable`) and must not be listed again in `scopes`"
            )
        if self.customized_pruners:
            register_pruners(self.customized_pruners, owner=f"architecture {self.name!r}")

    def scope_names(self) -> list[str]:
        """The scopes ``--scope`` accepts, the default first."""
        return [self.default_scope, *self.scopes]

    def resolve_scope(self, scope: str | None) -> str:
        """``scope`` checked against this architecture's scopes (``None``: the default)."""
        if scope is None or scope == self.default_scope:
            return self.default_scope
        if scope not in self.scopes:
            names = self.scope_names()
            raise ConfigError(
                f"architecture {self.name!r} has no scope {scope!r}.{suggest(scope, names)} "
                f"Available: {', '.join(names)}"
            )
        return scope

    def prunable_layers(self, model: nn.Module, scope: str | None = None) -> list[str]:
        """The prunable convs of ``model`` in ``scope`` (default: the default scope)."""
        name = self.resolve_scope(scope)
        return self.prunable(model) if name == self.default_scope else self.scopes[name](model)
