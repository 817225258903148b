"""Lower-level filter selectors of HBGS: closed-form costs, downdates, greedy choices."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

from prunebench.criteria._selection import (
    SELECTORS,
    backward_order,
    downdate_inverse,
    drop_costs,
    filter_gram,
    forward_order,
    ls_coefficients,
    reconstruction_error,
    ridge_value,
    select_backward,
    select_omp,
)


def brute_error(A: torch.Tensor, kept: list[int], lam: float) -> float:
    """Σ_t min_c ‖a_t − A_S c‖² + λ‖c‖², one explicit ridge least-squares solve per target."""
    if not kept:
        return float((A * A).sum())
    AS = A[:, kept]
    total = 0.0
    for t in range(A.shape[1]):
        if lam == 0:
            c = torch.linalg.lstsq(AS, A[:, t : t + 1]).solution
        else:
            M = AS.T @ AS + lam * torch.eye(len(kept), dtype=A.dtype)
            c = torch.linalg.solve(M, AS.T @ A[:, t : t + 1])
        r = A[:, t : t + 1] - AS @ c
        total += float((r * r).sum() + lam * (c * c).sum())
    return total


def explicit_ridge(A: torch.Tensor, kept: list[int], dropped: list[int], lam: float) -> torch.Tensor:
    """``argmin_c ‖a_d − A_S c‖² + λ‖c‖²`` per dropped filter, as the least-squares problem
    ``[A_S; √λ I] c = [a_d; 0]`` solved by numpy (no Gram matrix, no normal equations)."""
    import numpy as np

    a = A.numpy()
    stacked = np.vstack([a[:, kept], np.sqrt(lam) * np.eye(len(kept))])
    rhs = np.vstack([a[:, dropped], np.zeros((len(kept), len(dropped)))])
    return torch.from_numpy(np.linalg.lstsq(stacked, rhs, rcond=None)[0].T)  # [|D|, |S|]


@pytest.mark.parametrize("lam", [0.0, 0.05, 2.0])
def test_ls_coefficients_equal_an_explicit_ridge_solve(lam: float) -> None:
    g = torch.Generator().manual_seed(7)
    A = torch.randn(25, 9, generator=g, dtype=torch.float64)  # columns are filters
    kept, dropped = [0, 2, 3, 5, 8], [7, 1, 4]  # any order: rows follow ``dropped``
    coeffs = ls_coefficients(A.T @ A, kept, dropped, lam)
    torch.testing.assert_close(coeffs, explicit_ridge(A, kept, dropped, lam), rtol=1e-9, atol=1e-11)
    # one kept filter: each dropped filter is a multiple of it
    one = ls_coefficients(A.T @ A, [6], dropped, lam)
    torch.testing.assert_close(one, explicit_ridge(A, [6], dropped, lam), rtol=1e-9, atol=1e-11)
    # a dependent filter is rebuilt exactly at lam = 0
    A[:, 4] = 2.0 * A[:, 0] - A[:, 3]
    c = ls_coefficients(A.T @ A, kept, [4], 0.0)
    torch.testing.assert_close(c, torch.tensor([[2.0, 0.0, -1.0, 0.0, 0.0]], dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("lam", [0.0, 0.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_cost_matches_brute_force_refits(seed: int, lam: float) -> None:
    g = torch.Generator().manual_seed(seed)
    m, n = 30, 9
    A = torch.randn(m, n, generator=g, dtype=torch.float64)
    H = A.T @ A
    S = [0, 2, 3, 5, 6, 7, 8]  # a kept set, the full column set stays the target
    G = torch.linalg.inv(H[S][:, S] + lam * torch.eye(len(S), dtype=H.dtype))
    F = G @ H[S]
    costs = drop_costs(F, G)
    before = brute_error(A, S, lam)
    for j, k in enumerate(S):
        after = brute_error(A, [s for s in S if s != k], lam)
        torch.testing.assert_close(costs[j].item(), after - before, rtol=1e-6, atol=1e-9)
    # the cost uses (A G e_k)ᵀ A literally, too
    k = 3
    v = A[:, S] @ G[:, k]
    assert float((v @ A) @ (v @ A) / G[k, k]) == pytest.approx(float(costs[k]), rel=1e-9)


def test_reconstruction_error_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    A = torch.randn(20, 7, generator=g, dtype=torch.float64)
    H = A.T @ A
    for lam in (0.0, 0.5):
        for kept in ([0, 1], [2, 4, 6], [5], []):
            assert reconstruction_error(H, kept, lam=lam) == pytest.approx(
                brute_error(A, kept, lam), rel=1e-9
            )
    # plain least squares unless a ridge is given
    assert reconstruction_error(H, [2, 4, 6]) == pytest.approx(brute_error(A, [2, 4, 6], 0.0), rel=1e-9)


def test_downdated_inverse_equals_fresh_inverse() -> None:
    g = torch.Generator().manual_seed(4)
    A = torch.randn(25, 10, generator=g, dtype=torch.float64)
    M = A.T @ A + 0.1 * torch.eye(10, dtype=torch.float64)
    G = torch.linalg.inv(M)
    alive = list(range(10))
    for k_pos in (3, 0, 7, 2):  # repeated downdates, never re-inverting
        G = downdate_inverse(G, k_pos)
        alive.pop(k_pos)
        fresh = torch.linalg.inv(M[alive][:, alive])
        torch.testing.assert_close(G, fresh, rtol=1e-8, atol=1e-10)


def test_backward_costs_sum_to_error_increase() -> None:
    g = torch.Generator().manual_seed(5)
    A = torch.randn(40, 12, generator=g, dtype=torch.float64)
    H = A.T @ A
    lam = 0.2
    order, costs = backward_order(H, 8, lam)
    assert len(set(order.tolist())) == 8
    full = reconstruction_error(H, list(range(12)), lam=lam)
    for j in range(1, 9):
        kept = [i for i in range(12) if i not in order[:j].tolist()]
        assert reconstruction_error(H, kept, lam=lam) - full == pytest.approx(
            float(costs[:j].sum()), rel=1e-6
        )


def test_backward_step_is_the_greedy_optimum() -> None:
    g = torch.Generator().manual_seed(6)
    A = torch.randn(15, 8, generator=g, dtype=torch.float64)
    H = A.T @ A
    order, _ = backward_order(H, 3, 0.0)
    kept = list(range(8))
    for k in order.tolist():
        errs = {c: brute_error(A, [s for s in kept if s != c], 0.0) for c in kept}
        assert k == min(errs, key=errs.get)
        kept.remove(k)


def test_dependent_column_is_dropped_first_at_zero_cost() -> None:
    g = torch.Generator().manual_seed(7)
    A = torch.randn(30, 8, generator=g, dtype=torch.float64)
    A[:, 5] = 0.7 * A[:, 1] - 1.3 * A[:, 6] + 0.2 * A[:, 2]
    order, costs = backward_order(A.T @ A, 1, 1e-10)
    # columns 1, 2, 5, 6 are mutually dependent: any of them is free to drop
    assert int(order[0]) in (1, 2, 5, 6)
    assert float(costs[0]) < 1e-6 * float((A * A).sum())
    # and from the weights interface, with the default ridge, coefficients recover the combination
    w = A.T.reshape(8, 2, 3, 5)  # 8 filters of 2x3x5
    sel = select_backward(w, n_keep=7)
    assert int(sel.dropped[0]) in (1, 2, 5, 6)
    rebuilt = sel.coeffs @ A.T[sel.kept]
    torch.testing.assert_close(rebuilt, A.T[sel.dropped], rtol=0, atol=1e-2)


def test_omp_recovers_planted_atoms() -> None:
    g = torch.Generator().manual_seed(8)
    atoms = torch.randn(50, 3, generator=g, dtype=torch.float64)
    mix = torch.randn(3, 9, generator=g, dtype=torch.float64)
    A = torch.cat([atoms, atoms @ mix + 1e-3 * torch.randn(50, 9, generator=g, dtype=torch.float64)], dim=1)
    # 12 filters: three generators and nine mixtures of them; three picks must span everything
    sel = select_omp(A.T.contiguous(), n_keep=3, ridge=1e-8)
    H = A.T @ A
    err = reconstruction_error(H, sel.kept, lam=0.0)
    assert err < 1e-3 * float(torch.trace(H))
    # OMP's picks are nested: a larger selection starts with the smaller one
    picks = forward_order(H, 6, 1e-8)
    assert set(picks[:3].tolist()) == set(sel.order.tolist())


def test_omp_never_repicks_and_is_close_to_best_subset() -> None:
    g = torch.Generator().manual_seed(9)
    A = torch.randn(6, 10, generator=g, dtype=torch.float64)  # more filters than weights: rank 6
    H = A.T @ A
    lam = ridge_value(H, 1e-4)
    picks = forward_order(H, 10, lam)
    assert sorted(picks.tolist()) == list(range(10))
    err3 = reconstruction_error(H, picks[:3], lam=lam)
    best3 = min(reconstruction_error(H, list(c), lam=lam) for c in itertools.combinations(range(10), 3))
    assert err3 <= 1.5 * best3


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_selectors_return_consistent_partitions(name: str) -> None:
    g = torch.Generator().manual_seed(10)
    w = torch.randn(16, 4, 3, 3, generator=g)
    sel = SELECTORS[name][1](w, 10)
    assert sel.kept.dtype == torch.long and sel.dropped.dtype == torch.long
    assert sorted(sel.kept.tolist() + sel.dropped.tolist()) == list(range(16))
    assert sel.kept.tolist() == sorted(sel.kept.tolist())
    assert sel.coeffs.shape == (6, 10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.kept = sel.dropped  # a result is a value: nothing downstream may rewrite it
    H = filter_gram(w)
    A = w.reshape(16, -1).T.double()
    lam = 1e-4 * float((A * A).sum()) / 16  # relative to the mean squared filter norm
    assert ridge_value(H, 1e-4) == pytest.approx(lam, rel=1e-12)
    expected = explicit_ridge(A, sel.kept.tolist(), sel.dropped.tolist(), lam)
    torch.testing.assert_close(sel.coeffs, expected, rtol=1e-7, atol=1e-9)
    # drop orders restricted to a pool never leave the pool
    drop = SELECTORS[name][0]
    pool = torch.tensor([1, 3, 4, 8, 9, 12, 15])
    order = drop(H, 4, ridge_value(H, 1e-4), pool=pool, targets=pool)
    assert set(order.tolist()) <= set(pool.tolist()) and len(set(order.tolist())) == 4


SINGULAR = (
    "the filters' Gram matrix is singular (linearly dependent filters, or more "
    "filters than weights per filter); use ridge > 0"
)


def _gram(n: int, seed: int = 0) -> torch.Tensor:
    A = torch.randn(3 * n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return A.T @ A


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: backward_order(_gram(6)[:, :3] @ _gram(6)[:3], 2, 0.0), SINGULAR),  # rank 3 of 6
        (lambda: select_backward(torch.ones(4, 2, 3, 3), 2, ridge=0.0), SINGULAR),  # four equal filters
        (lambda: ridge_value(_gram(4), -0.5), "ridge must be >= 0, got -0.5"),
        (lambda: select_omp(torch.ones(4, 9), 2, ridge=-1e-3), "ridge must be >= 0, got -0.001"),
        (lambda: backward_order(_gram(4), 5, 0.1), "cannot drop 5 of 4 filters"),
        (lambda: backward_order(_gram(4), -1, 0.1), "cannot drop -1 of 4 filters"),
        (lambda: backward_order(_gram(6), 4, 0.1, pool=[0, 2, 5]), "cannot drop 4 of 3 filters"),
        (lambda: forward_order(_gram(4), 5, 0.1), "cannot select 5 of 4 filters"),
        (lambda: select_omp(torch.ones(4, 9), -1), "cannot select -1 of 4 filters"),
    ],
    ids=[
        "rank-deficient",
        "equal-filters",
        "ridge",
        "ridge-omp",
        "drop-too-many",
        "drop-negative",
        "drop-from-pool",
        "select-too-many",
        "select-negative",
    ],
)
def test_bad_input_raises_a_one_line_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        call()


def test_ridge_is_zero_for_no_filters_and_for_zero_filters() -> None:
    assert ridge_value(torch.zeros(0, 0, dtype=torch.float64), 0.5) == 0.0
    assert ridge_value(filter_gram(torch.zeros(3, 2, 3, 3)), 0.5) == 0.0


def test_singular_verdict_does_not_depend_on_the_weight_scale() -> None:
    g = torch.Generator().manual_seed(11)
    A = torch.randn(20, 6, generator=g, dtype=torch.float64)
    near = A.clone()
    near[:, 5] = A[:, 0] + 1e-7 * torch.randn(20, generator=g, dtype=torch.float64)  # relative pivot ~1e-14
    order = backward_order(A.T @ A, 3, 0.0)[0]
    for scale in (1e-5, 1.0, 1e5):
        B = scale * A
        assert backward_order(B.T @ B, 3, 0.0)[0].tolist() == order.tolist()
        C = scale * near
        with pytest.raises(ValueError, match="singular"):
            backward_order(C.T @ C, 3, 0.0)


def test_selectors_accept_the_extreme_sizes() -> None:
    g = torch.Generator().manual_seed(12)
    A = torch.randn(12, 5, generator=g, dtype=torch.float64)
    H, lam = A.T @ A, 0.1
    order, costs = backward_order(H, 0, lam)
    assert order.numel() == 0 and costs.numel() == 0
    order, costs = backward_order(H, 5, lam)  # dropping everything: E goes from E(all) to Σ‖a_t‖²
    assert sorted(order.tolist()) == list(range(5))
    assert float(costs.sum()) == pytest.approx(
        float((A * A).sum()) - brute_error(A, list(range(5)), lam), rel=1e-9
    )
    assert forward_order(H, 0, lam).numel() == 0
    w = A.T.reshape(5, 3, 2, 2)
    for name in sorted(SELECTORS):
        none = SELECTORS[name][1](w, 0)
        assert none.kept.numel() == 0 and sorted(none.dropped.tolist()) == list(range(5))
        assert none.coeffs.shape == (5, 0)
        every = SELECTORS[name][1](w, 5)
        assert every.kept.tolist() == list(range(5)) and every.dropped.numel() == 0
        assert every.coeffs.shape == (0, 5)


def test_ls_coefficients_on_a_singular_gram_are_the_minimum_norm_fit() -> None:
    g = torch.Generator().manual_seed(13)
    A = torch.randn(10, 6, generator=g, dtype=torch.float64)
    A[:, 2] = 0.0  # a zero filter
    A[:, 4] = A[:, 1]  # and a duplicate: the kept Gram is exactly singular
    H = A.T @ A
    kept, dropped = [0, 1, 2, 4], [3, 5]
    coeffs = ls_coefficients(H, kept, dropped, 0.0)
    torch.testing.assert_close(coeffs, explicit_ridge(A, kept, dropped, 0.0), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(coeffs[:, 2], torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)  # no weight
    torch.testing.assert_close(coeffs[:, 1], coeffs[:, 3])  # the twins share the weight
    # nothing to rebuild: an empty coefficient matrix, singular or not
    assert ls_coefficients(H, kept, [], 0.0).shape == (0, 4)


def somp_reference(A: torch.Tensor, n: int, lam: float, pool: list[int], targets: list[int]) -> list[int]:
    """Simultaneous OMP written out: refit the targets on the picks (numpy ridge solve), take the
    explicit residuals, pick the pool filter with the largest ``Σ_t ⟨a_p, r_t⟩² / ‖a_p‖²``."""
    picks: list[int] = []
    for _ in range(n):
        R = A[:, targets]
        if picks:
            R = R - A[:, picks] @ explicit_ridge(A, picks, targets, lam).T
        scores = {p: float(((A[:, p] @ R) ** 2).sum() / (A[:, p] @ A[:, p])) for p in pool if p not in picks}
        picks.append(max(scores, key=scores.get))
    return picks


@pytest.mark.parametrize("ridge", [0.0, 0.5])
@pytest.mark.parametrize("subset", [False, True])
def test_omp_picks_follow_the_explicit_residual_correlations(ridge: float, subset: bool) -> None:
    g = torch.Generator().manual_seed(14)
    A = torch.randn(12, 9, generator=g, dtype=torch.float64)
    A = A * torch.exp(torch.randn(9, generator=g, dtype=torch.float64))  # filters of unequal norms
    H = A.T @ A
    lam = ridge_value(H, ridge)
    pool = [0, 2, 3, 5, 7, 8] if subset else list(range(9))
    targets = [1, 2, 4, 6, 8] if subset else list(range(9))
    picks = forward_order(H, len(pool), lam, pool=pool, targets=targets)
    assert picks.tolist() == somp_reference(A, len(pool), lam, pool, targets)


def test_omp_at_zero_ridge_keeps_picking_after_an_exactly_spanned_filter() -> None:
    # filters e1, 2·e1, 3·e1, e2: after e1 and e2 the multiples of e1 are exactly spanned
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    H = filter_gram(w)
    assert sorted(forward_order(H, 4, 0.0).tolist()) == [0, 1, 2, 3]
    assert sorted(SELECTORS["omp"][0](H, 4, 0.0).tolist()) == [0, 1, 2, 3]
    sel = select_omp(w, 4, ridge=0.0)
    assert sel.kept.tolist() == [0, 1, 2, 3] and sel.dropped.numel() == 0
