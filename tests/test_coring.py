"""CORING: HOSVD mode vectors, distances, greedy ranking, errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorly as tl
import torch
from torch import nn

from prunebench.criteria._greedy import greedy_redundancy_scores
from prunebench.criteria.coring import (
    DISTANCES,
    Coring,
    filter_distance_matrix,
    hosvd_mode_vectors,
)
from prunebench.errors import ConfigError
from prunebench.protocols import ScoreCriterion


def _conv(cin: int, cout: int, k: int = 3, groups: int = 1, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False)


def _lowest(scores: torch.Tensor) -> int:
    return int(torch.argmin(scores))


# ----------------------------------------------------------------------------- references
def _reference_greedy(dist: np.ndarray) -> list[int]:
    """Brute force: scan every remaining pair, recompute row sums from scratch.

    The member removed is the one with the smaller sum of distances to the other remaining
    filters; on a tie the row of the pair (its lower index) goes, as the authors' compare_sum.
    """
    n = dist.shape[0]
    dist = 0.5 * (dist + dist.T)
    alive = list(range(n))
    scores = [0] * n
    step = 0
    while len(alive) > 1:
        best, pair = None, None
        for a in alive:  # row-major scan, first strict minimum wins
            for b in alive:
                if a != b and (best is None or dist[a, b] < best):
                    best, pair = dist[a, b], (a, b)
        row, col = pair  # the first minimum in row-major order: row < col
        s_row = sum(dist[row, k] for k in alive if k not in (row, col))
        s_col = sum(dist[col, k] for k in alive if k not in (row, col))
        r = col if s_row > s_col else row
        scores[r] = step
        step += 1
        alive.remove(r)
    scores[alive[0]] = n - 1
    return scores


def _reference_mode_vectors(weight: np.ndarray, rank: int = 1) -> list[np.ndarray]:
    """Per-filter loop: tensorly unfold + numpy SVD, largest-|entry| positive.

    Each mode of size > 1 of every filter gives its leading ``rank`` left singular vectors
    (fewer when the unfolding has fewer columns), concatenated first vector first.
    """
    out = []
    for mode in range(weight.ndim - 1):
        if weight.shape[1 + mode] == 1:
            continue
        rows = []
        for f in weight:
            u = np.linalg.svd(tl.unfold(tl.tensor(f), mode), full_matrices=False)[0]
            cols = [u[:, j] * (1.0 if u[np.argmax(np.abs(u[:, j])), j] >= 0 else -1.0)
                    for j in range(min(rank, u.shape[1]))]
            rows.append(np.concatenate(cols))
        out.append(np.stack(rows))
    return out


def _reference_distance(a: np.ndarray, b: np.ndarray, distance: str) -> float:
    if distance == "euclidean":
        return float(np.linalg.norm(a - b))
    if distance == "cosine":
        return 1.0 - abs(float(a @ b)) / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.var(a - b) / (np.var(a) + np.var(b)))


def _reference_distance_matrix(weight: np.ndarray, distance: str, rank: int = 1) -> np.ndarray:
    """Mean over the non-trivial modes of the pairwise distance, one pair at a time."""
    vecs = _reference_mode_vectors(weight, rank)
    n = weight.shape[0]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                dist[i, j] = np.mean([_reference_distance(v[i], v[j], distance) for v in vecs])
    return dist


def _off_diagonal(d: torch.Tensor) -> np.ndarray:
    """The matrix with its diagonal zeroed: the ranking ignores it, and the Gram-form
    Euclidean distance of a vector to itself is sqrt(rounding), about 1e-8, not 0."""
    return d.numpy() * (1.0 - np.eye(d.shape[0]))


# ----------------------------------------------------------------------------- behaviour
def test_plugin_metadata_and_defaults():
    assert issubclass(Coring, ScoreCriterion)
    assert Coring.name == "coring"
    assert Coring.needs_data is False
    assert Coring.summary and "Neural Networks" in Coring.reference
    c = Coring()
    assert c.params.rank == 1 and c.params.distance == "vbd"
    assert Coring.from_kwargs(rank="2", distance="cosine").params.rank == 2


@pytest.mark.parametrize("distance", DISTANCES)
def test_identical_filters_one_is_removed_first(distance):
    model = nn.Sequential(_conv(4, 10))
    with torch.no_grad():
        model[0].weight[7] = model[0].weight[2]
    s = Coring.from_kwargs(distance=distance).scores(model, ["0"], None)["0"]
    assert _lowest(s) in (2, 7)


@pytest.mark.parametrize("distance", DISTANCES)
def test_negated_copy_counts_as_identical(distance):
    model = nn.Sequential(_conv(4, 10, seed=1))
    with torch.no_grad():
        model[0].weight[6] = -model[0].weight[1]
    d = filter_distance_matrix(model[0].weight, distance=distance)
    assert float(d[1, 6]) < 1e-6
    off = d + torch.eye(10, dtype=d.dtype) * 1e9
    assert float(off[1, 6]) == pytest.approx(float(off.min()), abs=1e-12)
    s = Coring.from_kwargs(distance=distance).scores(model, ["0"], None)["0"]
    assert _lowest(s) in (1, 6)


@pytest.mark.parametrize("distance", DISTANCES)
def test_arbitrary_svd_signs_do_not_change_distances(distance, monkeypatch):
    # Any SVD routine may return (-u, -v) instead of (u, v): flip the signs of every other
    # filter's singular vectors and check that nothing changes.
    w = _conv(4, 10, seed=2).weight
    with torch.no_grad():
        w[7] = -w[2]
    expected = filter_distance_matrix(w, distance=distance)
    original = torch.linalg.svd

    def flipped_svd(a, full_matrices=True):
        u, s, vh = original(a, full_matrices=full_matrices)
        flip = torch.ones(a.shape[0], 1, 1, dtype=u.dtype)
        flip[1::2] = -1.0
        return torch.return_types.linalg_svd((u * flip, s, vh * flip))

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    got = filter_distance_matrix(w, distance=distance)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    assert float(got[2, 7]) < 1e-6


def test_sign_fix_makes_largest_entry_positive():
    w = _conv(5, 7).weight
    for rank in (1, 2):
        for v in hosvd_mode_vectors(w, rank=rank):
            d = v.shape[1] // rank
            for block in v.reshape(v.shape[0], rank, d).reshape(-1, d):
                assert block[block.abs().argmax()] > 0


def test_mode_vectors_match_tensorly_unfold_with_numpy_svd():
    w = _conv(5, 6, seed=3).weight.detach().double()
    ours = hosvd_mode_vectors(w, rank=1)
    ref = _reference_mode_vectors(w.numpy())
    assert len(ours) == len(ref) == 3
    for a, b in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-10)


def test_rank_two_concatenates_vectors_per_mode():
    w = _conv(5, 6).weight
    vs = hosvd_mode_vectors(w, rank=2)
    assert [v.shape for v in vs] == [torch.Size([6, 10]), torch.Size([6, 6]), torch.Size([6, 6])]
    s = Coring.from_kwargs(rank=2).scores(nn.Sequential(_conv(5, 6)), ["0"], None)["0"]
    assert sorted(s.tolist()) == list(range(6))


class _Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 12, 1)
        self.depthwise = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.grouped = nn.Conv2d(12, 6, (3, 1), padding=(1, 0), groups=3)
        self.dw1x1 = nn.Conv2d(6, 6, 1, groups=6)

    def forward(self, x):
        return self.dw1x1(self.grouped(self.depthwise(self.point(self.stem(x)))))


@pytest.mark.parametrize("distance", DISTANCES)
def test_one_score_per_output_channel_for_every_conv(distance):
    torch.manual_seed(0)
    model = _Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    s = Coring.from_kwargs(distance=distance).scores(model, names, None)
    assert set(s) == set(names)
    modules = dict(model.named_modules())
    for name in names:
        n = modules[name].out_channels
        assert s[name].shape == (n,)
        assert torch.isfinite(s[name]).all()
        assert sorted(s[name].tolist()) == list(range(n))  # a strict ranking
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("n", [2, 3, 9, 40])
@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_greedy_equals_brute_force(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, n, generator=g, dtype=torch.float64)
    dist = a + a.T
    ours = greedy_redundancy_scores(dist).long().tolist()
    assert ours == _reference_greedy(dist.numpy())


def test_greedy_prefers_member_closer_to_the_rest():
    # 0 and 1 are the closest pair; 1 is closer to the rest (2, 3) than 0 is, so 1 goes first.
    # Then (2, 3) is closest; 2 is closer to the remaining 0, so 2 goes next; then 0 vs 3
    # tie on row sums and the lower index (0) goes.
    d = torch.tensor([[0.0, 0.1, 5.0, 6.0], [0.1, 0.0, 1.0, 1.0], [5.0, 1.0, 0.0, 3.0], [6.0, 1.0, 3.0, 0.0]])
    s = greedy_redundancy_scores(d)
    assert int(torch.argmin(s)) == 1
    assert s.tolist() == [2.0, 0.0, 1.0, 3.0]


def test_tie_removes_the_lower_index_as_the_authors_compare_sum():
    # filters 1 and 3 are exact duplicates, 0 and 2 are far from everything: the pair (1, 3)
    # is closest and its members have equal sums, so 1 (the lower index) is removed first
    base = torch.tensor([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0], [1.0, 0.0]], dtype=torch.float64)
    d = torch.cdist(base, base)
    s = greedy_redundancy_scores(d)
    assert int(torch.argmin(s)) == 1
    assert s.tolist() == _reference_greedy(d.numpy())


@pytest.mark.parametrize("distance", DISTANCES)
def test_end_to_end_equals_numpy_reference(distance):
    w = _conv(6, 14, seed=5).weight.detach().double()
    vecs = _reference_mode_vectors(w.numpy())
    n = w.shape[0]
    dist = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                dist[i, j] = np.mean([_reference_distance(v[i], v[j], distance) for v in vecs])
    model = nn.Sequential(nn.Conv2d(6, 14, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(w)
    ours = Coring.from_kwargs(distance=distance).scores(model, ["0"], None)["0"].long().tolist()
    assert ours == _reference_greedy(dist)


def test_unknown_distance_is_a_config_error_with_suggestion():
    with pytest.raises(ConfigError, match="Did you mean 'vbd'"):
        Coring.from_kwargs(distance="vdb")
    with pytest.raises(ConfigError, match="unknown distance"):
        Coring(Coring.Params(distance="manhattan"))


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_rank_rejected_at_construction(rank):
    with pytest.raises(ConfigError, match="rank"):
        Coring.from_kwargs(rank=rank)


def test_too_large_rank_names_layer_and_mode_sizes():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3))
    with pytest.raises(ConfigError) as exc:
        Coring.from_kwargs(rank=4).scores(model, ["0", "1"], None)
    msg = str(exc.value)
    assert "'0'" in msg and "(3, 3, 3)" in msg and "rank <= 3" in msg


def test_rank_larger_than_depthwise_kernel_rejected():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8))
    with pytest.raises(ConfigError, match=r"1 x 3 x 3"):
        Coring.from_kwargs(rank=4).scores(model, ["0"], None)


def test_rank_above_one_on_1x1_conv_uses_the_single_vector():
    # the 16 x 1 channel unfolding of a 1x1 filter has one singular vector: rank 2 uses it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 8, 1))
    vs = hosvd_mode_vectors(model[0].weight, rank=2)
    assert [v.shape for v in vs] == [torch.Size([8, 16])]
    s1 = Coring.from_kwargs(rank=1).scores(model, ["0"], None)["0"]
    s2 = Coring.from_kwargs(rank=2).scores(model, ["0"], None)["0"]
    assert torch.equal(s1, s2)


def test_unknown_layer_and_non_conv_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match="no module"):
        Coring().scores(model, ["conv9"], None)
    with pytest.raises(ConfigError, match="Linear"):
        Coring().scores(model, ["2"], None)


@pytest.mark.parametrize("params", [{}, {"distance": "cosine", "rank": 2}])
def test_contract_through_the_harness(params):
    from prunebench.testing import check_criterion

    report = check_criterion(Coring, params)
    assert report["criterion"] == "coring" and report["kind"] == "score"


def test_metadata_and_messages_are_exact():
    import dataclasses
    import re

    from prunebench.criteria.coring import filter_distance_matrix

    assert Coring.summary == (
        "CORING: HOSVD mode vectors of each filter; prune the more redundant of the closest pairs"
    )
    assert Coring.reference == (
        "Pham, Zniyed, Nguyen, 'Efficient tensor decomposition-based filter pruning', Neural Networks 2024"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        Coring().params.rank = 2

    def raises(message: str):
        return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")

    with raises("coring expects a conv weight [N, C, k, k]; layer 'x' has (4,)"):
        hosvd_mode_vectors(torch.randn(4), layer="x")
    with raises(
        "coring: HOSVD rank 4 is larger than mode 1 of layer '0': its filters are 3 x 3 x 3 (mode sizes "
        "(3, 3, 3)). Use rank <= 3 (rank 1, the paper's setting, works for every layer)."
    ):
        Coring.from_kwargs(rank=4).scores(nn.Sequential(nn.Conv2d(3, 8, 3)), ["0"], None)
    with raises("unknown coring distance 'vdb'. Did you mean 'vbd'?"):
        filter_distance_matrix(torch.randn(4, 3, 3, 3), distance="vdb")
    with raises("coring: rank must be a positive integer, got 0"):
        Coring.from_kwargs(rank=0)
    with raises("coring: unknown distance 'cosin'. Did you mean 'cosine'? Available: vbd, euclidean, cosine"):
        Coring(Coring.Params(distance="cosin"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with raises("coring: the model has no module 'O'."):
        Coring().scores(model, ["O"], None)
    with raises("coring scores Conv2d layers; '2' is a Linear"):
        Coring().scores(model, ["2"], None)


def test_defaults_are_the_papers_rank_one_vbd():
    # callers such as benchmarks/fidelity_checks.py rely on the function defaults being the
    # criterion's (and the paper's): rank 1, VBD
    conv = _conv(5, 6, seed=4)
    w = conv.weight.detach().double()
    ref_vectors = _reference_mode_vectors(w.numpy())
    got_vectors = hosvd_mode_vectors(conv.weight)
    assert [tuple(v.shape) for v in got_vectors] == [(6, 5), (6, 3), (6, 3)]
    for a, b in zip(got_vectors, ref_vectors, strict=True):
        np.testing.assert_allclose(a.numpy(), b, atol=1e-10)
    expected = _reference_distance_matrix(w.numpy(), "vbd")
    np.testing.assert_allclose(_off_diagonal(filter_distance_matrix(conv.weight)), expected, atol=1e-10)
    np.testing.assert_allclose(_off_diagonal(Coring().distance_matrix(conv)), expected, atol=1e-10)


@pytest.mark.parametrize("rank", [2, 3])
@pytest.mark.parametrize("distance", DISTANCES)
def test_higher_rank_distances_equal_numpy_reference(distance, rank):
    # rank 3 = every mode's full size on a 3 x 3 x 3 filter (allowed); the 5 x 3 x 1 conv
    # has a 3 x 5 spatial unfolding and a 5 x 3 channel one, the 2 x 2 conv a 4 x 2 one
    for shape in [(7, 3, 3, 3), (7, 5, 3, 1), (7, 4, 2, 2)]:
        if rank > min(s for s in shape[1:] if s > 1):
            continue
        torch.manual_seed(rank)
        w = torch.randn(*shape, dtype=torch.float64)
        vectors = hosvd_mode_vectors(w, rank=rank)
        for a, b in zip(vectors, _reference_mode_vectors(w.numpy(), rank), strict=True):
            np.testing.assert_allclose(a.numpy(), b, atol=1e-10)
        got = filter_distance_matrix(w, rank=rank, distance=distance)
        np.testing.assert_allclose(_off_diagonal(got), _reference_distance_matrix(w.numpy(), distance, rank), atol=1e-10)


@pytest.mark.parametrize("distance", DISTANCES)
@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 3)], ids=["linear", "conv1d"])
def test_weights_with_fewer_modes_are_filters_of_lower_order(shape, distance):
    # a Linear weight [N, C] is N one-mode filters (its unit rows, sign-fixed), a Conv1d
    # weight [N, C, k] N two-mode ones: the same maths as a conv with size-1 modes
    torch.manual_seed(7)
    w = torch.randn(*shape, dtype=torch.float64)
    got = filter_distance_matrix(w, distance=distance)
    np.testing.assert_allclose(_off_diagonal(got), _reference_distance_matrix(w.numpy(), distance), atol=1e-10)
    if len(shape) == 2:
        rows = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
        rows *= np.sign(rows[np.arange(6), np.abs(rows).argmax(axis=1)])[:, None]
        (vectors,) = hosvd_mode_vectors(w)
        np.testing.assert_allclose(vectors.numpy(), rows, atol=1e-12)


@pytest.mark.parametrize(
    ("conv", "rank", "message"),
    [
        (
            nn.Conv2d(8, 8, 3, groups=8),
            4,
            "coring: HOSVD rank 4 is larger than mode 2 of layer '0': its filters are 1 x 3 x 3 (mode sizes "
            "(1, 3, 3)). Use rank <= 3 (rank 1, the paper's setting, works for every layer).",
        ),
        (
            nn.Conv2d(4, 8, 2),
            3,
            "coring: HOSVD rank 3 is larger than mode 2 of layer '0': its filters are 4 x 2 x 2 (mode sizes "
            "(4, 2, 2)). Use rank <= 2 (rank 1, the paper's setting, works for every layer).",
        ),
    ],
    ids=["depthwise", "2x2-kernel"],
)
def test_too_large_rank_suggests_the_smallest_non_trivial_mode(conv, rank, message):
    import re

    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        Coring.from_kwargs(rank=rank).scores(nn.Sequential(conv), ["0"], None)


@pytest.mark.parametrize(("rank", "shown"), [(True, "True"), (2.5, "2.5"), ("2", "'2'")])
def test_rank_must_be_a_real_positive_int(rank, shown):
    import re

    message = f"coring: rank must be a positive integer, got {shown}"
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        Coring(Coring.Params(rank=rank))


def test_errors_without_a_layer_name_speak_of_the_weight():
    import re

    def raises(message: str):
        return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")

    with raises("coring expects a conv weight [N, C, k, k]; the weight has (4,)"):
        hosvd_mode_vectors(torch.randn(4))
    with raises("coring expects a conv weight [N, C, k, k]; the weight has (4,)"):
        filter_distance_matrix(torch.randn(4))
    with raises(
        "coring: HOSVD rank 4 is larger than mode 1 of the weight: its filters are 3 x 3 x 3 (mode sizes "
        "(3, 3, 3)). Use rank <= 3 (rank 1, the paper's setting, works for every layer)."
    ):
        Coring.from_kwargs(rank=4).distance_matrix(nn.Conv2d(3, 8, 3))


# --- _greedy.py: the pair elimination on its own: scale, exact errors, extreme magnitudes ---
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scale", [2.0**-70, 2.0**1023], ids=["tiny", "near-float-max"])
def test_greedy_ranking_does_not_depend_on_the_unit_of_distance(seed, scale):
    # A power of two rescales exactly: the pair order and every row-sum comparison are the
    # same, so the ranking must be too, from ~1e-21 up to entries near the float64 maximum
    # (rows of 3 entries below 0.6 * 2**1023 keep every total finite).
    g = torch.Generator().manual_seed(seed)
    a = 0.3 * torch.rand(4, 4, generator=g, dtype=torch.float64)
    d = a + a.T
    d.fill_diagonal_(0.0)
    expected = _reference_greedy(d.numpy())
    assert greedy_redundancy_scores(d).long().tolist() == expected
    assert greedy_redundancy_scores(d * scale).long().tolist() == expected


def test_finite_distances_near_the_float_maximum_still_give_a_permutation():
    # (D + D^T) and the row totals overflowed to inf here: channel 0 came out removed twice.
    d = torch.full((3, 3), 1e308, dtype=torch.float64).fill_diagonal_(0.0)
    assert sorted(greedy_redundancy_scores(d).long().tolist()) == [0, 1, 2]
    d = torch.tensor([[0.0, 1.7e308, 1.0e308], [1.7e308, 0.0, 1.5e308], [1.0e308, 1.5e308, 0.0]], dtype=torch.float64)
    assert greedy_redundancy_scores(d).long().tolist() == _reference_greedy((d * 2.0**-1000).numpy())


@pytest.mark.parametrize(("distance", "message"), [
    (torch.zeros(2, 3), "expected a square distance matrix, got shape (2, 3)"),
    (torch.zeros(3), "expected a square distance matrix, got shape (3,)"),
    (torch.zeros(2, 2, 2), "expected a square distance matrix, got shape (2, 2, 2)"),
    (torch.tensor([[0.0, float("nan")], [1.0, 0.0]]), "the distance matrix contains NaN or infinite entries"),
    (torch.tensor([[0.0, 1.0], [float("inf"), 0.0]]), "the distance matrix contains NaN or infinite entries"),
], ids=["wide", "vector", "cube", "nan", "inf"])
def test_greedy_errors_are_exact(distance, message):
    import re

    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        greedy_redundancy_scores(distance)


def test_a_channel_s_distance_to_itself_adds_nothing_to_its_total():
    # Channels 0 and 1 are the closest pair and 1 has the smaller total, by 1e-17, while the
    # largest distance (between 2 and 3) is 1: a diagonal counted into the totals (1 + 3e-10
    # each) would round that difference away, tie them, and remove the lower index, 0.
    d = torch.zeros(4, 4, dtype=torch.float64)
    small = {(0, 1): 1e-10, (0, 2): 1e-10, (0, 3): 1e-10 + 1e-17, (1, 2): 1e-10, (1, 3): 1e-10}
    for (i, j), v in {**small, (2, 3): 1.0}.items():
        d[i, j] = d[j, i] = v
    scores = greedy_redundancy_scores(d).long().tolist()
    assert scores[1] == 0  # the smaller total is the more redundant: 1 goes first
    assert scores == _reference_greedy(d.numpy())
