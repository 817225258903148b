"""The greedy pair-elimination ranking shared by the redundancy criteria (CORING, QSFM).

Given a symmetric matrix of pairwise *distances* between the output channels of a layer,
repeatedly take the closest remaining pair; of its two members, the one with the smaller
total distance to the other remaining channels is the more redundant. It receives the lowest
remaining score and leaves the comparison. The last channel standing gets the highest score.

Similarity-based criteria pass ``-similarity``: the most similar pair is then the closest
one, and the member with the larger similarity row sum the one with the smaller distance
row sum.

Cost: ``N - 1`` iterations. Each one reads the current global minimum from a cached
per-row minimum (``O(N)``), sums two rows over the remaining channels (``O(N)``) and
recomputes the row minimum only for rows whose nearest neighbour was just removed, so an
iteration costs at most ``O(N^2)`` and typically ``O(N)``. The loop runs on numpy arrays
(CPU), whose per-call overhead is far below torch's for these small steps. Memory: two
``N x N`` float64 matrices.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def greedy_redundancy_scores(distance: Tensor) -> Tensor:
    """Scores from greedy pair elimination: the removal position of each channel.

    ``distance`` is a symmetric ``[N, N]`` matrix (its diagonal is ignored; it is symmetrised
    as ``(D + D^T) / 2`` so that rounding asymmetries cannot break ties). Returns a float64
    CPU tensor of length ``N`` holding a permutation of ``0 .. N-1``: the channel removed first
    scores ``0``, the one that survives every comparison scores ``N - 1`` (higher = kept).

    Ties are broken deterministically, as in the CORING authors' code (``compare_sum``): the
    closest pair is the first one in row-major order, and when both members have the same
    total distance the one with the lower index is removed (so, of two exact duplicates, the
    higher index is kept longer).
    """
    if distance.dim() != 2 or distance.shape[0] != distance.shape[1]:
        raise ValueError(f"expected a square distance matrix, got shape {tuple(distance.shape)}")
    n = int(distance.shape[0])
    # The loop runs N - 1 small steps: numpy's per-call overhead is far below torch's here.
    d0 = distance.detach().to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(d0).all():
        raise ValueError("the distance matrix contains NaN or infinite entries")
    # Only comparisons between distances and between row totals matter: an exact power-of-two
    # rescale to |d| < 1 keeps every one of them and keeps the sums below finite, whatever the
    # unit (finite entries near the float64 maximum would overflow them to inf).
    top = float(np.abs(d0).max()) if d0.size else 0.0
    if top > 0.0:
        d0 = np.ldexp(d0, -math.frexp(top)[1])
    # Symmetrise: a distance is symmetric, but d[i, j] and d[j, i] may come out of a matmul
    # with different rounding, and that must not decide a tie (e.g. the last pair standing).
    d0 = 0.5 * (d0 + d0.T)
    scores = np.zeros(n, dtype=np.float64)
    if n <= 1:
        return torch.from_numpy(scores)
    np.fill_diagonal(d0, 0.0)
    work = d0.copy()
    np.fill_diagonal(work, np.inf)
    alive = np.ones(n, dtype=bool)
    alive_f = np.ones(n, dtype=np.float64)
    rowarg = work.argmin(axis=1)  # first minimum of each row
    rowmin = work[np.arange(n), rowarg]
    for step in range(n - 1):
        i = int(rowmin.argmin())  # first row holding the global minimum
        j = int(rowarg[i])
        # Total distance of each member to the channels still in the comparison.
        si = float(d0[i] @ alive_f)
        sj = float(d0[j] @ alive_f)
        r = j if sj < si or (sj == si and j < i) else i
        scores[r] = step
        alive[r] = False
        alive_f[r] = 0.0
        work[r, :] = np.inf
        work[:, r] = np.inf
        rowmin[r] = np.inf
        stale = np.flatnonzero((rowarg == r) & alive)
        if stale.size:
            sub = work[stale]
            arg = sub.argmin(axis=1)
            rowarg[stale] = arg
            rowmin[stale] = sub[np.arange(stale.size), arg]
    scores[alive] = n - 1
    return torch.from_numpy(scores)
