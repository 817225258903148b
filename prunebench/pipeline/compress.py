"""The compress stage: every criterion kind meets the same target the same way.

* score criteria: scores → per-unit ranking → a removal plan, chosen so the achieved
  reduction is within the target's tolerance. ``uniform`` allocation bisects one
  per-layer ratio, then tops up one channel at a time (lowest normalised score first)
  because rounding makes per-layer ratios jump by more than a percentage point;
  ``global`` allocation ranks all channels by per-layer mean-normalised score and bisects
  the number removed; ``profile`` scales user-given per-layer ratios by one bisected factor.
* allocate criteria decide the plan themselves; the harness verifies it.
* transform criteria expose a knob that the harness bisects.

Reductions are always measured by pruning/transforming a copy and counting, never estimated.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prunebench.errors import ConfigError, PluginError, TargetMissedError
from prunebench.pipeline.allocation import (
    plan_scores,
    unit_profile,
    unit_scores,
)
from prunebench.pipeline.guard import LedgerGuard, check_hooks
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.surgery import prune_kept, pruning_units
from prunebench.protocols import (
    AllocateCriterion,
    CompressionContext,
    Criterion,
    ScoreCriterion,
    TransformCriterion,
)


@dataclass
class Compressed:
    model: nn.Module
    plan: list[dict[str, Any]]
    achieved: float
    knob: dict[str, Any] = field(default_factory=dict)
    search_evaluations: int = 0


# --- score criteria ----------------------------------------------------------------------


# --- the ledger's guard ---------------------------------------------------------------------


# --- the stage ---------------------------------------------------------------------------


def compress(
    criterion: Criterion, model: nn.Module, ctx: CompressionContext, meter: Meter,
    allocation: str = "uniform", max_ratio: float = 0.9, profile: Mapping[str, float] | None = None,
    shots: int = 1, shot_epochs: float = 0.0, round_to: int | None = None,
) -> Compressed:
    """Compress ``model`` in place with ``criterion`` until ``ctx.target`` is met.

    Score criteria may prune iteratively (``shots`` > 1, the K-shot mode of CORING): each
    shot re-scores the current model and removes up to ``shot/shots`` of the target, with
    ``shot_epochs`` of training between shots drawn from the ledger. The criterion is held
    to the ledger throughout (:class:`LedgerGuard`).
    """
    guard = LedgerGuard(criterion, ctx)
    ctx = dataclasses.replace(ctx, train=guard.train(ctx.train))
    with guard.active():
        return _compress(criterion, model, ctx, meter, guard, allocation, max_ratio, profile, shots, shot_epochs,
                         round_to)


def _compress(
    criterion: Criterion, model: nn.Module, ctx: CompressionContext, meter: Meter, guard: LedgerGuard,
    allocation: str, max_ratio: float, profile: Mapping[str, float] | None, shots: int, shot_epochs: float,
    round_to: int | None = None,
) -> Compressed:
    if isinstance(criterion, ScoreCriterion):
        if shots < 1:
            raise ConfigError(f"--shots must be at least 1, got {shots}")
        full_target = ctx.target
        plan: list[dict[str, Any]] = []
        ignored: list[str] = []
        for shot in range(1, shots + 1):
            # shot i removes up to i/K of the target reduction (relative to the baseline)
            meter.target = dataclasses.replace(full_target, ratio=full_target.ratio * shot / shots)
            units = pruning_units(model, ctx.example_inputs, ctx.prunable)
            per_unit = None
            if profile is not None and allocation == "profile":
                per_unit, ignored = unit_profile(profile, units, model)
                if ignored and shot == 1:
                    ctx.log(f"layer-ratio profile: {len(ignored)} layer(s) outside the pruned scope ignored: "
                            f"{', '.join(ignored[:6])}{'...' if len(ignored) > 6 else ''}")
            with guard.call("scores()", unchanged=model):
                scores = unit_scores(criterion, model, units, ctx.calibration)
            kept = plan_scores(units, scores, meter, model, allocation, max_ratio, ctx.seed + shot, per_unit,
                               round_to=round_to)
            removal = {}
            for u in units:
                removed = sorted(set(range(u.channels)) - set(kept[u.root].tolist()))
                for m in u.members:
                    removal[m] = torch.tensor(removed, dtype=torch.long)
            with guard.call("compensate()"):  # may edit the model: that is what it is for
                criterion.compensate(model, removal, ctx.calibration)
            plan += prune_kept(model, ctx.example_inputs, kept)
            if shot < shots and shot_epochs > 0:
                ctx.train(model, shot_epochs, purpose="k-shot")
        meter.target = full_target
        achieved = meter.reduction(model)
        knob = {"allocation": allocation, **({"shots": shots, "shot_epochs": shot_epochs} if shots > 1 else {}),
                **({"round_to": round_to} if round_to and round_to > 1 else {})}
        if ignored:
            knob["profile_ignored"] = ignored
        return Compressed(model, plan, achieved, knob, meter.evaluations)

    if isinstance(criterion, AllocateCriterion):
        with guard.call("allocate()"):  # may edit weights (compensation) and train through ctx.train
            kept = criterion.allocate(model, ctx)
        unknown = [n for n in kept if n not in set(ctx.prunable)]
        if unknown:
            raise PluginError(f"criterion {criterion.name!r} allocated non-prunable layers: {unknown[:5]}")
        plan = prune_kept(model, ctx.example_inputs, kept)
        achieved = meter.reduction(model)
        if not meter.within(achieved):
            raise TargetMissedError(
                f"criterion {criterion.name!r} reached {achieved:.2%} {ctx.target.metric} reduction, "
                f"outside {ctx.target.ratio:.1%} ± {ctx.target.tolerance:.1%}"
            )
        return Compressed(model, plan, achieved, {}, meter.evaluations)

    if isinstance(criterion, TransformCriterion):
        with guard.call("training_epochs()", unchanged=model):
            epochs = criterion.training_epochs(ctx)
        if epochs > 0:
            with guard.call("training_hooks()"):  # may project the weights: the hooked training's first step
                hooks = criterion.training_hooks(model, ctx)
            check_hooks(criterion.name, hooks)
            ctx.train(model, epochs, hooks=hooks, purpose=criterion.name)
        knob = criterion.knob

        def reduction_at(v: float) -> float:
            clone = copy.deepcopy(model)
            with guard.call("transform() of a trial copy"):
                criterion.transform(clone, v, ctx)
            r = meter.reduction(clone)
            return r if knob.increases_compression else -r

        # bisect in the direction where larger means more compression
        lo, hi = knob.low, knob.high
        tgt = ctx.target.ratio if knob.increases_compression else -ctx.target.ratio
        best_v, best_r = None, None
        with guard.call("transform() of trial copies", unchanged=model):  # the model itself stays as it is
            for _ in range(30):
                mid = (lo + hi) / 2
                r = reduction_at(mid)
                true_r = r if knob.increases_compression else -r
                if best_r is None or abs(true_r - ctx.target.ratio) < abs(best_r - ctx.target.ratio):
                    best_v, best_r = mid, true_r
                if meter.within(true_r):
                    break
                if r < tgt:
                    lo = mid
                else:
                    hi = mid
        assert best_v is not None and best_r is not None
        if not meter.within(best_r):
            raise TargetMissedError(
                f"{criterion.name}: no {knob.name} in [{knob.low}, {knob.high}] gives "
                f"{ctx.target.ratio:.1%} ± {ctx.target.tolerance:.1%} {ctx.target.metric} reduction; "
                f"closest {best_r:.2%} at {knob.name}={best_v:.4f}"
            )
        with guard.call("transform()"):
            plan = criterion.transform(model, best_v, ctx)
        achieved = meter.reduction(model)
        return Compressed(model, list(plan), achieved, {knob.name: best_v}, meter.evaluations)

    raise PluginError(f"criterion {criterion!r} has no known kind")

