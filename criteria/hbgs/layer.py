"""The lower level of the search: one unit's filters, which of them go next, and at what error.

A unit's state is its current *pool* (the filters it still keeps) and the drop order of the
pool from the selector (:mod:`prunebench.criteria._selection`). With ``reselect`` (the
default, as in the authors' code) the selector runs again after every move, on the filters
that remain and with them as the targets, so a move never depends on filters already gone.
Without it, one drop order is computed when the state is built, with every filter of the
pool as a target, and the moves take its next filters.

Every original channel ``d`` of the unit is represented by a combination of the kept ones,
``y_d ≈ Σ_k T[d, k] y_k`` (``T`` is the identity on the kept channels). With ``reselect`` a
move that drops ``D`` from the pool, keeping ``S``, with least-squares coefficients ``C``
(``a_D ≈ C a_S``) updates ``T[:, S] += T[:, D] C``: the chain of fits the authors' per-move
compensation builds. Without it, the dropped filters are fitted directly from the final kept
ones. A unit that cannot be folded (a residual group) keeps ``T`` a selection: a dropped
channel is simply gone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prunebench.criteria._selection import ls_coefficients

__all__ = ["UnitState"]


@dataclass
class UnitState:
    name: str
    members: tuple[str, ...]
    n_out: int
    n_max: int  # most filters that may ever be removed
    H: Tensor  # filter Gram (float64, N x N), summed over the members
    lam: float
    fold: bool  # accumulate least-squares coefficients (compensation) or drop channels plainly
    drop_order: Callable[..., Tensor]  # the selector: (H, n_drop, lam, pool=, targets=) -> order
    reselect: bool = True  # run the selector again after every move (the authors) or once
    pool: Tensor = field(default=None)  # kept filters (ascending)
    order: Tensor = field(default=None)  # the selector's drop order of the pool
    T: Tensor = field(default=None)  # N x N; columns of kept channels are meaningful
    # HBGS: Grams of the members' conv outputs on the calibration images, summed over members
    A: Tensor | None = None  # Y_orig^T Y_orig (the unpruned network)
    B: Tensor | None = None  # Y_cur^T Y_orig (the current network's outputs against the unpruned ones)
    C: Tensor | None = None  # Y_cur^T Y_cur
    cap: int = 1 << 30  # largest block allowed this step (landing on the target)
    _cand: dict[int, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool is None:
            self.pool = torch.arange(self.n_out)
        if self.T is None:
            self.T = torch.eye(self.n_out, dtype=torch.float64)
        self.start_pool = self.pool  # the pool when the state was built
        self._once: Tensor | None = None
        if self.order is None:
            self.reorder()

    # ---- the pool ----------------------------------------------------------------------
    @property
    def removed(self) -> int:
        return self.n_out - int(self.pool.numel())

    def allowance(self) -> int:
        return max(min(self.n_max - self.removed, int(self.order.numel())), 0)

    def reorder(self) -> None:
        """The drop order of the current pool: the selector run on the pool, with the pool's own
        filters as targets (``reselect``), or what is left of the order computed once."""
        n_drop = max(min(self.n_max - self.removed, int(self.pool.numel()) - 1), 0)
        if self.reselect:
            self.order = self.drop_order(self.H, n_drop, self.lam, pool=self.pool, targets=self.pool)
        else:
            if self._once is None:
                self._once = self.drop_order(self.H, n_drop, self.lam, pool=self.pool, targets=self.pool)
            keep = torch.zeros(self.n_out, dtype=torch.bool)
            keep[self.pool] = True
            self.order = self._once[keep[self._once]]
        self._cand = {}

    def drop_set(self, b: int) -> Tensor:
        return self.order[:b]

    def kept(self, b: int = 0) -> Tensor:
        if b == 0:
            return self.pool
        mask = torch.zeros(self.n_out, dtype=torch.bool)
        mask[self.pool] = True
        mask[self.drop_set(b)] = False
        return torch.nonzero(mask).reshape(-1)

    def removed_set(self, b: int = 0) -> Tensor:
        mask = torch.ones(self.n_out, dtype=torch.bool)
        mask[self.kept(b)] = False
        return torch.nonzero(mask).reshape(-1)

    # ---- the representation of every original channel ------------------------------------
    def combination(self, b: int = 0) -> Tensor:
        """``T[:, kept(b)]`` after dropping the next ``b`` filters: ``[N, |kept|]``."""
        if b == 0:
            return self.T[:, self.pool]
        if b not in self._cand:
            S, D = self.kept(b), self.drop_set(b)
            if self.reselect:
                M = self.T[:, S].clone()
                if self.fold:
                    M += self.T[:, D] @ ls_coefficients(self.H, S, D, self.lam)  # [|D|, |S|]
            else:  # the filters dropped since the state was built, fitted directly from the kept ones
                M = torch.eye(self.n_out, dtype=torch.float64)[:, S]
                gone = torch.ones(self.n_out, dtype=torch.bool)
                gone[S] = False
                inside = torch.zeros(self.n_out, dtype=torch.bool)
                inside[self.start_pool] = True
                R = torch.nonzero(gone & inside).reshape(-1)
                if self.fold and R.numel():
                    M[R] = ls_coefficients(self.H, S, R, self.lam)
            self._cand[b] = M
        return self._cand[b]

    def apply(self, b: int) -> None:
        """Drop the next ``b`` filters (and, with ``reselect``, run the selector again on the rest)."""
        M = self.combination(b)
        S = self.kept(b)
        T = torch.zeros_like(self.T)
        T[:, S] = M
        self.T, self.pool = T, S
        self.reorder()


    def coefficients(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(removed, kept, T[removed, kept])``: every removed channel from the kept ones."""
        removed, kept = self.removed_set(), self.pool
        return removed, kept, self.T[removed][:, kept]

    # ---- HBGS error ------------------------------------------------------------------------
    def layer_error(self, b: int = 0) -> float:
        """``‖Y_orig − Ŷ‖ / ‖Y_orig‖`` over the unit's convs (the authors' unsquared relative norm).

        ``Ŷ = Y_cur[:, kept] Tᵀ`` rebuilds every original channel from the kept channels of the
        current network's outputs (its own input already carries the upstream pruning), with
        the candidate's coefficients. Exact, from the three Gram matrices.
        """
        assert self.A is not None and self.B is not None and self.C is not None
        total = float(torch.diagonal(self.A).sum())
        if total <= 0:
            return 0.0
        S = self.kept(b)
        M = self.combination(b)  # [N, |S|]
        cross = (M * self.B[S].T).sum()
        quad = ((M @ self.C[S][:, S]) * M).sum()
        return float((total - 2 * cross + quad).clamp_min(0.0) / total) ** 0.5
