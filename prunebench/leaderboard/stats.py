"""The statistics of a leaderboard page: does a row beat the ``random`` control beyond the
seed noise, how sure is its mean, and which rows differ from which.

The test is Welch's unequal-variance t-test (Welch, Biometrika 1947) on final top-1 over
seeds, one-sided: H1 = the row's mean is higher than ``random``'s at the same target, budget
and protocol options. The p-values of all rows tested on a page form one family and are
Holm-adjusted; a row "beats random" when its adjusted p < :data:`ALPHA`. With one seed on
either side nothing is tested — the verdict says so and never reads as a yes. Rows also get
a 95 % Student-t interval of their mean, and each table a pairwise comparison (two-sided
Welch, Holm over the table's pairs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ALPHA = 0.05
TEST_NAME = "Welch's t-test, one-sided, on final top-1 over seeds"


@dataclass(frozen=True)
class Verdict:
    """Outcome of comparing one row with the random control."""

    text: str  # as shown in the table
    p: float | None = None


def _clean(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def welch_greater(a: Sequence[float], b: Sequence[float]) -> float | None:
    """One-sided p-value of Welch's t-test for mean(a) > mean(b); None when it is undefined
    (fewer than two values on a side, or no spread on either side)."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    if len(a) < 2 or len(b) < 2:
        return None
    if len(set(a)) == 1 and len(set(b)) == 1:  # no spread on either side: t is undefined
        return None
    return float(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue)


def versus_random(row: Sequence[float], random: Sequence[float] | None) -> Verdict:
    """The table cell saying whether ``row`` (final top-1 per seed) beats ``random``."""
    if random is None:
        return Verdict("no random control")
    n_row, n_rand = len(_clean(row)), len(_clean(random))
    if n_row < 2 or n_rand < 2:
        return Verdict(f"not tested ({min(n_row, n_rand)} seed{'s' if min(n_row, n_rand) != 1 else ''})")
    p = welch_greater(row, random)
    if p is None:
        return Verdict("not tested (no spread)")
    return Verdict(f"{'yes' if p < ALPHA else 'no'} (p={p:.3f})", p)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided Student-t confidence interval of the mean over seeds; None with fewer than two
    finite values (or a non-finite one, which voids the row)."""
    from scipy import stats

    vals = [float(v) for v in values]
    if len(vals) < 2 or any(not math.isfinite(v) for v in vals):
        return None
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def welch_two_sided(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None when undefined (as :func:`welch_greater`)."""
    from scipy import stats

    a, b = _clean(a), _clean(b)
    if len(a) < 2 or len(b) < 2 or (len(set(a)) == 1 and len(set(b)) == 1):
        return None
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (Holm, Scand. J. Statist. 1979) of a family of p-values:
    the i-th smallest of m is multiplied by (m - i + 1), made monotone, capped at 1. ``None``
    (a test that was not made) stays None and does not count in m."""
    tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    m = len(tested)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict_text(p_adjusted: float | None, fallback: str) -> str:
    """The "beats random?" cell from a Holm-adjusted p-value (or the untested reason)."""
    if p_adjusted is None:
        return fallback
    return f"{'yes' if p_adjusted < ALPHA else 'no'} (p={p_adjusted:.3f})"


@dataclass(frozen=True)
class Pairwise:
    """Welch's two-sided test between two rows of one table, Holm-adjusted over its pairs."""

    a: int  # indices into the table's rows
    b: int
    p: float | None
    p_adjusted: float | None
    a_better: bool  # the mean of row a is the higher


def pairwise(rows: Sequence[Sequence[float]]) -> list[Pairwise]:
    """Every pair of rows (final top-1 per seed), tested and adjusted as one family."""
    pairs = [(i, j) for i in range(len(rows)) for j in range(i + 1, len(rows))]
    raw = [welch_two_sided(rows[i], rows[j]) for i, j in pairs]
    adjusted = holm(raw)

    def mean(v: Sequence[float]) -> float:
        c = _clean(v)
        return sum(c) / len(c) if c else float("-inf")

    return [Pairwise(i, j, p, q, mean(rows[i]) > mean(rows[j])) for (i, j), p, q in zip(pairs, raw, adjusted,
                                                                                        strict=True)]


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean and sample std over seeds; a non-finite value makes the mean NaN (never dropped)."""
    vals = [float(v) for v in values]
    n = len(vals)
    if any(not math.isfinite(v) for v in vals):
        return float("nan"), float("nan"), n
    mean = sum(vals) / n
    std = (sum((v - mean) ** 2 for v in vals) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mean, std, n
