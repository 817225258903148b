"""HBGS / HBGTS: the paper's variants, selector re-runs, chained compensation and the layer
error, checked against brute force and explicit fits (Pezeshki et al., TMLR 2024)."""

from __future__ import annotations

import pytest
import torch
from _hbgs_support import SmallCNN, brute_backward, check_allocation, explicit_ridge, make_ctx, randomise_bn

from prunebench.criteria.hbgs import HBGS, HBGSB, HBGTS, HBGTSB
from prunebench.errors import ConfigError


def test_registered_names_follow_the_paper():
    from prunebench import registry

    assert {n: registry.criteria.get(n)().params.selector for n in ("hbgs", "hbgs-b", "hbgts", "hbgts-b")} == {
        "hbgs": "omp", "hbgs-b": "backward", "hbgts": "omp", "hbgts-b": "backward",
    }
    assert registry.criteria.get("hbgs") is HBGS and registry.criteria.get("hbgts-b") is HBGTSB
    assert HBGSB.objective == "layer" and HBGTSB.objective == "output"


def test_the_selector_runs_again_on_the_remaining_filters_after_every_move():
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64)
    w[6] = 0.9 * w[2] + 0.1 * w[3]  # near-duplicates make the orders differ
    H = filter_gram(w)
    lam = ridge_value(H, 1e-4)
    state = UnitState("c", ("c",), 12, 10, H, lam, fold=True, drop_order=SELECTORS["backward"][0])
    kept = list(range(12))
    for _ in range(3):  # three moves of two filters: each one is a fresh selection on the kept pool
        expected = brute_backward(H, kept, 2, lam)
        assert state.drop_set(2).tolist() == expected
        state.apply(2)
        kept = [k for k in kept if k not in expected]
        assert state.pool.tolist() == kept
    # a single order computed once with all original filters as targets is not the same search
    once = SELECTORS["backward"][0](H, 6, lam, pool=torch.arange(12), targets=torch.arange(12))
    assert sorted(once.tolist()) != sorted(set(range(12)) - set(kept))


def test_chained_compensation_rebuilds_dropped_filters_from_the_kept_ones():
    from prunebench.criteria._selection import SELECTORS, filter_gram
    from prunebench.criteria.hbgs.layer import UnitState

    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mix = torch.randn(10, 4, generator=g, dtype=torch.float64)
    w = mix @ base  # ten filters in a 4-dimensional span: six can go without any error
    state = UnitState("c", ("c",), 10, 9, filter_gram(w), 0.0, fold=True, drop_order=SELECTORS["omp"][0])
    for _ in range(3):
        state.apply(2)
    removed, kept, coeffs = state.coefficients()
    assert removed.numel() == 6
    torch.testing.assert_close(coeffs @ w[kept], w[removed], rtol=0, atol=1e-8)


def test_layer_error_equals_its_definition_on_explicit_outputs():
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y_orig = torch.randn(50, 8, generator=g, dtype=torch.float64)  # [positions, channels]
    y_cur = y_orig + 0.3 * torch.randn(50, 8, generator=g, dtype=torch.float64)  # upstream drops changed it
    H = filter_gram(w)
    state = UnitState("c", ("c",), 8, 7, H, ridge_value(H, 1e-4), fold=True, drop_order=SELECTORS["omp"][0])
    state.A, state.B, state.C = y_orig.T @ y_orig, y_cur.T @ y_orig, y_cur.T @ y_cur
    state.apply(2)
    for b in (0, 1, 3):
        S, M = state.kept(b), state.combination(b)
        rebuilt = y_cur[:, S] @ M.T  # every original channel from the kept ones of the current network
        direct = float((y_orig - rebuilt).norm() / y_orig.norm())
        assert state.layer_error(b) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("cache", [True, False])
def test_hbgs_grams_follow_the_pruned_network_upstream(cache, monkeypatch):
    """After a move upstream, a later unit's Grams are those of the working copy's actual outputs
    (with the unpruned network's outputs kept in memory, or recomputed after every move)."""
    import prunebench.criteria.hbgs.search as search_mod
    from prunebench.criteria.hbgs.search import Search

    if not cache:
        monkeypatch.setattr(search_mod, "REFERENCE_CACHE_BYTES", 0)

    torch.manual_seed(9)
    model = SmallCNN().eval()
    randomise_bn(model)
    ctx = make_ctx(model, 0.5, n_images=40)
    search = Search(HBGS().params, "layer", "hbgs", model, ctx)
    search.steps, search.scores = 0, {}
    search.build_units()
    assert (search.reference_outputs is not None) == cache
    before = search.units["conv3"].C.clone()
    search.apply("conv1", 5)
    y: dict[str, list[torch.Tensor]] = {"cur": [], "org": []}
    hooks = [search.work.model.conv3.register_forward_hook(lambda m, i, o: y["cur"].append(o)),
             search.original.conv3.register_forward_hook(lambda m, i, o: y["org"].append(o))]
    with torch.no_grad():
        for x in search.chunks:
            search.work.model(x)
            search.original(x)
    for h in hooks:
        h.remove()
    cur = torch.cat([o.transpose(0, 1).reshape(16, -1) for o in y["cur"]], 1).double()
    org = torch.cat([o.transpose(0, 1).reshape(16, -1) for o in y["org"]], 1).double()
    unit = search.units["conv3"]
    torch.testing.assert_close(unit.C, cur @ cur.T, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(unit.B, cur @ org.T, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(unit.A, org @ org.T, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(unit.C, before)  # upstream pruning counts
    assert unit.layer_error(0) > 0  # the unpruned conv3 no longer reproduces its original output


@pytest.mark.parametrize("output", ["logits", "last_bn"])
def test_hbgts_outputs(output):
    torch.manual_seed(10)
    model = SmallCNN().eval()
    randomise_bn(model)
    ctx = make_ctx(model, 0.3)
    kept = HBGTS.from_kwargs(output=output).allocate(model, ctx)
    check_allocation(model, ctx, kept)
    with pytest.raises(ConfigError, match="Did you mean 'last_bn'"):
        HBGTS.from_kwargs(output="last_nb")


def test_without_reselect_one_order_and_a_direct_fit():
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 5, 3, 3, generator=g, dtype=torch.float64)
    w[6] = 0.9 * w[2] + 0.1 * w[3]
    H = filter_gram(w)
    lam = ridge_value(H, 1e-4)
    once = SELECTORS["backward"][0](H, 10, lam, pool=torch.arange(12), targets=torch.arange(12))
    state = UnitState("c", ("c",), 12, 10, H, lam, fold=True, drop_order=SELECTORS["backward"][0], reselect=False)
    for _ in range(3):
        state.apply(2)
    assert state.removed_set().tolist() == sorted(once[:6].tolist())
    removed, kept, coeffs = state.coefficients()
    torch.testing.assert_close(coeffs, explicit_ridge(w, kept, removed, lam), rtol=1e-7, atol=1e-9)
    # the search with reselect off runs end to end too
    torch.manual_seed(11)
    model = SmallCNN().eval()
    randomise_bn(model)
    ctx = make_ctx(model, 0.3)
    check_allocation(model, ctx, HBGTS.from_kwargs(reselect=False, lazy=True).allocate(model, ctx))


def test_one_move_folds_the_dropped_filters_by_an_explicit_ridge_fit():
    """With reselect, a move's coefficients are the ridge fit of the dropped filters from the
    kept ones; the second move chains them: ``T[:, S] += T[:, D] C``."""
    from prunebench.criteria._selection import SELECTORS, filter_gram, ridge_value
    from prunebench.criteria.hbgs.layer import UnitState

    g = torch.Generator().manual_seed(4)
    w = torch.randn(9, 4, 3, 3, generator=g, dtype=torch.float64)
    H = filter_gram(w)
    lam = ridge_value(H, 1e-2)
    state = UnitState("c", ("c",), 9, 8, H, lam, fold=True, drop_order=SELECTORS["omp"][0])
    d1 = state.drop_set(2).tolist()
    state.apply(2)
    s1 = state.pool.tolist()
    removed, kept, coeffs = state.coefficients()
    assert removed.tolist() == sorted(d1) and kept.tolist() == s1
    c1 = explicit_ridge(w, s1, removed, lam)
    torch.testing.assert_close(coeffs, c1, rtol=1e-7, atol=1e-9)
    d2 = state.drop_set(1).tolist()
    state.apply(1)
    s2 = state.pool.tolist()
    c2 = explicit_ridge(w, s2, d2, lam)  # [1, |S2|]
    at = {k: j for j, k in enumerate(s1)}
    expected = torch.zeros(9, len(s2), dtype=torch.float64)  # T[:, S2] after both moves
    for j, k in enumerate(s2):
        expected[k, j] = 1.0
        expected[removed, j] = c1[:, at[k]] + c1[:, at[d2[0]]] * c2[0, j]
    expected[d2[0]] = c2[0]
    torch.testing.assert_close(state.T[:, s2], expected, rtol=1e-7, atol=1e-9)
