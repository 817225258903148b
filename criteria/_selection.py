"""Filter selection inside one layer by linear reconstruction of the filters (HBGS's lower level).

Purohit, Parvathgari, Bhattacharya, "A Greedy Hierarchical Approach to Whole-Network
Filter-Pruning in CNNs", TMLR 2024 (arXiv:2409.03777), lower-level "filter pruning".

A layer's filters are the columns of ``A = Wᵀ`` (``m = C_in·kh·kw`` rows, ``N`` columns).
Keeping a subset ``S`` costs the ridge least-squares error of rebuilding every target filter
``a_t`` from the kept ones::

    E(S) = Σ_t min_c ‖a_t − A_S c‖² + λ‖c‖²  =  Σ_t a_tᵀ a_t − H_{T,S} G_S H_{S,T},
    H = AᵀA,  G_S = (H_SS + λI)⁻¹.

Everything is a function of the Gram matrix ``H`` (``N × N``), so nothing here touches ``A``
after the first product. Two greedy selectors:

* **backward** elimination: drop the filter whose removal raises ``E`` least. Removing ``k``
  from ``S`` raises ``E`` by exactly ``‖(A_S G_S e_k)ᵀ A_T‖² / (G_S)_kk = ‖F_k‖² / (G_S)_kk``
  with ``F = G_S H_{S,T}`` (the rank-one change of the hat matrix ``A_S G_S A_Sᵀ``; it holds
  for any ``λ ≥ 0`` and reduces to plain least squares at ``λ = 0``). After the drop ``G``
  and ``F`` are downdated in ``O(|S|·N)``: ``G ← G − G e_k e_kᵀ G / G_kk`` restricted to the
  remaining filters; the inverse is never recomputed.
* **omp**: simultaneous orthogonal matching pursuit. Add the filter whose normalised
  correlation with the current residuals of *all* targets is largest
  (``Σ_t ⟨a_p, r_t⟩² / ‖a_p‖²``, i.e. the atom that most reduces the residual in a single
  matching-pursuit step), then refit every target on the selected set by ridge least
  squares. The residual correlations ``Q = H − H_{:,S} G_S H_{S,:}`` are updated by a rank-one
  step per pick. scikit-learn's ``orthogonal_mp_gram`` is not used: it gives every target
  its own support, whereas pruning needs one support shared by all filters.

``λ`` is given relative to the mean squared filter norm (``ridge · tr(H)/N``) so that the
selection does not depend on the scale of the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "SELECTORS",
    "Selection",
    "backward_order",
    "drop_costs",
    "downdate_inverse",
    "filter_gram",
    "forward_order",
    "ls_coefficients",
    "reconstruction_error",
    "ridge_value",
    "select_backward",
    "select_omp",
]


@dataclass(frozen=True)
class Selection:
    """Result of a selector on one layer.

    ``kept`` and ``dropped`` are filter indices (``kept`` ascending, ``dropped`` in the order
    the selector gave them up); ``coeffs[r, j]`` expresses dropped filter ``dropped[r]`` from
    kept filter ``kept[j]`` (ridge least squares), the input of
    :func:`prunebench.pipeline.compensation.fold_into_consumers`. ``order`` is the selector's own
    decision sequence: filters in the order they were dropped (backward) or picked (omp).
    """

    kept: Tensor
    dropped: Tensor
    coeffs: Tensor
    order: Tensor


def filter_gram(weight: Tensor) -> Tensor:
    """``H = AᵀA`` in float64 for ``A = Wᵀ`` (columns = flattened filters of ``weight``)."""
    w = weight.detach().reshape(weight.shape[0], -1).to(device="cpu", dtype=torch.float64)
    return w @ w.T


def ridge_value(H: Tensor, ridge: float) -> float:
    """Absolute ridge ``λ = ridge · mean(diag H)`` (0 when every filter is zero)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    scale = float(torch.diagonal(H).mean()) if H.numel() else 0.0
    return ridge * scale


def _as_index(idx: Sequence[int] | Tensor | None, n: int) -> Tensor:
    if idx is None:
        return torch.arange(n)
    return torch.as_tensor(idx, dtype=torch.long).reshape(-1)


def _inverse(M: Tensor) -> Tensor:
    """Inverse of a symmetric positive definite matrix; ValueError when it is (numerically) singular."""
    L, info = torch.linalg.cholesky_ex(M)
    pivots = torch.diagonal(L) ** 2
    scale = float(torch.diagonal(M).abs().max()) if M.numel() else 0.0
    if int(info) != 0 or (M.numel() and float(pivots.min()) <= 1e-13 * scale):
        raise ValueError(
            "the filters' Gram matrix is singular (linearly dependent filters, or more "
            "filters than weights per filter); use ridge > 0"
        )
    return torch.cholesky_inverse(L)


def drop_costs(F: Tensor, G: Tensor) -> Tensor:
    """Increase of the reconstruction error for dropping each kept filter, all at once.

    ``G = (H_SS + λI)⁻¹`` over the kept set ``S`` and ``F = G H_{S,T}`` (rows follow ``S``).
    """
    return (F * F).sum(dim=1) / torch.diagonal(G)


def downdate_inverse(G: Tensor, k: int) -> Tensor:
    """Inverse of the Gram matrix with row/column ``k`` removed, from the full inverse ``G``.

    ``(H_{-k,-k})⁻¹ = [G − G e_k e_kᵀ G / G_kk]_{-k,-k}``: a rank-one downdate, no inversion.
    """
    g = G[:, k]
    out = G - torch.outer(g, g) / G[k, k]
    keep = torch.ones(G.shape[0], dtype=torch.bool, device=G.device)
    keep[k] = False
    return out[keep][:, keep]


def reconstruction_error(
    H: Tensor, kept: Sequence[int] | Tensor, targets: Sequence[int] | Tensor | None = None, lam: float = 0.0
) -> float:
    """``E(S)``: total ridge least-squares error of the targets rebuilt from ``kept``."""
    S = _as_index(kept, H.shape[0])
    T = _as_index(targets, H.shape[0])
    total = float(torch.diagonal(H)[T].sum())
    if S.numel() == 0:
        return total
    M = H[S][:, S] + lam * torch.eye(S.numel(), dtype=H.dtype)
    B = H[S][:, T]
    return total - float((B * torch.linalg.solve(M, B)).sum())


def ls_coefficients(
    H: Tensor, kept: Sequence[int] | Tensor, dropped: Sequence[int] | Tensor, lam: float
) -> Tensor:
    """Ridge least-squares coefficients ``[len(dropped), len(kept)]``: ``a_d ≈ Σ_j c[d, j] a_kept[j]``."""
    S = _as_index(kept, H.shape[0])
    D = _as_index(dropped, H.shape[0])
    if S.numel() == 0 or D.numel() == 0:
        return torch.zeros(D.numel(), S.numel(), dtype=H.dtype)
    M = H[S][:, S] + lam * torch.eye(S.numel(), dtype=H.dtype)
    try:
        C = torch.linalg.solve(M, H[S][:, D])
    except RuntimeError:  # singular at lam = 0: minimum-norm solution
        C = torch.linalg.lstsq(M, H[S][:, D], driver="gelsd").solution
    return C.T.contiguous()


def backward_order(
    H: Tensor,
    n_drop: int,
    lam: float,
    pool: Sequence[int] | Tensor | None = None,
    targets: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedy backward elimination of ``n_drop`` filters from ``pool``.

    Returns ``(order, costs)``: the dropped filters in order and the error increase each
    drop caused (the sum of the first ``j`` costs is ``E(pool minus order[:j]) − E(pool)``).
    """
    P = _as_index(pool, H.shape[0])
    T = _as_index(targets, H.shape[0])
    if not 0 <= n_drop <= P.numel():
        raise ValueError(f"cannot drop {n_drop} of {P.numel()} filters")
    H = H.to(torch.float64)
    G = _inverse(H[P][:, P] + lam * torch.eye(P.numel(), dtype=H.dtype))
    F = G @ H[P][:, T]
    alive = P.clone()
    order, costs = [], []
    for _ in range(n_drop):
        c = drop_costs(F, G)
        k = int(torch.argmin(c))
        order.append(int(alive[k]))
        costs.append(float(c[k]))
        g = G[:, k] / G[k, k]
        F = F - torch.outer(g, F[k])
        G = downdate_inverse(G, k)
        keep = torch.ones(alive.numel(), dtype=torch.bool)
        keep[k] = False
        F = F[keep]
        alive = alive[keep]
    return torch.tensor(order, dtype=torch.long), torch.tensor(costs, dtype=torch.float64)


def forward_order(
    H: Tensor,
    n_select: int,
    lam: float,
    pool: Sequence[int] | Tensor | None = None,
    targets: Sequence[int] | Tensor | None = None,
) -> Tensor:
    """Simultaneous OMP: pick ``n_select`` filters of ``pool`` one at a time.

    Returns the picks in order; the first ``n`` picks are the selection of size ``n``.
    """
    P = _as_index(pool, H.shape[0])
    T = _as_index(targets, H.shape[0])
    if not 0 <= n_select <= P.numel():
        raise ValueError(f"cannot select {n_select} of {P.numel()} filters")
    H = H.to(torch.float64)
    # Q[p, q]: residual cross-Gram after refitting on the picks; rows = pool, cols = pool ∪ targets.
    cols = torch.cat([P, T])
    Q = H[P][:, cols].clone()
    t_cols = torch.arange(P.numel(), cols.numel())
    norms = torch.diagonal(H)[P].clamp_min(torch.finfo(H.dtype).tiny)
    chosen = torch.zeros(P.numel(), dtype=torch.bool)
    picks = []
    for _ in range(n_select):
        score = (Q[:, t_cols] ** 2).sum(dim=1) / norms
        score[chosen] = -1.0
        k = int(torch.argmax(score))
        picks.append(int(P[k]))
        chosen[k] = True
        s = Q[k, k] + lam
        if s <= 0:  # the pick is already spanned (only possible at lam = 0): nothing to refit
            continue
        q_row = Q[k].clone()
        q_col = Q[:, k].clone()  # Q restricted to pool columns is symmetric
        Q = Q - torch.outer(q_col, q_row) / s
    return torch.tensor(picks, dtype=torch.long)


def _selection(H: Tensor, kept_mask: Tensor, order: Tensor, dropped: Tensor, lam: float) -> Selection:
    kept = torch.nonzero(kept_mask).reshape(-1)
    return Selection(kept=kept, dropped=dropped, coeffs=ls_coefficients(H, kept, dropped, lam), order=order)


def select_backward(weight: Tensor, n_keep: int, ridge: float = 1e-4) -> Selection:
    """Keep ``n_keep`` filters of a conv ``weight`` (``[N, ...]``) by greedy backward elimination."""
    H = filter_gram(weight)
    lam = ridge_value(H, ridge)
    n = H.shape[0]
    order, _ = backward_order(H, n - n_keep, lam)
    mask = torch.ones(n, dtype=torch.bool)
    mask[order] = False
    return _selection(H, mask, order, order, lam)


def select_omp(weight: Tensor, n_keep: int, ridge: float = 1e-4) -> Selection:
    """Keep ``n_keep`` filters of a conv ``weight`` (``[N, ...]``) by simultaneous OMP."""
    H = filter_gram(weight)
    lam = ridge_value(H, ridge)
    n = H.shape[0]
    picks = forward_order(H, n_keep, lam)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[picks] = True
    dropped = torch.nonzero(~mask).reshape(-1)
    return _selection(H, mask, picks, dropped, lam)


def omp_drop_order(H: Tensor, n_drop: int, lam: float, pool=None, targets=None) -> Tensor:
    """Drop order implied by OMP: the last picks go first (selections of all sizes are nested)."""
    P = _as_index(pool, H.shape[0])
    picks = forward_order(H, P.numel(), lam, pool=P, targets=targets)
    return picks.flip(0)[:n_drop].clone()


def backward_drop_order(H: Tensor, n_drop: int, lam: float, pool=None, targets=None) -> Tensor:
    return backward_order(H, n_drop, lam, pool=pool, targets=targets)[0]


#: name -> (drop order from a Gram matrix, selection from a weight tensor)
SELECTORS: dict[str, tuple[Callable[..., Tensor], Callable[..., Selection]]] = {
    "backward": (backward_drop_order, select_backward),
    "omp": (omp_drop_order, select_omp),
}
