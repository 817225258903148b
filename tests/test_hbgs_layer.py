"""HBGS / HBGTS ``layer.py``: the pool's limits, the fit without reselect, the layer error's
edge cases."""

from __future__ import annotations

import pytest
import torch
from _hbgs_support import explicit_ridge


def _unit(w: torch.Tensor, n_max: int, selector: str = "omp", **kw):
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    H = filter_gram(w)
    lam = kw.pop("lam", ridge_value(H, 1e-2))
    drop_order = kw.pop("drop_order", SELECTORS[selector][0])
    return UnitState("c", ("c",), w.shape[0], n_max, H, lam, fold=kw.pop("fold", True), drop_order=drop_order, **kw)


@pytest.mark.parametrize("selector", ["omp", "backward"])
@pytest.mark.parametrize(
    ("n_max", "allowances", "n_left"),
    [(6, [5, 3, 1], 1), (5, [5, 3, 1], 1), (3, [3, 1], 3)],
    ids=["every-filter", "all-but-one", "three"],
)
def test_a_unit_stops_at_n_max_and_always_keeps_one_filter(selector, n_max, allowances, n_left):
    """Moves of at most 2 filters until nothing more may go: the unit loses at most ``n_max``
    filters and never its last one, and then its selector proposes nothing."""
    w = torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    state = _unit(w, n_max, selector)
    seen = []
    while state.allowance() > 0:
        seen.append(state.allowance())
        b = min(2, state.allowance())
        drop = state.drop_set(b).tolist()
        assert len(drop) == b and set(drop) <= set(state.pool.tolist())
        state.apply(b)
    assert seen == allowances
    assert state.pool.numel() == n_left and state.removed == 6 - n_left
    assert state.order.numel() == 0 and state.drop_set(1).numel() == 0


@pytest.mark.parametrize("reselect", [True, False])
def test_a_selector_ranking_the_whole_pool_is_asked_for_and_held_to_the_allowance(reselect):
    """The selector is asked for ``min(n_max − removed, |pool| − 1)`` filters; one that returns
    a longer order (here every filter of the pool, smallest norm first) still cannot take the
    unit past ``n_max``."""
    w = torch.randn(8, 2, 3, 3, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    calls = []

    def by_norm(H, n_drop, lam, pool, targets):
        calls.append((n_drop, pool.tolist(), targets.tolist()))
        return pool[torch.argsort(torch.diagonal(H)[pool])]

    state = _unit(w, 3, drop_order=by_norm, reselect=reselect)
    norms = w.reshape(8, -1).norm(dim=1)
    assert state.allowance() == 3
    assert state.drop_set(2).tolist() == torch.argsort(norms)[:2].tolist()
    state.apply(2)
    assert state.allowance() == 1
    state.apply(1)
    assert state.allowance() == 0 and state.removed == 3
    assert state.removed_set().tolist() == sorted(torch.argsort(norms)[:3].tolist())
    full = list(range(8))
    if reselect:  # asked again after every move, on the remaining pool
        p2 = [k for k in full if k not in torch.argsort(norms)[:2].tolist()]
        p3 = [k for k in full if k not in torch.argsort(norms)[:3].tolist()]
        assert calls == [(3, full, full), (1, p2, p2), (0, p3, p3)]
    else:  # asked once, when the state is built
        assert calls == [(3, full, full)]


@pytest.mark.parametrize("fold", [True, False])
def test_without_reselect_a_rebuilt_unit_refits_only_the_filters_dropped_since(fold):
    """A state rebuilt on a pool from an earlier search (filters 0 and 1 already gone), with
    reselect off: the representation of every original channel after the next moves is the
    identity on the kept channels, the ridge fit from the kept filters (or nothing, for a unit
    that cannot be folded) for the filters dropped since the rebuild, and nothing for the
    filters that were gone before it."""
    w = torch.randn(10, 3, 3, 3, generator=torch.Generator().manual_seed(22), dtype=torch.float64)
    state = _unit(w, 7, "backward", pool=torch.arange(2, 10), reselect=False, fold=fold)
    lam = state.lam
    assert not {0, 1} & set(state.order.tolist())

    def expected(S, R):
        M = torch.zeros(10, len(S), dtype=torch.float64)
        for j, k in enumerate(S):
            M[k, j] = 1.0
        if fold:
            M[R] = explicit_ridge(w, S, R, lam)
        return M

    state.apply(2)
    for b in (1, 3):
        S = state.kept(b).tolist()
        R = sorted(set(range(2, 10)) - set(S))  # dropped since the rebuild: this move's and the pending ones
        assert len(R) == 2 + b
        torch.testing.assert_close(state.combination(b), expected(S, R), rtol=1e-7, atol=1e-9)
    state.apply(3)
    S = state.pool.tolist()
    R = sorted(set(range(2, 10)) - set(S))
    torch.testing.assert_close(state.T[:, S], expected(S, R), rtol=1e-7, atol=1e-9)


def test_a_unit_rebuilt_from_its_pool_order_and_T_continues_the_same_search():
    """The state's public fields are enough to continue: a copy built from ``pool``, ``order``
    and ``T`` proposes the same candidates; ``kept()`` and ``combination()`` without a block
    are the current pool and ``T[:, pool]``."""
    from prunebench.criteria.hbgs.layer import UnitState

    w = torch.randn(9, 4, 3, 3, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    first = _unit(w, 6)
    first.apply(2)
    copy_ = UnitState("c", ("c",), 9, 6, first.H, first.lam, fold=True, drop_order=first.drop_order,
                      pool=first.pool.clone(), order=first.order.clone(), T=first.T.clone())
    for state in (first, copy_):
        assert state.kept().tolist() == first.pool.tolist()
        torch.testing.assert_close(state.combination(), first.T[:, first.pool], rtol=0, atol=0)
    for b in (1, 2, 4):
        assert copy_.kept(b).tolist() == first.kept(b).tolist()
        torch.testing.assert_close(copy_.combination(b), first.combination(b), rtol=0, atol=0)


def test_layer_error_is_scale_free_zero_when_exact_and_zero_without_original_signal():
    """``‖Y_orig − Ŷ‖ / ‖Y_orig‖`` from explicit outputs at two scales (the Grams' total energy
    above and below 1); exactly 0 when the current outputs are the original ones and nothing is
    dropped; 0 (not NaN or inf) for a unit whose original outputs vanish."""
    g = torch.Generator().manual_seed(24)
    w = torch.randn(6, 5, generator=g, dtype=torch.float64)
    y_orig = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y_cur = y_orig + 0.05 * torch.randn(40, 6, generator=g, dtype=torch.float64)
    state = _unit(w, 5)
    state.apply(1)
    S0 = state.pool.tolist()
    errors = []
    for scale in (1.0, 1e-3):
        yo, yc = scale * y_orig, scale * y_cur
        state.A, state.B, state.C = yo.T @ yo, yc.T @ yo, yc.T @ yc
        assert 0 < float(torch.diagonal(state.A).sum()) < 1 or scale == 1.0
        rebuilt = yc[:, S0] @ state.T[:, S0].T
        direct = float((yo - rebuilt).norm() / yo.norm())
        assert state.layer_error() == pytest.approx(direct, rel=1e-9)
        assert state.layer_error(0) == pytest.approx(direct, rel=1e-9)
        errors.append(state.layer_error(2))
    assert errors[1] == pytest.approx(errors[0], rel=1e-9) and errors[0] > 0

    fresh = _unit(w, 5)
    fresh.A = fresh.B = fresh.C = y_orig.T @ y_orig
    assert fresh.layer_error() == pytest.approx(0.0, abs=1e-7)
    fresh.A = fresh.B = torch.zeros(6, 6, dtype=torch.float64)
    fresh.C = y_cur.T @ y_cur
    assert fresh.layer_error() == 0.0 and fresh.layer_error(2) == 0.0
