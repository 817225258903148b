"""CORING: filter redundancy from HOSVD mode vectors (weights only, no data).

Pham, Zniyed, Nguyen, "Efficient tensor decomposition-based filter pruning",
Neural Networks 2024.

Each filter ``W[o]`` of a convolution (a ``C_in/groups x k_h x k_w`` tensor) is summarised by
a truncated HOSVD: for each of its three modes, the leading ``rank`` left singular vectors
of the mode unfolding (tensorly ``unfold`` layout). Two filters are compared through the
mean, over the modes, of a distance between their mode vectors; a greedy pair elimination
(:func:`prunebench.criteria._greedy.greedy_redundancy_scores`) turns the distance matrix
into scores, the most redundant filter scoring lowest.

Implementation notes (see docs/criteria/coring.md):

* The SVDs of all filters of a layer run as one batched ``torch.linalg.svd`` per mode, in
  float64 (wide unfoldings are first reduced to ``d x d`` by a batched QR). Singular vectors are sign-fixed (largest-magnitude entry positive), so a filter
  and its negation have the same mode vectors.
* ``rank > 1``: the ``rank`` sign-fixed vectors of a mode are concatenated into one vector
  of length ``rank * mode_size`` before the distance is taken. An unfolding with fewer
  columns than ``rank`` (the ``C x 1`` channel unfolding of a 1x1 conv) contributes all the
  singular vectors it has; a rank larger than a mode's size is a ``ConfigError``.
* Modes of size 1 (the two spatial modes of a 1x1 conv, the channel mode of a depthwise
  conv) have the single singular vector ``[1]`` for every filter; they add the same zero
  to every pair, so they are skipped (this also avoids VBD's 0/0 on length-1 vectors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunebench.criteria._greedy import greedy_redundancy_scores
from prunebench.errors import ConfigError, suggest
from prunebench.protocols import Calibration, ScoreCriterion

DISTANCES = ("vbd", "euclidean", "cosine")

__all__ = ["Coring", "DISTANCES", "hosvd_mode_vectors", "filter_distance_matrix"]


def _left_singular_vectors(a: Tensor, rank: int) -> Tensor:
    """Leading ``rank`` left singular vectors of each matrix of the batch ``a`` ``[N, d, m]``.

    For a wide unfolding (``d < m``, e.g. the ``k x C*k`` spatial modes) the batch is first
    reduced by a QR of its transpose: ``a = R^T Q^T`` has the left singular vectors of the
    small ``d x d`` matrix ``R^T``. Same result as a direct SVD, several times cheaper.
    """
    d, m = a.shape[-2:]
    if d < m:
        a = torch.linalg.qr(a.transpose(-2, -1), mode="r").R.transpose(-2, -1)
    return torch.linalg.svd(a, full_matrices=False).U[..., :rank]


def _sq_dists(v: Tensor) -> Tensor:
    """Squared Euclidean distances between the rows of ``v`` (Gram form, clamped at 0)."""
    sq = (v * v).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (v @ v.T)).clamp_min(0.0)


def hosvd_mode_vectors(weight: Tensor, rank: int = 1, layer: str = "") -> list[Tensor]:
    """Sign-fixed leading left singular vectors of every non-trivial mode of every filter.

    ``weight`` is a conv weight ``[N, C, k_h, k_w]`` (N filters, each a ``C x k_h x k_w``
    tensor). Returns one ``[N, r_m * d_m]`` float64 tensor per mode ``m`` of size
    ``d_m > 1``: the leading ``r_m`` left singular vectors of the mode-``m`` unfolding of each
    filter, each with its largest-magnitude entry made positive, concatenated. One batched
    SVD per mode.

    ``r_m = min(rank, P_m)`` where ``P_m`` is the product of the other mode sizes: an
    unfolding with fewer columns than ``rank`` (the ``C x 1`` channel unfolding of a 1x1 conv)
    has only ``P_m`` singular vectors, and all of them are used. Raises :class:`ConfigError`
    when ``rank`` exceeds a non-trivial mode's size ``d_m`` (e.g. rank 4 on a 3x3 kernel).
    """
    where = f"layer {layer!r}" if layer else "the weight"
    if weight.dim() < 2:
        raise ConfigError(f"coring expects a conv weight [N, C, k, k]; {where} has {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    n = int(w.shape[0])
    sizes = tuple(int(s) for s in w.shape[1:])
    total = math.prod(sizes)
    vectors: list[Tensor] = []
    for mode, d in enumerate(sizes):
        if d == 1:
            continue
        if rank > d:
            shape = " x ".join(str(s) for s in sizes)
            small = min(s for s in sizes if s > 1)
            raise ConfigError(
                f"coring: HOSVD rank {rank} is larger than mode {mode + 1} of {where}: "
                f"its filters are {shape} (mode sizes {sizes}). Use rank <= {small} "
                f"(rank 1, the paper's setting, works for every layer)."
            )
        others = total // d
        r = min(rank, others)
        # tensorly.base.unfold(filter, mode): move `mode` first, then row-major reshape.
        unfolded = w.movedim(mode + 1, 1).reshape(n, d, others)
        u = _left_singular_vectors(unfolded, r)  # [N, d, r]
        pivot = u.abs().argmax(dim=1, keepdim=True)  # [N, 1, r]
        sign = torch.sign(torch.gather(u, 1, pivot))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        u = u * sign
        vectors.append(u.transpose(1, 2).reshape(n, r * d))
    return vectors


def _pairwise(v: Tensor, distance: str) -> Tensor:
    """``[N, N]`` distance between the rows of ``v`` (float64)."""
    tiny = torch.finfo(v.dtype).tiny
    if distance == "euclidean":
        return _sq_dists(v).sqrt()
    if distance == "cosine":
        vn = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
        return (1.0 - (vn @ vn.T).abs()).clamp_min(0.0)
    if distance == "vbd":
        # var(a-b) / (var(a)+var(b)); with centred vectors c = a - mean(a) this is
        # |c_a - c_b|^2 / (|c_a|^2 + |c_b|^2) (the 1/d factors cancel).
        c = v - v.mean(dim=1, keepdim=True)
        num = _sq_dists(c)
        var = (c * c).sum(dim=1)
        den = var[:, None] + var[None, :]
        return torch.where(den > 0, num / den.clamp_min(tiny), torch.zeros_like(num))
    raise ConfigError(f"unknown coring distance {distance!r}.{suggest(distance, DISTANCES)}")


def filter_distance_matrix(weight: Tensor, rank: int = 1, distance: str = "vbd", layer: str = "") -> Tensor:
    """``[N, N]`` CORING distance between the filters of one conv weight (float64).

    The mean over the non-trivial modes of the ``distance`` between mode vectors; all zeros
    when every mode has size 1 (a 1x1 depthwise conv: its filters are scalars).
    """
    vectors = hosvd_mode_vectors(weight, rank=rank, layer=layer)
    n = int(weight.shape[0])
    if not vectors:
        return torch.zeros(n, n, dtype=torch.float64, device=weight.device)
    return torch.stack([_pairwise(v, distance) for v in vectors]).mean(dim=0)


class Coring(ScoreCriterion):
    """Filter redundancy from rank-``r`` HOSVD mode vectors and greedy pair elimination."""

    name = "coring"
    needs_data = False
    summary = "CORING: HOSVD mode vectors of each filter; prune the more redundant of the closest pairs"
    reference = (
        "Pham, Zniyed, Nguyen, 'Efficient tensor decomposition-based filter pruning', Neural Networks 2024"
    )

    @dataclass(frozen=True)
    class Params:
        #: Left singular vectors kept per mode of each filter's HOSVD (paper: 1).
        rank: int = 1
        #: Distance between mode vectors: "vbd" (paper's default), "euclidean", "cosine".
        distance: str = "vbd"

        def __post_init__(self) -> None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ConfigError(f"coring: rank must be a positive integer, got {self.rank!r}")
            if self.distance not in DISTANCES:
                raise ConfigError(
                    f"coring: unknown distance {self.distance!r}.{suggest(str(self.distance), DISTANCES)} "
                    f"Available: {', '.join(DISTANCES)}"
                )

    def distance_matrix(self, conv: nn.Module, layer: str = "") -> Tensor:
        """The ``[N, N]`` filter distance matrix of one conv (float64, on the weight's device)."""
        return filter_distance_matrix(conv.weight, self.params.rank, self.params.distance, layer)

    @torch.no_grad()
    def scores(
        self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None = None
    ) -> dict[str, Tensor]:
        modules = dict(model.named_modules())
        out: dict[str, Tensor] = {}
        for name in layers:
            conv = modules.get(name)
            if conv is None:
                raise ConfigError(f"coring: the model has no module {name!r}.{suggest(name, modules)}")
            if not isinstance(conv, nn.Conv2d):
                raise ConfigError(f"coring scores Conv2d layers; {name!r} is a {type(conv).__name__}")
            dist = self.distance_matrix(conv, layer=name)
            out[name] = greedy_redundancy_scores(dist).to(torch.float32)
        return out
