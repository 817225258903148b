"""Measuring what a compression achieves: the reduction of MACs or params of a pruned or
transformed copy, counted against the baseline, never estimated."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from prunebench.pipeline.costmodel import ChannelCost
from prunebench.pipeline.surgery import Unit, prune_kept, pruning_units
from prunebench.protocols import (
    Target,
)


class Meter:
    """Measures the reduction of the target metric relative to a fixed baseline."""

    def __init__(self, baseline: nn.Module, example_inputs: Tensor, target: Target) -> None:
        from prunebench.pipeline.metrics import count_macs, count_params

        self.example_inputs = example_inputs
        self.target = target
        self._count: Callable[[nn.Module], int] = (
            (lambda m: count_macs(m, example_inputs)) if target.metric == "macs" else count_params
        )
        self.base = self._count(baseline)
        self.evaluations = 0
        self._cached_for: tuple | None = None
        self._cost: ChannelCost | None = None

    def reduction(self, model: nn.Module) -> float:
        self.evaluations += 1
        return 1.0 - self._count(model) / self.base

    def reduction_of(self, model: nn.Module, kept: Mapping[str, Tensor | Sequence[int]]) -> float:
        """Reduction if ``model`` kept these channels (exact cost model when it validates)."""
        signature = (id(model), sum(p.numel() for p in model.parameters()), tuple(sorted(kept)))
        if self._cached_for != signature:
            self._cached_for = signature
            self._cost = self.cost_model(model, pruning_units(model, self.example_inputs, list(kept)))
        if self._cost is not None:
            counts = {r: len(kept[r]) for r in self._cost.units if r in kept}
            return self.reduction_from_cost(self._cost, counts)
        clone = copy.deepcopy(model)
        prune_kept(clone, self.example_inputs, kept)
        return self.reduction(clone)

    def cost_model(self, model: nn.Module, units: Sequence[Unit]) -> ChannelCost | None:
        cost = ChannelCost(model, self.example_inputs, units, self.target.metric)
        return cost if cost.validate(model, self.example_inputs, self._count) else None

    def reduction_from_cost(self, cost: ChannelCost, kept_counts: Mapping[str, int]) -> float:
        self.evaluations += 1
        return 1.0 - cost.value(kept_counts) / self.base

    def within(self, achieved: float) -> bool:
        return abs(achieved - self.target.ratio) <= self.target.tolerance + 1e-12
