"""ht2: hierarchical Tucker-2 / SVD factorisation (Gabor & Zdunek 2023)."""

from __future__ import annotations

import copy
import io
import json
from itertools import pairwise

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunebench.architectures.cifar_resnet import build_resnet
from prunebench.criteria._factorized import (
    Factorized,
    Spectrum,
    SVDCache,
    build_svd_conv1x1,
    check_energy,
    conv_chain_macs,
    energy_rank,
    input_sizes,
    keeps_saving,
    left_basis,
    low_rank_factors,
    module_cost,
    select_targets,
    set_module,
    spectrum,
    svd_conv,
    svd_conv1x1,
    svd_linear,
)
from prunebench.criteria.ht2 import HT2, ht2_ranks, tucker2_conv
from prunebench.errors import ConfigError
from prunebench.pipeline.metrics import count_macs
from prunebench.protocols import CompressionContext, EpochLedger, Target

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny decompositions


class Tiny(nn.Module):
    """Stem, a strided 3x3 conv, a 1x1 conv with bias, a 3x3 conv, a hidden linear, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 1)
        self.conv3 = nn.Conv2d(24, 24, 3, padding=1)
        self.hidden = nn.Linear(24, 32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv3(torch.relu(self.conv2(x))))
        x = x.mean(dim=(2, 3))
        return self.fc(torch.relu(self.hidden(x)))


def make_ctx(
    model: nn.Module, x: torch.Tensor, protected=("fc",), metric: str = "macs"
) -> CompressionContext:
    base = count_macs(model, x)
    return CompressionContext(
        example_inputs=x,
        calibration=None,
        target=Target(metric=metric, ratio=0.5),
        device=torch.device("cpu"),
        seed=0,
        prunable=[],
        protected=list(protected),
        ledger=EpochLedger(total=2.0),
        reduction=lambda m: 1.0 - count_macs(m, x) / base,
        reduction_of=lambda kept: 0.0,
        train=lambda *a, **k: None,
    )


def rebuild(fresh: nn.Module, steps: list[dict], state: dict) -> nn.Module:
    steps = json.loads(json.dumps(steps))  # the plan must be plain JSON
    for step in steps:
        assert step["op"] == "replace" and step["criterion"] == "ht2"
        original = fresh.get_submodule(step["module"])
        set_module(fresh, step["module"], HT2.rebuild_module(original, step["spec"]))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


def _randomise_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)


# ----------------------------------------------------------------------------- exactness


def test_conv_full_energy_is_exact_float64() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    fact = tucker2_conv(conv, 1.0)
    kinds = [(m.kernel_size, m.stride, m.padding) for m in fact]
    assert kinds == [
        ((1, 1), (1, 1), (0, 0)),
        ((3, 1), (2, 1), (1, 0)),
        ((1, 3), (1, 2), (0, 1)),
        ((1, 1), (1, 1), (0, 0)),
    ]
    assert fact[3].bias is not None and all(m.bias is None for m in list(fact)[:3])
    with torch.no_grad():
        torch.testing.assert_close(fact(x), conv(x), rtol=0, atol=1e-10)


def test_conv_full_energy_is_exact_float32_dilated_rectangular() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 7, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(2, 1), bias=False)
    x = torch.randn(3, 5, 12, 10)
    with torch.no_grad():
        torch.testing.assert_close(tucker2_conv(conv, 1.0)(x), conv(x), rtol=1e-4, atol=1e-5)


def test_linear_and_pointwise_full_energy_are_exact() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(12, 9).double()
    x = torch.randn(4, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(svd_linear(lin, 1.0)(x), lin(x), rtol=0, atol=1e-10)
    pw = nn.Conv2d(12, 9, 1, stride=2, padding=1).double()
    xi = torch.randn(2, 12, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(svd_conv1x1(pw, 1.0)(xi), pw(xi), rtol=0, atol=1e-10)


def test_energy_rank() -> None:
    s = torch.tensor([2.0, 1.0, 1.0, 0.0])  # squared: 4, 1, 1, 0 -> shares 2/3, 5/6, 1, 1
    assert [energy_rank(s, e) for e in (0.05, 0.6, 2 / 3, 0.7, 5 / 6, 0.9, 0.999999, 1.0)] == [
        1,
        1,
        1,
        2,
        2,
        3,
        3,
        4,
    ]
    assert energy_rank(torch.zeros(3), 0.5) == 1
    # a threshold hit exactly counts (rounding slack), one just above it needs the next value
    assert energy_rank(torch.ones(2), 0.5) == 1 and energy_rank(torch.ones(2), 0.5 + 1.5e-12) == 2


@pytest.mark.parametrize("shape", [(6, 20), (20, 6), (3, 7, 9)])
def test_spectrum_matches_svd_and_truncation_is_optimal(shape: tuple[int, ...]) -> None:
    torch.manual_seed(8)
    m = torch.randn(*shape, dtype=torch.float64)
    spec = spectrum(m)
    torch.testing.assert_close(spec.values, torch.linalg.svdvals(m), rtol=1e-10, atol=1e-10)
    if m.dim() == 2:
        s = spec.values
        for rank in (1, 3, min(shape)):
            a, b = low_rank_factors(spec, rank)
            assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
            # Eckart-Young: the error is exactly the discarded energy; scales are balanced
            err = torch.linalg.matrix_norm(m - a @ b) ** 2
            torch.testing.assert_close(err, (s[rank:] ** 2).sum(), rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(a.norm(dim=0), b.norm(dim=1), rtol=1e-8, atol=1e-10)


def test_decompositions_are_cached_per_weight() -> None:
    cache = SVDCache(max_keys=2)
    w = torch.randn(4, 5)
    calls: list[str] = []

    def compute(tag: str):
        calls.append(tag)
        return torch.ones(1)

    cache.get("a", w, "k1", lambda: compute("k1"))
    cache.get("a", w.clone(), "k1", lambda: compute("k1"))  # same values: reused
    assert calls == ["k1"]
    cache.get("a", w, "k2", lambda: compute("k2"))
    cache.get("a", w, "k1", lambda: compute("k1"))  # k1 used last: k2 is the one dropped
    cache.get("a", w, "k3", lambda: compute("k3"))
    cache.get("a", w, "k1", lambda: compute("k1"))
    assert calls == ["k1", "k2", "k3"]
    cache.get("a", w, "k2", lambda: compute("k2"))  # dropped to keep two keys: recomputed
    assert calls == ["k1", "k2", "k3", "k2"]
    cache.get("a", w + 1, "k1", lambda: compute("k1"))  # changed weight: recomputed
    assert calls == ["k1", "k2", "k3", "k2", "k1"]
    # by default four keys per layer are kept
    cache, calls = SVDCache(), []
    for key in range(5):
        cache.get("a", w, key, lambda key=key: compute(key))
    for key in (4, 3, 2, 1):
        cache.get("a", w, key, lambda key=key: compute(key))
    assert calls == [0, 1, 2, 3, 4]
    cache.get("a", w, 0, lambda: compute(0))  # the least recently used one went
    assert calls == [0, 1, 2, 3, 4, 0]


def test_conv_and_linear_subclasses_are_left_alone() -> None:
    class Standardised(nn.Conv2d):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), Standardised(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(4, 4, 3)
    )
    assert select_targets(model) == ["3"]
    assert select_targets(model, include_first=True) == ["0", "3"]


# ----------------------------------------------------------------------------- ranks and cost


def test_ranks_shrink_monotonically_as_energy_drops() -> None:
    torch.manual_seed(3)
    for conv in (nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(32, 16, 3, stride=2, padding=1)):
        ranks = [ht2_ranks(conv, e) for e in (1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.1, 0.05)]
        assert ranks[0] == (
            conv.in_channels,
            min(conv.in_channels * 3, conv.out_channels * 3),
            conv.out_channels,
        )
        for hi, lo in pairwise(ranks):
            assert all(b <= a for a, b in zip(hi, lo, strict=True)), ranks
        assert ranks[-1] < ranks[0]
    lin = nn.Linear(40, 30)
    lin_ranks = [svd_linear(lin, e)[0].out_features for e in (1.0, 0.9, 0.7, 0.5, 0.2)]
    assert lin_ranks == sorted(lin_ranks, reverse=True) and lin_ranks[0] == 30


def test_macs_equal_analytic_sum_of_four_convs() -> None:
    torch.manual_seed(4)
    c, t, h, w = 16, 20, 12, 10
    conv = nn.Conv2d(c, t, 3, stride=2, padding=1, bias=True)
    model = nn.Sequential(conv)
    x = torch.randn(1, c, h, w)
    ho, wo = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    assert count_macs(model, x) == t * ho * wo * (c * 9 + 1)
    fact = tucker2_conv(conv, 0.7)
    r1, r13, r3 = fact[0].out_channels, fact[1].out_channels, fact[2].out_channels
    model[0] = fact
    analytic = (
        c * r1 * h * w  # 1x1 at the input resolution
        + r1 * r13 * 3 * ho * w  # 3x1 strides the height only
        + r13 * r3 * 3 * ho * wo  # 1x3 strides the width
        + r3 * t * ho * wo
        + t * ho * wo  # bias adds
    )
    assert count_macs(model, x) == analytic


def test_transform_targets_include_stem_and_classifier_as_the_authors() -> None:
    model = Tiny()
    x = torch.randn(2, 3, 16, 16)
    ctx = make_ctx(model, x)
    assert HT2().targets(model, ctx) == ["stem", "conv1", "conv2", "conv3", "hidden", "fc"]
    narrow = HT2.from_kwargs(include_first="false", include_classifier="false")
    assert narrow.targets(model, ctx) == ["conv1", "conv2", "conv3", "hidden"]
    assert HT2.from_kwargs(include_linear="false").targets(model, ctx) == ["stem", "conv1", "conv2", "conv3"]
    steps = narrow.transform(copy.deepcopy(model), 0.3, ctx)
    assert [s["module"] for s in steps] == ["conv1", "conv2", "conv3", "hidden"]
    steps = HT2().transform(model, 0.3, ctx)
    types = {s["module"]: s["spec"]["type"] for s in steps}
    assert types["stem"] == "svd" and types["conv1"] == "tucker2" and types["conv2"] == "svd"
    assert isinstance(model.stem, Factorized) and model.stem[0].kernel_size == (3, 3)
    assert model.stem[1].kernel_size == (1, 1) and model.fc[1].out_features == 10
    assert model(x).shape == (2, 10)


def test_stem_svd_is_exact_at_full_energy_and_rebuilds() -> None:
    torch.manual_seed(11)
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    split = svd_conv(conv, 1.0)
    assert [tuple(m.weight.shape) for m in split] == [(8, 3, 3, 3), (8, 8, 1, 1)]
    torch.testing.assert_close(split(x), conv(x), rtol=0, atol=1e-10)
    low = svd_conv(conv, 0.6)
    rank = low[0].out_channels
    w = conv.weight.detach().reshape(8, -1)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    best = (u[:, :rank] * sv[:rank]) @ vh[:rank]  # Eckart-Young: the best rank-r approximation
    product = (low[1].weight.reshape(8, rank) @ low[0].weight.reshape(rank, -1)).detach()
    torch.testing.assert_close(product, best, rtol=0, atol=1e-10)
    rebuilt = HT2.rebuild_module(conv, {"type": "svd", "rank": rank})
    assert [tuple(m.weight.shape) for m in rebuilt] == [tuple(m.weight.shape) for m in low]
    assert rebuilt[0].stride == (2, 2) and rebuilt[0].padding == (1, 1) and rebuilt[1].bias is not None


def _numpy_energy_rank(values, energy: float) -> int:
    import numpy as np

    share = np.cumsum(values**2) / np.sum(values**2)
    return int(np.searchsorted(share, energy - 1e-12)) + 1


@pytest.mark.parametrize("shape", [(24, 16, 3, 3), (16, 32, 3, 3), (20, 6, 3, 5)])
@pytest.mark.parametrize("energy", [0.95, 0.8, 0.5, 0.2])
def test_r13_is_the_energy_rank_of_the_full_kernel_reshape(shape, energy) -> None:
    import numpy as np

    torch.manual_seed(sum(shape))
    t, c, kh, kw = shape
    conv = nn.Conv2d(c, t, (kh, kw), padding=1, bias=False)
    w = conv.weight.detach().double().numpy()
    x = np.transpose(w, (1, 2, 0, 3))  # (C, kh, T, kw), the authors' moveaxis(0, 2)
    r1 = _numpy_energy_rank(np.linalg.svd(x.reshape(c, -1), compute_uv=False), energy)
    r3 = _numpy_energy_rank(np.linalg.svd(np.moveaxis(x, 2, 0).reshape(t, -1), compute_uv=False), energy)
    r13 = _numpy_energy_rank(np.linalg.svd(x.reshape(c * kh, t * kw), compute_uv=False), energy)
    assert ht2_ranks(conv, energy) == (r1, min(r13, r1 * kh, r3 * kw), r3)
    fact = tucker2_conv(conv, energy)
    assert (fact[0].out_channels, fact[1].out_channels, fact[2].out_channels) == ht2_ranks(conv, energy)


def test_factorisations_that_cost_more_are_skipped() -> None:
    model = Tiny()
    x = torch.randn(1, 3, 16, 16)
    ctx = make_ctx(model, x)
    base = count_macs(model, x)
    assert HT2().transform(model, 1.0, ctx) == []  # full ranks never pay off
    assert count_macs(model, x) == base
    # every step the criterion takes lowers MACs: the compressed model is never larger
    for e in (0.95, 0.9, 0.8):
        m = copy.deepcopy(model)
        HT2().transform(m, e, ctx)
        assert count_macs(m, x) <= base


def test_reduction_monotone_in_energy_and_deterministic() -> None:
    torch.manual_seed(5)
    model = build_resnet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    ctx = make_ctx(model, x)
    crit = HT2()
    reductions = []
    for e in (1.0, 0.9, 0.7, 0.5, 0.3, 0.05):
        m = copy.deepcopy(model)
        crit.transform(m, e, ctx)
        reductions.append(ctx.reduction(m))
    assert reductions[0] == 0.0 and reductions[-1] > 0.5
    assert all(b >= a - 1e-3 for a, b in pairwise(reductions)), reductions
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    assert crit.transform(a, 0.6, ctx) == HT2().transform(b, 0.6, ctx)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_params_target_uses_parameter_counts() -> None:
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(1, 3, 16, 16)
    n0 = sum(p.numel() for p in model.parameters())
    m_params, m_macs = copy.deepcopy(model), copy.deepcopy(model)
    by_params = [s["module"] for s in HT2().transform(m_params, 0.8, make_ctx(model, x, metric="params"))]
    by_macs = [s["module"] for s in HT2().transform(m_macs, 0.8, make_ctx(model, x, metric="macs"))]
    assert sum(p.numel() for p in m_params.parameters()) < n0
    # the strided conv1: its first 1x1 conv runs at the input resolution, so the factorisation
    # saves parameters but costs MACs; each target decides by its own metric
    assert "conv1" in by_params and "conv1" not in by_macs
    assert set(by_params) - set(by_macs) == {"conv1"}
    alone = copy.deepcopy(model)
    set_module(alone, "conv1", tucker2_conv(model.conv1, 0.8))
    assert sum(p.numel() for p in alone.parameters()) < n0
    assert count_macs(alone, x) > count_macs(model, x)


# ----------------------------------------------------------------------------- plan round trip


@pytest.mark.parametrize("arch", ["tiny", "resnet20"])
def test_round_trip_through_plan_and_state_dict(arch: str) -> None:
    torch.manual_seed(6)
    make = Tiny if arch == "tiny" else (lambda: build_resnet(20))
    size = 16 if arch == "tiny" else 32
    model = make()
    with torch.no_grad():
        _randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, size, size)
    ctx = make_ctx(model, x)
    steps = HT2().transform(model, 0.6, ctx)
    assert steps
    with torch.no_grad():
        expected = model(x)
    fresh = rebuild(make().eval(), steps, model.state_dict())
    assert all(isinstance(fresh.get_submodule(s["module"]), Factorized) for s in steps)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_rebuild_rejects_a_bad_spec() -> None:
    with pytest.raises(ConfigError, match="cannot rebuild"):
        HT2.rebuild_module(nn.Linear(4, 4), {"type": "tucker2", "ranks": [1, 1, 1]})
    with pytest.raises(ConfigError, match="cannot rebuild"):
        HT2.rebuild_module(nn.Conv2d(4, 4, 3), {"type": "cp", "rank": 2})


# ----------------------------------------------------------------------------- torch-pruning


def test_factorised_model_goes_through_dependency_graph() -> None:
    torch.manual_seed(7)
    model = build_resnet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    steps = HT2().transform(model, 0.7, make_ctx(model, x))
    name = next(s["module"] for s in steps if s["spec"]["type"] == "tucker2")
    block = model.get_submodule(name)
    r1 = block[0].out_channels
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = dg.get_pruning_group(block[0], tp.prune_conv_out_channels, idxs=[0])
    touched = {dep.target.module for dep, _ in group}
    assert block[0] in touched and block[1] in touched
    group.prune()
    assert block[0].out_channels == r1 - 1 and block[1].in_channels == r1 - 1
    assert model(x).shape == (1, 10)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_energy_out_of_range_is_a_config_error(bad: float) -> None:
    with pytest.raises(ConfigError, match="energy"):
        HT2.from_kwargs(energy=bad)
    model = Tiny()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="energy"):
        HT2().transform(model, bad, make_ctx(model, x))


def test_unknown_hyper_parameter_is_suggested() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'energy'"):
        HT2.from_kwargs(enrgy=0.5)
    assert HT2.from_kwargs(energy="0.7").params.energy == 0.7
    assert HT2.knob.name == "energy" and not HT2.knob.increases_compression
    assert HT2.name == "ht2" and HT2().describe() == {
        "energy": 0.8,
        "include_first": True,
        "include_linear": True,
        "include_classifier": True,
    }


# ----------------------------------------------------------------------------- independent reference


def _numpy_ht2(w, energy: float):
    """Truncated Tucker-2 + core SVD written out with numpy, as the paper states it.

    ``w`` is ``(T, C, kh, kw)``; returns the reconstructed kernel, the ranks, the squared
    norm of the projected core and the core's discarded squared singular values.
    """
    import numpy as np

    t, c, kh, kw = w.shape
    x = np.transpose(w, (1, 2, 0, 3))  # (C, kh, T, kw)
    u1, s1, _ = np.linalg.svd(x.reshape(c, -1), full_matrices=False)
    u3, s3, _ = np.linalg.svd(np.moveaxis(x, 2, 0).reshape(t, -1), full_matrices=False)
    r1, r3 = _numpy_energy_rank(s1, energy), _numpy_energy_rank(s3, energy)
    s13 = np.linalg.svd(x.reshape(c * kh, t * kw), compute_uv=False)
    r13 = min(_numpy_energy_rank(s13, energy), r1 * kh, r3 * kw)
    core = np.einsum("ahbw,ai,bj->ihjw", x, u1[:, :r1], u3[:, :r3])  # (R1, kh, R3, kw)
    cu, cs, cvt = np.linalg.svd(core.reshape(r1 * kh, r3 * kw), full_matrices=False)
    core13 = ((cu[:, :r13] * cs[:r13]) @ cvt[:r13]).reshape(r1, kh, r3, kw)
    rec = np.einsum("ihjw,ai,bj->ahbw", core13, u1[:, :r1], u3[:, :r3])  # (C, kh, T, kw)
    return np.transpose(rec, (2, 0, 1, 3)), (r1, r13, r3), float((core**2).sum()), float((cs[r13:] ** 2).sum())


def _kernel_of(fact: Factorized, conv: nn.Conv2d) -> torch.Tensor:
    """The ``(T, C, kh, kw)`` kernel the four convs apply together (stride 1)."""
    a = fact[0].weight.detach()[:, :, 0, 0]  # (R1, C)
    h = fact[1].weight.detach()[..., 0]  # (R13, R1, kh)
    v = fact[2].weight.detach()[:, :, 0, :]  # (R3, R13, kw)
    d = fact[3].weight.detach()[:, :, 0, 0]  # (T, R3)
    return torch.einsum("tb,bsw,sih,ic->tchw", d, v, h, a)


@pytest.mark.parametrize("shape", [(12, 8, 3, 3), (6, 10, 3, 5)])
@pytest.mark.parametrize("energy", [0.9, 0.6, 0.3])
def test_truncated_tucker2_equals_a_direct_numpy_computation(shape, energy) -> None:
    """At energy < 1: the kept subspaces are the leading singular directions, the core keeps
    its leading R13 directions (Eckart-Young), and the ranks are the energy ranks."""
    import numpy as np

    torch.manual_seed(31 + sum(shape))
    t, c, kh, kw = shape
    conv = nn.Conv2d(c, t, (kh, kw), padding=(kh // 2, kw // 2), bias=True).double()
    with torch.no_grad():  # an uneven spectrum, so that truncation has something to choose
        conv.weight.mul_(torch.logspace(0, -1.5, t, dtype=torch.float64)[:, None, None, None])
        conv.weight.mul_(torch.logspace(0, -1, c, dtype=torch.float64)[None, :, None, None])
    w = conv.weight.detach().numpy()
    ref, ranks, core_sq, core_tail = _numpy_ht2(w, energy)
    fact = tucker2_conv(conv, energy)
    assert (fact[0].out_channels, fact[1].out_channels, fact[2].out_channels) == ranks
    assert ranks[0] < c or ranks[2] < t  # the truncation is real
    kernel = _kernel_of(fact, conv)
    np.testing.assert_allclose(kernel.numpy(), ref, rtol=0, atol=1e-10)
    # the error: energy outside the two kept subspaces plus the core's discarded directions
    err = float(((kernel.numpy() - w) ** 2).sum())
    assert err == pytest.approx(float((w**2).sum()) - core_sq + core_tail, rel=1e-9, abs=1e-12)
    # the four convs apply that kernel (zero padding splits exactly over the two axes)
    x = torch.randn(2, c, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        direct = nn.functional.conv2d(x, kernel, conv.bias, padding=conv.padding)
        torch.testing.assert_close(fact(x), direct, rtol=0, atol=1e-10)


def test_full_mode_ranks_reach_the_eckart_young_optimum_of_the_kernel_reshape() -> None:
    """With both mode bases full, the core step is the best rank-R13 approximation of the
    ``(C kh) x (T kw)`` reshape: its error is exactly the discarded squared singular values."""
    import numpy as np

    t, c, kh, kw = 3, 2, 3, 3
    w = np.random.default_rng(41).standard_normal((t, c, kh, kw))
    for _ in range(30):  # whiten both mode unfoldings in turn: flat spectra, so R1 = C and R3 = T
        for axis in (1, 0):
            m = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
            u, _, vt = np.linalg.svd(m, full_matrices=False)
            w = np.moveaxis((u @ vt).reshape(np.moveaxis(w, axis, 0).shape), 0, axis)
    conv = nn.Conv2d(c, t, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w))
    x = np.transpose(w, (1, 2, 0, 3)).reshape(c * kh, t * kw)
    s = np.linalg.svd(x, compute_uv=False)
    energy = 0.75
    r1, r13, r3 = ht2_ranks(conv, energy)
    assert (r1, r3) == (c, t) and r13 < min(c * kh, t * kw)
    assert r13 == _numpy_energy_rank(s, energy)
    err = float(((_kernel_of(tucker2_conv(conv, energy), conv).numpy() - w) ** 2).sum())
    assert err == pytest.approx(float((s[r13:] ** 2).sum()), rel=1e-9)
    # the smallest rank reaching the energy: one less would not
    share = np.cumsum(s**2) / (s**2).sum()
    assert share[r13 - 1] >= energy > (share[r13 - 2] if r13 > 1 else 0.0)


# ----------------------------------------------------------------------------- what users see


def test_metadata_and_messages_are_exact() -> None:
    import dataclasses
    import re

    from prunebench.protocols import Knob

    assert HT2.needs_data is False and HT2.knob == Knob("energy", 0.05, 1.0, False)
    assert HT2.summary.startswith("Hierarchical Tucker-2: each kxk conv -> 1x1, kx1, 1xk, 1x1 convs; SVD for")
    assert HT2.summary.endswith("1x1 convs and linear layers; ranks from one energy threshold")
    assert HT2.reference == (
        "Gabor, Zdunek, 'Compression of convolutional neural networks using hierarchical "
        "Tucker-2 decomposition', Applied Soft Computing 132, 2023"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        HT2().params.energy = 0.5
    with pytest.raises(ConfigError, match=r"^ht2 energy is the share of squared singular values kept"):
        HT2.from_kwargs(energy=1.5)
    model, x = Tiny(), torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"^ht2 energy is the share"):
        HT2().transform(model, 0.0, make_ctx(model, x))
    with pytest.raises(ConfigError, match=r"^ht2 include_first must be true or false, got 3$"):
        HT2.Params(include_first=3)
    with pytest.raises(ValueError, match=r"^hierarchical Tucker-2 needs a conv with groups == 1$"):
        tucker2_conv(nn.Conv2d(4, 4, 3, groups=2), 0.5)
    spec = {"type": "cp", "rank": 2}
    expected = (
        f"ht2 cannot rebuild a Conv2d from plan spec {spec!r}: expected {{'type': 'svd', 'rank': R}} for a "
        "Linear or a conv, or {'type': 'tucker2', 'ranks': [R1, R13, R3]} for a conv"
    )
    with pytest.raises(ConfigError, match="^" + re.escape(expected) + "$"):
        HT2.rebuild_module(nn.Conv2d(4, 4, 3), spec)


# ----------------------------------------------------------------------------- shared helpers


@pytest.mark.parametrize("shape", [(5, 5), (4, 7), (7, 4), (2, 5, 5)])
def test_spectrum_basis_is_the_singular_vectors_of_the_documented_side(shape) -> None:
    """Wide and square matrices give left singular vectors (eigenvectors of ``M M^T``), tall
    ones right singular vectors (of ``M^T M``); a spectrum is immutable."""
    import dataclasses

    import numpy as np

    torch.manual_seed(12)
    m = torch.randn(*shape, dtype=torch.float64)
    spec = spectrum(m)
    rows, cols = shape[-2:]
    assert spec.side == ("left" if rows <= cols else "right")
    mn = m.numpy()
    gram = mn @ np.swapaxes(mn, -1, -2) if rows <= cols else np.swapaxes(mn, -1, -2) @ mn
    basis, values = spec.basis.numpy(), spec.values.numpy()
    assert basis.shape == (*shape[:-2], rows if rows <= cols else cols, min(rows, cols))
    np.testing.assert_allclose(gram @ basis, basis * values[..., None, :] ** 2, rtol=0, atol=1e-10)
    eye = np.broadcast_to(np.eye(min(rows, cols)), gram.shape)
    np.testing.assert_allclose(np.swapaxes(basis, -1, -2) @ basis, eye, rtol=0, atol=1e-10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.side = "right"


@pytest.mark.parametrize("shape", [(3, 8), (5, 5), (8, 3)])
def test_left_basis_is_the_thin_left_singular_basis(shape) -> None:
    import numpy as np

    torch.manual_seed(13)
    m = torch.randn(*shape, dtype=torch.float64)
    u, s = left_basis(m)
    ref_u, ref_s, _ = np.linalg.svd(m.numpy(), full_matrices=False)
    assert u.shape == ref_u.shape and s.shape == ref_s.shape
    np.testing.assert_allclose(s.numpy(), ref_s, rtol=1e-10)
    # the same vectors up to sign (distinct singular values)
    np.testing.assert_allclose(np.abs(u.numpy().T @ ref_u), np.eye(min(shape)), atol=1e-9)


def test_factors_are_balanced_except_for_numerically_zero_directions() -> None:
    """``A = U_r sqrt(S_r)``; a direction whose singular value is at most 1e-12 of the largest
    (far below what the Gram spectrum resolves) keeps scale 1 instead."""
    import numpy as np

    rng = np.random.default_rng(14)
    u = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    v = np.linalg.qr(rng.standard_normal((6, 4)))[0]
    s = np.array([1.0, 3e-12, 1e-12, 1e-13])
    matrix = torch.from_numpy((u * s) @ v.T)
    spec = Spectrum(matrix, "left", torch.from_numpy(u), torch.from_numpy(s))
    a, b = low_rank_factors(spec, 4)
    np.testing.assert_allclose(a.norm(dim=0).numpy(), [1.0, np.sqrt(3e-12), 1.0, 1.0], rtol=1e-9)
    torch.testing.assert_close(a @ b, matrix, rtol=0, atol=1e-15)


_HELPER_ERRORS = {
    "energy": (
        lambda: check_energy(1.5),
        ConfigError,
        "energy is the share of squared singular values kept and must lie in (0, 1], got 1.5",
    ),
    "energy-type": (
        lambda: HT2.from_kwargs(energy=None),
        ConfigError,
        "ht2 energy must be a number in (0, 1], got None",
    ),
    "no-values": (
        lambda: energy_rank(torch.tensor([]), 0.5),
        ValueError,
        "energy_rank needs at least one singular value",
    ),
    "batched-factors": (
        lambda: low_rank_factors(spectrum(torch.randn(2, 3, 4)), 1),
        ValueError,
        "low_rank_factors takes a single matrix",
    ),
    "grouped-svd": (
        lambda: svd_conv(nn.Conv2d(4, 4, 3, groups=2), 0.5),
        ValueError,
        "an SVD split needs a conv with groups == 1",
    ),
    "replace-root": (
        lambda: set_module(Tiny(), "", nn.Identity()),
        ValueError,
        "cannot replace the model itself",
    ),
    "replace-missing": (
        lambda: set_module(nn.Sequential(nn.Sequential(nn.ReLU())), "0.fc", nn.Identity()),
        KeyError,
        "Sequential has no sub-module 'fc' (0.fc)",
    ),
}


@pytest.mark.parametrize("case", sorted(_HELPER_ERRORS))
def test_helper_errors_are_exact(case: str) -> None:
    call, error, message = _HELPER_ERRORS[case]
    with pytest.raises(error) as exc:
        call()
    assert exc.value.args[0] == message


def test_select_targets_defaults_and_factorised_blocks() -> None:
    class Scaled(nn.Linear):
        pass

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        Factorized(nn.Conv2d(4, 2, 3, bias=False), nn.Conv2d(2, 4, 1)),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4, 4),
        Scaled(4, 4),
        Factorized(nn.Linear(4, 2, bias=False), nn.Linear(2, 4)),
    )
    # linear layers by default; nothing inside an existing factorisation is split again
    assert select_targets(model) == ["2", "4"]
    assert select_targets(model, include_linear=False) == ["2"]
    # the model itself is never a target
    assert select_targets(nn.Conv2d(3, 4, 3), include_first=True) == []


def test_input_sizes_are_each_layer_s_first_input_without_the_batch() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.shared = nn.Conv2d(4, 4, 3, stride=2, padding=1)
            self.tokens = nn.Linear(9, 5)
            self.head = nn.Linear(5, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.shared(self.shared(self.conv(x)))  # the shared conv runs at two resolutions
            t = self.tokens(x.flatten(2))
            return self.head(input=t.mean(1))  # called by keyword: its input is not seen

    model = Net().train()
    sizes = input_sizes(model, ["conv", "shared", "tokens", "head", "unused"], torch.randn(3, 3, 12, 10))
    assert sizes == {"conv": (3, 12, 10), "shared": (4, 12, 10), "tokens": (4, 9)}
    assert model.training


def _brute_force_macs(layer: nn.Module, x: torch.Tensor) -> tuple[int, torch.Tensor]:
    """Multiply-accumulates of one sample through ``layer`` counted from its real output."""
    with torch.no_grad():
        y = layer(x)
    if isinstance(layer, nn.Conv2d):
        per_out = layer.weight[0].numel()
    else:
        per_out = layer.in_features
    outs = y[0].numel()
    return outs * per_out + (outs if layer.bias is not None else 0), y


def test_conv_costs_equal_a_count_from_the_real_outputs() -> None:
    torch.manual_seed(15)
    chain = [
        nn.Conv2d(4, 6, (3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1)),
        nn.Conv2d(6, 5, (1, 3), stride=(1, 2), padding=(0, 2), dilation=(1, 2), bias=False),
        nn.Conv2d(5, 6, (3, 5), padding="same", groups=1),
        nn.Conv2d(6, 4, (2, 3), padding="valid", groups=2),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),
    ]
    x = torch.randn(1, 4, 13, 11)
    in_shape = tuple(x.shape[1:])
    total = 0
    for conv in chain:
        macs, y = _brute_force_macs(conv, x)
        assert module_cost(conv, "macs", tuple(x.shape[1:])) == macs
        assert type(conv_chain_macs([conv], x.shape[2], x.shape[3])) is int
        total, x = total + macs, y
    assert conv_chain_macs(chain, 13, 11) == total
    assert module_cost(Factorized(*chain), "macs", in_shape) == total
    n_params = sum(p.numel() for m in chain for p in m.parameters())
    assert module_cost(Factorized(*chain), "params", in_shape) == n_params
    assert module_cost(Factorized(*chain), "macs", None) == n_params


@pytest.mark.parametrize("lead", [(), (7,), (2, 3)])
def test_linear_costs_count_every_position(lead: tuple[int, ...]) -> None:
    lin, no_bias = nn.Linear(6, 5), nn.Linear(5, 4, bias=False)
    x = torch.randn(1, *lead, 6)
    macs_lin, y = _brute_force_macs(lin, x)
    macs_no_bias, _ = _brute_force_macs(no_bias, y)
    assert module_cost(lin, "macs", (*lead, 6)) == macs_lin
    assert module_cost(no_bias, "macs", (*lead, 5)) == macs_no_bias
    assert module_cost(Factorized(lin, no_bias), "macs", (*lead, 6)) == macs_lin + macs_no_bias


def test_a_replacement_must_cost_strictly_less() -> None:
    lin = nn.Linear(8, 8)
    assert not keeps_saving(lin, copy.deepcopy(lin), "macs", (8,))
    assert not keeps_saving(lin, copy.deepcopy(lin), "params", None)
    cheaper = Factorized(nn.Linear(8, 2, bias=False), nn.Linear(2, 8))
    assert keeps_saving(lin, cheaper, "macs", (8,)) and keeps_saving(lin, cheaper, "params", None)
    assert not keeps_saving(cheaper, lin, "macs", (8,))


def test_a_pointwise_svd_split_rebuilds_from_its_rank() -> None:
    torch.manual_seed(16)
    pw = nn.Conv2d(12, 9, 1, stride=2, padding=1)
    split = svd_conv1x1(pw, 0.7)
    rank = split[0].out_channels
    assert rank < 9
    rebuilt = build_svd_conv1x1(pw, rank)
    rebuilt.load_state_dict(split.state_dict())
    x = torch.randn(2, 12, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), split(x), rtol=0, atol=0)
