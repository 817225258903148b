"""The architecture plug-in type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


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
    remove through torch-pruning's DependencyGraph: for residual nets whose shortcuts the
    graph cannot follow (option-A padding shortcuts) only the inner convs of each block.
    ``protected(model)`` lists modules whose outputs must never shrink (the classifier).
    """

    name: str
    build: Callable[..., nn.Module]
    family: str  # "cifar" (small inputs) or "imagenet"
    input_size: int  # the resolution MACs are quoted at (32 for CIFAR, 224 for ImageNet)
    description: str
    prunable: Callable[[nn.Module], list[str]] = all_convs
    protected: Callable[[nn.Module], list[str]] = last_linear
    pruning_note: str = ""
