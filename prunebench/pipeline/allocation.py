"""From scores to a removal plan that meets the target (score criteria): per-unit rankings,
``uniform``, ``global`` and ``profile`` allocation, the bisections and the one-channel top-up."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from prunebench.config.validation import ALLOCATIONS
from prunebench.errors import ConfigError, PluginError, TargetMissedError, suggest
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.surgery import Unit
from prunebench.protocols import (
    ScoreCriterion,
)


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
