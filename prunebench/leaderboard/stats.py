"""Does a row beat the ``random`` control beyond the seed noise?

The test is Welch's unequal-variance t-test (Welch, Biometrika 1947) on final top-1 over
seeds, one-sided: H1 = the row's mean is higher than ``random``'s at the same target, budget
and protocol options. A row "beats random" when p < :data:`ALPHA`. With one seed on either
side nothing is tested — the verdict says so and never reads as a yes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
