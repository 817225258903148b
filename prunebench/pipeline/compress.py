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

import bisect
import contextlib
import copy
import dataclasses
import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from prunebench.errors import ConfigError, PluginError, TargetMissedError, suggest
from prunebench.pipeline.costmodel import ChannelCost
from prunebench.pipeline.surgery import Unit, prune_kept, pruning_units
from prunebench.protocols import (
    AllocateCriterion,
    CompressionContext,
    Criterion,
    ScoreCriterion,
    Target,
    TrainingHooks,
    TransformCriterion,
)
from prunebench.storage.checkpoints import weights_sha256

ALLOCATIONS = ("uniform", "global", "profile")


@dataclass
class Compressed:
    model: nn.Module
    plan: list[dict[str, Any]]
    achieved: float
    knob: dict[str, Any] = field(default_factory=dict)
    search_evaluations: int = 0


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


# --- score criteria ----------------------------------------------------------------------


def unit_scores(
    criterion: ScoreCriterion, model: nn.Module, units: Sequence[Unit], calibration
) -> dict[str, Tensor]:
    layers = [m for u in units for m in u.members]
    modules = dict(model.named_modules())
    raw = criterion.scores(model, layers, calibration)
    out = {}
    for u in units:
        total = torch.zeros(u.channels, dtype=torch.float64)
        for m in u.members:
            if m not in raw:
                raise PluginError(f"criterion {criterion.name!r} returned no scores for layer {m!r}")
            s = torch.as_tensor(raw[m]).detach().to("cpu", torch.float64).flatten()
            n = modules[m].out_channels
            if s.numel() != n:
                raise PluginError(
                    f"criterion {criterion.name!r} returned {s.numel()} scores for {m!r}, "
                    f"which has {n} output channels"
                )
            if not torch.isfinite(s).all():
                raise PluginError(f"criterion {criterion.name!r} returned non-finite scores for {m!r}")
            total += s
        out[u.root] = total
    return out


def _normalised(scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-layer mean normalisation (torch-pruning's default), so layers can be ranked together."""
    out = {}
    for k, s in scores.items():
        shifted = s - s.min() + 1e-12  # scores may be negative (e.g. -distance)
        out[k] = shifted / shifted.mean()
    return out


def _order(scores: Tensor, seed: int) -> Tensor:
    """Channel indices from least to most important; ties broken by a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(scores.numel(), generator=g)
    order = torch.argsort(scores[perm], stable=True)
    return perm[order]


def _keep_from_removed(order: Tensor, n_removed: int) -> Tensor:
    return torch.sort(order[n_removed:]).values


def _min_keep(channels: int, max_ratio: float) -> int:
    return max(1, channels - math.floor(max_ratio * channels))


def unit_profile(
    profile: Mapping[str, float], units: Sequence[Unit], model: nn.Module
) -> tuple[dict[str, float], list[str]]:
    """Per-unit ratios from a per-layer profile ``{layer: ratio}``.

    A layer may be any member of a unit (a residual group's convs all name the same unit);
    members of one unit must agree on the ratio. Layers of the model that the run's scope
    does not prune are left out and returned, so a profile written for a wider scope
    (residual layers included) also drives a narrower one. A name that is no module of the
    model is a :class:`ConfigError`.
    """
    root_of = {m: u.root for u in units for m in u.members}
    modules = dict(model.named_modules())
    ratios: dict[str, float] = {}
    given_by: dict[str, str] = {}
    ignored: list[str] = []
    for layer, ratio in profile.items():
        if layer not in root_of:
            if layer in modules:
                ignored.append(layer)
                continue
            raise ConfigError(
                f"layer-ratio profile names {layer!r}, which is not a layer of the model."
                f"{suggest(layer, root_of)} Prunable: {', '.join(list(root_of)[:8])}..."
            )
        root = root_of[layer]
        if root in ratios and abs(ratios[root] - float(ratio)) > 1e-12:
            raise ConfigError(
                f"layer-ratio profile gives {given_by[root]!r} ratio {ratios[root]:g} and {layer!r} ratio "
                f"{float(ratio):g}, but they share their output channels (one pruning unit): give them one ratio"
            )
        ratios[root] = float(ratio)
        given_by.setdefault(root, layer)
    return ratios, ignored


def removable_counts(channels: int, cap: int, round_to: int | None) -> list[int]:
    """The numbers of channels a unit of ``channels`` may lose (at most ``cap``): any, or with
    ``round_to`` N only those that keep a multiple of N channels (torch-pruning's ``round_to``:
    hardware runs such widths faster). A unit narrower than N keeps all its channels."""
    if not round_to or round_to <= 1:
        return list(range(cap + 1))
    return [r for r in range(cap + 1) if r == 0 or (channels - r) % round_to == 0]


def plan_scores(
    units: Sequence[Unit], scores: Mapping[str, Tensor], meter: Meter, model: nn.Module,
    allocation: str, max_ratio: float, seed: int, profile: Mapping[str, float] | None = None,
    round_to: int | None = None,
) -> dict[str, Tensor]:
    """Choose kept channels per unit so the reduction lands within the target's tolerance
    (with ``round_to`` N, every unit keeps a multiple of N channels, or all of them)."""
    orders = {u.root: _order(scores[u.root], seed) for u in units}
    caps = {u.root: u.channels - _min_keep(u.channels, max_ratio) for u in units}
    allowed = {u.root: removable_counts(u.channels, caps[u.root], round_to) for u in units}
    target = meter.target

    def snap(root: str, removed: int) -> int:
        """The largest allowed count not above ``removed`` (rounding the kept width up)."""
        options = allowed[root]
        return options[max(0, bisect.bisect_right(options, removed) - 1)]

    def kept_from_counts(counts: Mapping[str, int]) -> dict[str, Tensor]:
        return {r: _keep_from_removed(orders[r], c) for r, c in counts.items()}

    cost = meter.cost_model(model, units)
    channels = {u.root: u.channels for u in units}

    def measure(counts: Mapping[str, int]) -> float:
        if cost is not None:
            return meter.reduction_from_cost(cost, {r: channels[r] - c for r, c in counts.items()})
        return meter.reduction_of(model, kept_from_counts(counts))

    if allocation == "global":
        norm = _normalised(scores)
        # global order of (score, unit, position) over removable channels
        entries = []
        for u in units:
            o = orders[u.root]
            for pos in range(caps[u.root]):
                entries.append((float(norm[u.root][o[pos]]), u.root))
        entries.sort(key=lambda e: e[0])

        def counts_at(k: int) -> dict[str, int]:
            counts = {u.root: 0 for u in units}
            for _, root in entries[:k]:
                counts[root] += 1
            return {r: snap(r, c) for r, c in counts.items()}

        k = _bisect_int(lambda k: measure(counts_at(k)), 0, len(entries), target.ratio)
        counts = counts_at(k)
        return _settle(counts, measure, meter, entries_order=[r for _, r in entries], caps=caps, kept=kept_from_counts,
                       allowed=allowed)

    if allocation in ("uniform", "profile"):
        if allocation == "profile":
            if not profile:
                raise ConfigError("allocation 'profile' needs per-layer ratios (--layer-ratios FILE)")
            unknown = [k for k in profile if k not in orders]
            if unknown:
                raise ConfigError(
                    f"layer-ratio profile names layers that are not prunable units: {unknown[:5]}. "
                    f"Prunable: {', '.join(list(orders)[:8])}..."
                )
            base = {u.root: float(profile.get(u.root, 0.0)) for u in units}
            peak = max(base.values()) or 1.0
            hi = max_ratio / peak
        else:
            base = {u.root: 1.0 for u in units}
            hi = max_ratio

        def counts_at_ratio(p: float) -> dict[str, int]:
            return {
                u.root: snap(u.root, min(caps[u.root], int(round(min(max_ratio, p * base[u.root]) * u.channels))))
                for u in units
            }

        p = _bisect_float(lambda p: measure(counts_at_ratio(p)), 0.0, hi, target.ratio)
        counts = counts_at_ratio(p)
        norm = _normalised(scores)
        # top-up order: next channel to remove in each unit, cheapest normalised score first
        return _settle(counts, measure, meter, caps=caps, kept=kept_from_counts, norm=norm, orders=orders,
                       allowed=allowed)

    raise ConfigError(f"unknown allocation {allocation!r}. Available: {', '.join(ALLOCATIONS)}")


def _settle(counts, measure, meter, caps, kept, entries_order=None, norm=None, orders=None, allowed=None):
    """Move single channels (with ``allowed`` counts per unit: to the next allowed count)
    until the achieved reduction is within tolerance.

    Each unit's marginal effect of one channel is measured once (and refreshed for the unit
    that moves); among the moves that do not jump across the tolerance band, the one the
    scores prefer is taken: the least important next channel when more must go, the most
    important removed channel when some must come back.
    """
    counts = dict(counts)
    target = meter.target
    lo_band, hi_band = target.ratio - target.tolerance, target.ratio + target.tolerance
    achieved = measure(counts)
    if meter.within(achieved):
        return kept(counts)
    rank = {r: i for i, r in enumerate(dict.fromkeys(entries_order or []))}

    def next_score(r: str) -> float:  # importance of the next channel unit r would lose
        return float(norm[r][orders[r][counts[r]]]) if norm is not None else float(rank.get(r, 0))

    def last_score(r: str) -> float:  # importance of the last channel unit r lost
        return float(norm[r][orders[r][counts[r] - 1]]) if norm is not None else float(rank.get(r, 0))

    def moved(r: str, sign: int) -> int | None:
        """Unit r's count one step up (sign 1) or down (-1), or None at the end."""
        if allowed is None:
            c = counts[r] + sign
            return c if 0 <= c <= caps[r] else None
        options = allowed[r]
        i = bisect.bisect_left(options, counts[r])
        j = i + 1 if sign > 0 else i - 1
        return options[j] if 0 <= j < len(options) else None

    def step_effect(r: str, sign: int) -> float:
        trial = dict(counts)
        trial[r] = moved(r, sign)
        return measure(trial) - achieved

    effects: dict[tuple[str, int], float] = {}
    for _ in range(10_000):
        if meter.within(achieved):
            return kept(counts)
        sign = 1 if achieved < target.ratio else -1
        if sign > 0:
            candidates = sorted((r for r in counts if moved(r, 1) is not None), key=next_score)
        else:
            candidates = sorted((r for r in counts if moved(r, -1) is not None), key=last_score, reverse=True)
        choice = None
        for r in candidates:
            if (r, sign) not in effects:
                effects[(r, sign)] = step_effect(r, sign)
            new = achieved + effects[(r, sign)]
            if (sign > 0 and new <= hi_band) or (sign < 0 and new >= lo_band):
                choice = r
                break
        if choice is None:
            break
        counts[choice] = moved(choice, sign)
        before = achieved
        achieved = measure(counts)
        effects[(choice, sign)] = achieved - before
        effects.pop((choice, -sign), None)
    raise TargetMissedError(
        f"could not reach a {target.metric} reduction of {target.ratio:.1%} ± {target.tolerance:.1%}: "
        f"closest {achieved:.2%}. The architecture's prunable layers may not allow it "
        "(see `prunebench info --arch`), or raise --max-layer-ratio."
    )


def _bisect_float(f: Callable[[float], float], lo: float, hi: float, target: float, iters: int = 25) -> float:
    if f(hi) < target:
        return hi
    for _ in range(iters):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return lo


def _bisect_int(f: Callable[[int], float], lo: int, hi: int, target: float) -> int:
    """Largest k in [lo, hi] with f(k) <= target (f non-decreasing)."""
    if f(hi) <= target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if f(mid) <= target:
            lo = mid
        else:
            hi = mid
    return lo


def check_hooks(name: str, hooks: TrainingHooks | None) -> None:
    """Reject hook objects with public methods the engine would never call (typos)."""
    if hooks is None:
        return
    if not isinstance(hooks, TrainingHooks):
        raise PluginError(f"criterion {name!r}: training_hooks() must return a TrainingHooks, got {hooks!r}")
    known = {n for n in dir(TrainingHooks) if not n.startswith("_")}
    for attr in dir(type(hooks)):
        if attr.startswith("_") or attr in known or not callable(getattr(type(hooks), attr)):
            continue
        close = difflib.get_close_matches(attr, known, n=1, cutoff=0.75)
        if close:
            raise PluginError(
                f"criterion {name!r}: hook method {attr!r} is not a training hook and would never be "
                f"called. Did you mean {close[0]!r}? Hooks: {', '.join(sorted(known))}"
            )


# --- the ledger's guard ---------------------------------------------------------------------


def _state_digest(model: nn.Module) -> str:
    return weights_sha256(model.state_dict())


class LedgerGuard:
    """Holds a criterion to the ledger while it compresses (docs/guarantees.md):

    * an optimizer step outside ``ctx.train`` (the ledger's training) fails the run;
    * a score criterion's ``scores()`` (and a transform criterion's set-up and trial
      transforms of copies) must leave the model's parameters and buffers as they were;
    * the calibration data handed to the criterion is read-only: a write to it fails the run.
    """

    def __init__(self, criterion: Criterion, ctx: CompressionContext) -> None:
        self.name = criterion.name or type(criterion).__name__
        self.calibration = ctx.calibration
        self.calibration_digest = self._calibration_digest()
        self.calibration_versions = self._calibration_versions()
        self.training = 0
        self.violation: str | None = None

    def _calibration_digest(self) -> str | None:
        c = self.calibration
        return None if c is None else weights_sha256({"images": c.images, "labels": c.labels})

    def _calibration_versions(self) -> tuple[int, int] | None:
        """torch's counters of in-place writes to the calibration tensors (and their views): cheap
        to read after every call; the full digest is compared once, when compression ends."""
        c = self.calibration
        return None if c is None else (c.images._version, c.labels._version)

    def _check_calibration(self, where: str, full: bool = False) -> None:
        changed = self._calibration_versions() != self.calibration_versions or (
            full and self._calibration_digest() != self.calibration_digest)
        if changed:
            raise PluginError(f"criterion {self.name!r} wrote to the calibration data in {where}; "
                              "they are read-only (copy them to change them)")

    def train(self, train: Callable[..., None]) -> Callable[..., None]:
        """``ctx.train`` as the criterion sees it: the one place where optimizer steps are allowed."""
        def ledger_train(*args: Any, **kwargs: Any) -> None:
            self.training += 1
            try:
                train(*args, **kwargs)
            finally:
                self.training -= 1
        return ledger_train

    def _step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.training == 0:
            self.violation = (f"criterion {self.name!r} took an optimizer step outside the ledger's training; "
                              "training during compression must go through ctx.train, which charges its epochs")
            raise PluginError(self.violation)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handle = register_optimizer_step_pre_hook(self._step_hook)
        try:
            yield
        finally:
            handle.remove()
        self._raise_violation()
        self._check_calibration("compression", full=True)

    def _raise_violation(self) -> None:
        if self.violation is not None:  # also when the criterion caught the error itself
            raise PluginError(self.violation)

    @contextlib.contextmanager
    def call(self, where: str, unchanged: nn.Module | None = None) -> Iterator[None]:
        """A call into the criterion: afterwards no optimizer step was taken outside the ledger,
        the calibration data are as they were, and so is ``unchanged`` (when given)."""
        before = None if unchanged is None else _state_digest(unchanged)
        yield
        self._raise_violation()
        self._check_calibration(where)
        if unchanged is not None and _state_digest(unchanged) != before:
            raise PluginError(f"criterion {self.name!r} changed the model's parameters or buffers in {where}, "
                              "outside the ledger's training (ctx.train); it must not modify the model there")


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

