"""Does the ranking hold? The ranks of one target's rows at several training budgets.

A ranking made after 0.25 epoch of fine-tuning is one operating point (Blalock et al.,
MLSys 2020, ask for several). For each target the page ranks the rows that every stage
has — after one-shot + BN re-estimation (0 epochs), and after each budget's fine-tune — and
gives Kendall's τ-b between each pair of rankings with a percentile bootstrap interval over
seeds: each replicate resamples, for every row and budget, that row's seeds with
replacement (stages of one budget share the draw, since they are the same runs), recomputes
the means, the ranks and τ. The bootstrap is seeded, so pages regenerate byte for byte.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

#: replicates of the bootstrap over seeds
BOOTSTRAP = 2000
#: a row that moves by this many places or more between two stages is named on the page
MOVE = 3


@dataclass(frozen=True)
class Stage:
    """One ranking: a budget's runs, read at one point (``oneshot_bn`` or ``final``)."""

    name: str
    budget: str
    column: str


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b of two score vectors over the same items (NaN when undefined)."""
    from scipy import stats

    if len(x) < 2:
        return float("nan")
    return float(stats.kendalltau(list(x), list(y)).statistic)


def ranks(values: Sequence[float]) -> list[int]:
    """Rank 1 for the highest value; ties share the better rank."""
    order = sorted(values, reverse=True)
    return [order.index(v) + 1 for v in values]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def bootstrap_tau(samples: Mapping[str, Sequence[Mapping[int, float]]], stages: tuple[Stage, Stage],
                  n: int = BOOTSTRAP, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of τ between two stages.

    ``samples[stage.name][i]`` maps seed → value for row ``i``; rows are in the same order in
    every stage. Stages with the same budget are resampled with the same seeds (paired).
    """
    rng = random.Random(seed)
    rows = len(samples[stages[0].name])
    seeds_of = {}  # budget → per row, the seeds both stages of that budget have
    for b in {s.budget for s in stages}:
        mine = [s for s in stages if s.budget == b]
        seeds_of[b] = [sorted(set.intersection(*[set(samples[s.name][i]) for s in mine])) for i in range(rows)]
    budgets = sorted(seeds_of)
    taus = []
    for _ in range(n):
        draw = {b: [[ss[int(rng.random() * len(ss))] for _ in ss] for ss in seeds_of[b]] for b in budgets}
        means = [[_mean([samples[s.name][i][k] for k in draw[s.budget][i]]) for i in range(rows)] for s in stages]
        tau = kendall_tau(means[0], means[1])
        if not math.isnan(tau):
            taus.append(tau)
    if not taus:
        return float("nan"), float("nan")
    taus.sort()
    lo = taus[int(math.floor((1 - level) / 2 * (len(taus) - 1)))]
    hi = taus[int(math.ceil((1 + level) / 2 * (len(taus) - 1)))]
    return lo, hi


@dataclass(frozen=True)
class Holding:
    """The section's numbers for one target."""

    stages: list[Stage]
    configs: list[str]  # the rows every stage has, in a fixed order
    means: dict[str, list[float]]  # stage name → mean per row
    taus: list[tuple[Stage, Stage, float, float, float]]  # (a, b, τ, low, high)


def stages_for(target_rows: pd.DataFrame, budget_epochs: Mapping[str, float]) -> list[Stage]:
    """0 epochs (one-shot + BN, from the budget with the most runs), then each budget's final
    top-1 in order of its fine-tune epochs."""
    budgets = sorted(target_rows["budget"].unique(), key=lambda b: (budget_epochs.get(b, math.inf), b))
    if len(budgets) < 2:
        return []
    counts = target_rows.groupby("budget").size()
    most = max(budgets, key=lambda b: (counts[b], -budget_epochs.get(b, math.inf)))
    out = [Stage("0 ep (one-shot + BN)", most, "oneshot_bn")]
    out += [Stage(f"{budget_epochs[b]:g} ep (`{b}`)" if b in budget_epochs else f"`{b}`", b, "final")
            for b in budgets]
    return out


def holding(target_rows: pd.DataFrame, budget_epochs: Mapping[str, float], n: int = BOOTSTRAP) -> Holding | None:
    """Ranks and τ for one target's rows (dense controls excluded); None when fewer than two
    budgets or three shared rows."""
    stages = stages_for(target_rows, budget_epochs)
    if not stages:
        return None
    per_stage: dict[str, dict[str, dict[int, float]]] = {}
    for s in stages:
        part = target_rows[target_rows["budget"] == s.budget]
        per_stage[s.name] = {c: {int(k): float(v) for k, v in zip(g["seed"], g[s.column], strict=True)
                                 if not pd.isna(v)} for c, g in part.groupby("config", sort=True)}
    configs = sorted(set.intersection(*[{c for c, v in d.items() if v} for d in per_stage.values()]))
    if len(configs) < 3:
        return None
    samples = {s.name: [per_stage[s.name][c] for c in configs] for s in stages}
    means = {s.name: [_mean(list(d.values())) for d in samples[s.name]] for s in stages}
    taus = []
    for i in range(len(stages)):
        for j in range(i + 1, len(stages)):
            a, b = stages[i], stages[j]
            lo, hi = bootstrap_tau(samples, (a, b), n=n)
            taus.append((a, b, kendall_tau(means[a.name], means[b.name]), lo, hi))
    return Holding(stages, configs, means, taus)
