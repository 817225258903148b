"""trp: Trained Rank Pruning (Xu et al. 2020)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from itertools import pairwise

import pytest
import torch
import torch_pruning as tp
from torch import nn

from prunebench.architectures.cifar_resnet import build_resnet
from prunebench.criteria._factorized import Factorized, energy_rank, set_module
from prunebench.criteria.trp import TRP, TRPHooks, from_matrix, to_matrix, trp_conv, trp_rank
from prunebench.errors import ConfigError
from prunebench.pipeline.metrics import count_macs
from prunebench.protocols import CompressionContext, EpochLedger, Target

pytestmark = pytest.mark.usefixtures("one_thread")  # many tiny decompositions


class Tiny(nn.Module):
    """Stem, two 3x3 convs (one strided), a 1x1 conv, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.relu(self.pw(x)).mean(dim=(2, 3)))


def make_ctx(model: nn.Module, x: torch.Tensor, epochs: float = 2.0) -> CompressionContext:
    base = count_macs(model, x)
    return CompressionContext(
        example_inputs=x,
        calibration=None,
        target=Target(ratio=0.5),
        device=torch.device("cpu"),
        seed=0,
        prunable=[],
        protected=["fc"],
        ledger=EpochLedger(total=epochs),
        reduction=lambda m: 1.0 - count_macs(m, x) / base,
        reduction_of=lambda kept: 0.0,
        train=lambda *a, **k: None,
        log=lambda msg: None,
    )


def _hooks(model: nn.Module, **kw) -> TRPHooks:
    crit = TRP.from_kwargs(**{"match_target": False, **kw})  # the fixed-energy behaviour
    return crit.training_hooks(model, make_ctx(model, torch.randn(1, 3, 16, 16)))


# ----------------------------------------------------------------------------- factorisation


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_full_rank_split_reproduces_conv(scheme: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    fact = trp_conv(conv, 1.0, scheme)
    assert len(fact) == 2 and fact[1].bias is not None and fact[0].bias is None
    if scheme == "channel":
        assert fact[0].kernel_size == (3, 3) and fact[1].kernel_size == (1, 1)
        assert fact[0].out_channels == min(10, 6 * 9)
    else:
        assert (fact[0].kernel_size, fact[0].stride, fact[0].padding) == ((3, 1), (2, 1), (1, 0))
        assert (fact[1].kernel_size, fact[1].stride, fact[1].padding) == ((1, 3), (1, 2), (0, 1))
        assert fact[0].out_channels == min(6 * 3, 10 * 3)
    with torch.no_grad():
        torch.testing.assert_close(fact(x), conv(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_matrix_reshape_round_trips(scheme: str) -> None:
    w = torch.randn(5, 4, 3, 2)
    m = to_matrix(w, scheme)
    assert m.shape == ((5, 24) if scheme == "channel" else (12, 10))
    assert torch.equal(from_matrix(m, w.shape, scheme), w)
    stack = torch.stack([w, 2 * w])
    assert torch.equal(from_matrix(to_matrix(stack, scheme), w.shape, scheme), stack)
    if scheme == "spatial":
        assert m[2 * 3 + 1, 4 * 2 + 1] == w[4, 2, 1, 1]  # row (c, i), column (n, j)


def test_ranks_shrink_as_energy_drops() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 24, 3, padding=1)
    for scheme in ("channel", "spatial"):
        ranks = [trp_rank(conv, e, scheme) for e in (1.0, 0.95, 0.9, 0.7, 0.5, 0.2, 0.05)]
        assert ranks == sorted(ranks, reverse=True) and ranks[-1] < ranks[0]


# ----------------------------------------------------------------------------- training hooks


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_projection_sets_rank_to_energy_rank(scheme: str) -> None:
    torch.manual_seed(2)
    model = Tiny()
    convs = {"conv1": model.conv1, "conv2": model.conv2}  # not the stem, not the 1x1 conv
    before = {
        n: energy_rank(torch.linalg.svdvals(to_matrix(c.weight.detach().double(), scheme)), 0.8)
        for n, c in convs.items()
    }
    hooks = _hooks(model, scheme=scheme, period=3, energy=0.8)  # the first step is a projection step
    assert set(hooks.convs) == set(convs) and hooks.projections == 1 and hooks.ranks == before
    for n, c in hooks.convs.items():
        m = to_matrix(c.weight.detach().double(), scheme)
        assert int(torch.linalg.matrix_rank(m, rtol=1e-5)) == before[n] < min(m.shape)
    with torch.no_grad():
        for c in hooks.convs.values():
            c.weight.add_(0.01 * torch.randn_like(c.weight))  # an optimiser step leaves the low-rank set
    w0 = {n: c.weight.detach().clone() for n, c in hooks.convs.items()}
    hooks.after_step(model, 0)
    hooks.after_step(model, 1)
    assert all(torch.equal(c.weight, w0[n]) for n, c in hooks.convs.items())  # not yet
    hooks.after_step(model, 2)  # every third step: project
    assert hooks.projections == 2
    for n, c in hooks.convs.items():
        m = to_matrix(c.weight.detach().double(), scheme)
        assert int(torch.linalg.matrix_rank(m, rtol=1e-5)) == hooks.ranks[n]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_nuclear_subgradient_is_the_energy_truncated_uv_of_the_projected_weight(scheme: str) -> None:
    torch.manual_seed(3)
    model = Tiny()
    lam, energy = 0.01, 0.7
    conv = model.conv2
    m = to_matrix(conv.weight.detach().double(), scheme)
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    r = energy_rank(sv, energy)
    expected = from_matrix(u[:, :r] @ vh[:r], conv.weight.shape, scheme)  # U_r V_r^T before projecting
    hooks = _hooks(model, scheme=scheme, nuclear=lam, energy=energy, period=1)
    g0 = torch.randn_like(conv.weight)
    conv.weight.grad = g0.clone()
    model.conv1.weight.grad = None
    hooks.after_backward(model, 0)
    torch.testing.assert_close((conv.weight.grad - g0).double(), lam * expected, rtol=0, atol=1e-6)
    assert model.conv1.weight.grad is not None  # a missing gradient becomes the sub-gradient
    assert model.stem.weight.grad is None and model.pw.weight.grad is None
    g1 = conv.weight.grad.clone()
    hooks.after_backward(model, 0)  # no projection since: no sub-gradient
    assert torch.equal(conv.weight.grad, g1)
    hooks0 = _hooks(model, scheme=scheme, nuclear=0.0)
    hooks0.after_backward(model, 0)
    assert torch.equal(conv.weight.grad, g1)


def test_subgradient_only_on_projection_steps() -> None:
    torch.manual_seed(13)
    model = Tiny()
    hooks = _hooks(model, period=3, nuclear=0.1)
    added = []
    for step in range(9):
        for c in hooks.convs.values():
            c.weight.grad = torch.zeros_like(c.weight)
        hooks.after_backward(model, step)
        added.append(any(bool(c.weight.grad.abs().sum() > 0) for c in hooks.convs.values()))
        hooks.after_step(model, step)
    assert added == [True, False, False] * 3  # steps 0, 3, 6 begin with a projection
    assert hooks.subgradient_steps == 3 and hooks.projections == 4


def _train(model: nn.Module, hooks: TRPHooks | None, steps: int = 30) -> None:
    torch.manual_seed(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(steps):
        x = torch.randn(16, 3, 16, 16)
        y = torch.randint(0, 4, (16,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if hooks is not None:
            hooks.after_backward(model, step)
        opt.step()
        if hooks is not None:
            hooks.after_step(model, step)
    if hooks is not None:
        hooks.on_train_end(model)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_hooked_training_lowers_energy_ranks(scheme: str) -> None:
    torch.manual_seed(4)
    plain = Tiny()
    hooked = copy.deepcopy(plain)
    crit = TRP.from_kwargs(scheme=scheme, period=5, energy=0.9, nuclear=1e-3, match_target=False)
    messages: list[str] = []
    ctx = make_ctx(hooked, torch.randn(1, 3, 16, 16))
    ctx.log = messages.append
    hooks = crit.training_hooks(hooked, ctx)
    _train(plain, None)
    _train(hooked, hooks)
    assert hooks.steps == 30 and hooks.projections == 7 and hooks.subgradient_steps == 6 and messages
    ranks_plain = [trp_rank(plain.get_submodule(n), 0.9, scheme) for n in hooks.convs]
    ranks_hooked = [trp_rank(hooked.get_submodule(n), 0.9, scheme) for n in hooks.convs]
    assert all(h <= p for h, p in zip(ranks_hooked, ranks_plain, strict=True)), (ranks_hooked, ranks_plain)
    assert sum(ranks_hooked) < sum(ranks_plain)
    assert torch.isfinite(hooked(torch.randn(2, 3, 16, 16))).all()


def test_training_epochs_draw_from_the_ledger() -> None:
    model = Tiny()
    ctx = make_ctx(model, torch.randn(1, 3, 16, 16), epochs=10.0)
    assert TRP().training_epochs(ctx) == 5.0  # half the ledger by default
    assert TRP.from_kwargs(train_fraction=1.0).training_epochs(ctx) == 10.0
    ctx.ledger.draw(4.0, "other")
    assert TRP.from_kwargs(train_fraction=0.5).training_epochs(ctx) == 3.0
    assert TRP.from_kwargs(train_fraction=0.0).training_epochs(ctx) == 0.0


# ----------------------------------------------------------------------------- transform and plan


def test_transform_targets_and_skips() -> None:
    model = Tiny()
    x = torch.randn(1, 3, 16, 16)
    ctx = make_ctx(model, x)
    assert TRP().transform(copy.deepcopy(model), 1.0, ctx) == []  # full rank never pays off
    assert TRP().training_targets(model) == ["conv1", "conv2"]
    steps = TRP().transform(model, 0.5, ctx)
    assert [s["module"] for s in steps] == ["conv2"]  # conv1 has stride 2: never split
    assert all(s["criterion"] == "trp" and s["spec"]["scheme"] == "channel" for s in steps)
    assert isinstance(model.stem, nn.Conv2d) and isinstance(model.pw, nn.Conv2d)
    assert ctx.reduction(model) > 0


def test_reduction_monotone_in_energy() -> None:
    torch.manual_seed(5)
    model = build_resnet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    ctx = make_ctx(model, x)
    for scheme in ("channel", "spatial"):
        crit = TRP.from_kwargs(scheme=scheme)
        reductions = []
        for e in (1.0, 0.9, 0.7, 0.5, 0.3, 0.05):
            m = copy.deepcopy(model)
            crit.transform(m, e, ctx)
            reductions.append(ctx.reduction(m))
        assert reductions[0] == 0.0 and reductions[-1] > 0.5
        assert all(b >= a for a, b in pairwise(reductions)), reductions


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_round_trip_through_plan_and_state_dict(scheme: str) -> None:
    torch.manual_seed(6)
    model = build_resnet(20)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    steps = TRP.from_kwargs(scheme=scheme).transform(model, 0.6, make_ctx(model, x))
    assert len(steps) == 16  # every 3x3 conv but the stem and the two strided ones
    with torch.no_grad():
        expected = model(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = build_resnet(20).eval()
    for step in json.loads(json.dumps(steps)):
        set_module(
            fresh, step["module"], TRP.rebuild_module(fresh.get_submodule(step["module"]), step["spec"])
        )
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert all(isinstance(fresh.get_submodule(s["module"]), Factorized) for s in steps)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_rebuild_rejects_a_bad_spec() -> None:
    with pytest.raises(ConfigError, match="cannot rebuild"):
        TRP.rebuild_module(nn.Conv2d(4, 4, 3), {"scheme": "diagonal", "rank": 2})
    with pytest.raises(ConfigError, match="cannot rebuild"):
        TRP.rebuild_module(nn.Linear(4, 4), {"scheme": "channel", "rank": 2})


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_factorised_model_goes_through_dependency_graph(scheme: str) -> None:
    torch.manual_seed(7)
    model = build_resnet(20).eval()
    x = torch.randn(1, 3, 32, 32)
    steps = TRP.from_kwargs(scheme=scheme).transform(model, 0.7, make_ctx(model, x))
    block = model.get_submodule(steps[0]["module"])
    rank = block[0].out_channels
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    group = dg.get_pruning_group(block[0], tp.prune_conv_out_channels, idxs=[0])
    assert {block[0], block[1]} <= {dep.target.module for dep, _ in group}
    group.prune()
    assert block[0].out_channels == rank - 1 and block[1].in_channels == rank - 1
    assert model(x).shape == (1, 10)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"energy": 0.0}, "energy"),
        ({"energy": 1.01}, "energy"),
        ({"scheme": "chanel"}, "Did you mean 'channel'"),
        ({"scheme": "spacial"}, "Did you mean 'spatial'"),
        ({"period": 0}, "period"),
        ({"period": "0"}, "period"),
        ({"nuclear": -1.0}, "nuclear"),
        ({"train_fraction": 1.5}, "train_fraction"),
        ({"perod": 5}, "Did you mean 'period'"),
    ],
)
def test_bad_input_is_a_config_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TRP.from_kwargs(**kwargs)


def test_knob_and_defaults() -> None:
    assert TRP.name == "trp" and TRP.needs_data
    assert TRP.knob.name == "energy" and not TRP.knob.increases_compression
    assert TRP().describe() == {
        "energy": 0.9,
        "nuclear": 3e-4,
        "period": 1,
        "scheme": "channel",
        "train_fraction": 0.5,
        "match_target": False,
    }
    assert TRP.from_kwargs(period="5", scheme="spatial").params.period == 5
    model = Tiny()
    with pytest.raises(ConfigError, match="energy"):
        TRP().transform(model, 0.0, make_ctx(model, torch.randn(1, 3, 16, 16)))


def test_training_projects_at_the_energy_that_meets_the_target():
    from prunebench import registry
    from prunebench.pipeline.meter import Meter
    from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    x = torch.randn(8, 1, 8, 8)
    meter = Meter(model, x[:1], Target("macs", 0.5))
    ctx = CompressionContext(
        example_inputs=x[:1], calibration=Calibration(x, torch.zeros(8, dtype=torch.long)), target=Target("macs", 0.5),
        device=torch.device("cpu"), seed=0, prunable=[], protected=["fc"], ledger=EpochLedger(1.0),
        reduction=meter.reduction, reduction_of=lambda kept: 0.0, train=lambda *a, **k: None, log=lambda m: None,
    )
    untouched = copy.deepcopy(model)  # the hooks project the model they are given
    crit = TRP.from_kwargs(match_target=True)
    crit.training_hooks(model, ctx)  # projects ``model`` at the training energy
    e = crit.train_energy
    assert e < 0.9
    # on the model it was bisected on, the training energy lands on the target (within the
    # protocol's one point) and is the largest energy that does (the bisection's last step is
    # below 6e-5)
    at, above = copy.deepcopy(untouched), copy.deepcopy(untouched)
    crit.transform(at, e, ctx)
    crit.transform(above, e + 1e-4, ctx)
    assert 0.5 <= meter.reduction(at) <= 0.51 and meter.reduction(above) < 0.5
    # after the projection the energy ranks can only shrink: the target stays met
    at = copy.deepcopy(model)
    crit.transform(at, e, ctx)
    assert meter.reduction(at) >= 0.5
    fixed = TRP.from_kwargs(match_target=False)
    fixed.training_hooks(untouched, ctx)
    assert fixed.train_energy == 0.9  # the target needs less than 0.9 keeps: the paper's energy stays


def _decaying_spectra(model: nn.Module, decay: float = 0.85) -> nn.Module:
    """Every 3x3 conv's channel matrix given geometrically decaying singular values, so a
    factorisation at energy 0.9 keeps a small rank (as in a trained network)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                w = m.weight.reshape(m.out_channels, -1)
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                s = s[0] * decay ** torch.arange(len(s), dtype=s.dtype)
                m.weight.copy_(((u * s) @ vh).reshape_as(m.weight))
    return model


def test_a_target_that_needs_a_higher_energy_than_the_paper_s_stays_reachable() -> None:
    """With a projection on every step, the ranks shrink step after step; under a target they
    must stop at the ranks whose factorisation meets it, or no energy of the final
    factorisation gives so little compression."""
    from prunebench.pipeline.compress import compress
    from prunebench.pipeline.meter import Meter

    torch.manual_seed(0)
    model = _decaying_spectra(build_resnet(20, num_classes=10, in_channels=3)).eval()
    x = torch.randn(4, 3, 16, 16)
    at_paper_energy = copy.deepcopy(model)
    TRP().transform(at_paper_energy, 0.9, make_ctx(model, x))
    paper = Meter(model, x[:1], Target("macs", 0.5)).reduction(at_paper_energy)
    assert paper > 0.2  # energy 0.9 removes a lot here
    target = Target("macs", round(paper / 2, 2))
    steps = []

    def train(m, epochs, hooks=None, purpose=""):  # 20 projection steps, no gradient
        for i in range(20):
            hooks.after_step(m, i)
            steps.append(dict(hooks.ranks))

    ctx = dataclasses.replace(make_ctx(model, x), target=target, train=train)
    meter = Meter(model, x[:1], target)
    crit = TRP()
    result = compress(crit, model, ctx, meter)
    assert meter.within(result.achieved)
    assert crit.train_energy == 0.9 and steps[-1] == crit.rank_floors  # projections stop at the floors


# ----------------------------------------------------------------------------- independent reference


def _numpy_best_rank(matrix: torch.Tensor, energy: float):
    """numpy's SVD: the smallest rank reaching ``energy`` and the best approximation at that rank."""
    import numpy as np

    u, s, vt = np.linalg.svd(matrix.detach().double().numpy(), full_matrices=False)
    share = np.cumsum(s**2) / (s**2).sum()
    r = int(np.argmax(share >= energy - 1e-12)) + 1  # the first rank whose share reaches e
    assert share[r - 1] >= energy - 1e-12 and (r == 1 or share[r - 2] < energy)
    return r, (u[:, :r] * s[:r]) @ vt[:r], u[:, :r] @ vt[:r]


def _uneven(conv: nn.Conv2d) -> nn.Conv2d:
    with torch.no_grad():  # a decaying spectrum, so that the truncation has something to choose
        conv.weight.mul_(torch.logspace(0, -1.5, conv.out_channels)[:, None, None, None])
    return conv


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("energy", [0.9, 0.6, 0.3])
def test_projection_is_the_best_rank_r_approximation(scheme: str, energy: float) -> None:
    import numpy as np

    torch.manual_seed(21)
    model = Tiny()
    _uneven(model.conv1), _uneven(model.conv2)
    before = {n: to_matrix(c.weight.detach().double(), scheme) for n, c in (("conv1", model.conv1), ("conv2", model.conv2))}
    convs = {"conv1": model.conv1, "conv2": model.conv2}
    hooks = TRPHooks(convs, energy=energy, nuclear=1.0, period=1, scheme=scheme)
    hooks.project()  # what training_hooks does before the first step
    for c in hooks.convs.values():
        c.weight.grad = torch.zeros_like(c.weight)
    hooks.after_backward(model, 0)
    for name, m in before.items():
        r, best, uv = _numpy_best_rank(m, energy)
        assert hooks.ranks[name] == r < min(m.shape)
        projected = to_matrix(hooks.convs[name].weight.detach().double(), scheme).numpy()
        np.testing.assert_allclose(projected, best, rtol=0, atol=1e-5)  # float32 weights
        # the sub-gradient waiting for the next backward pass is U_r V_r^T of the same weight
        sub = to_matrix(hooks.convs[name].weight.grad.double(), scheme).numpy()
        np.testing.assert_allclose(sub, uv, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
@pytest.mark.parametrize("energy", [0.95, 0.7, 0.4])
def test_split_at_energy_is_the_best_rank_r_approximation(scheme: str, energy: float) -> None:
    import numpy as np

    torch.manual_seed(22)
    conv = _uneven(nn.Conv2d(6, 10, (3, 5), padding=(1, 2), bias=True)).double()
    r, best, _ = _numpy_best_rank(to_matrix(conv.weight, scheme), energy)
    new = trp_conv(conv, energy, scheme)
    assert new[0].out_channels == r == trp_rank(conv, energy, scheme)
    first, second = new[0].weight.detach(), new[1].weight.detach()
    if scheme == "channel":  # (N x R)(R x C kh kw)
        product = second.reshape(10, r) @ first.reshape(r, -1)
    else:  # (C kh x R)(R x N kw)
        product = first[..., 0].permute(1, 2, 0).reshape(6 * 3, r) @ second[:, :, 0, :].permute(1, 0, 2).reshape(r, -1)
    np.testing.assert_allclose(product.numpy(), best, rtol=0, atol=1e-10)
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    kernel = from_matrix(torch.from_numpy(best), conv.weight.shape, scheme)
    with torch.no_grad():
        torch.testing.assert_close(new(x), nn.functional.conv2d(x, kernel, conv.bias, padding=(1, 2)), rtol=0, atol=1e-10)


@pytest.mark.parametrize(("scheme", "c", "n"), [("spatial", 12, 4), ("channel", 2, 40)])
def test_projection_of_tall_matrices(scheme: str, c: int, n: int) -> None:
    """More rows than columns (the Gram matrix of the columns): the same best rank-r
    approximation and the same U_r V_r^T."""
    import numpy as np

    torch.manual_seed(23)
    conv = _uneven(nn.Conv2d(c, n, 3, padding=1, bias=False))
    m = to_matrix(conv.weight.detach().double(), scheme)
    assert m.shape[0] > m.shape[1]
    r, best, uv = _numpy_best_rank(m, 0.7)
    hooks = TRPHooks({"c": conv}, energy=0.7, nuclear=1.0, period=1, scheme=scheme)
    hooks.after_backward(nn.Module(), 0)  # nothing projected yet: nothing to add
    assert conv.weight.grad is None and hooks.subgradient_steps == 0
    assert hooks.project() == {"c": r}
    np.testing.assert_allclose(to_matrix(conv.weight.detach().double(), scheme).numpy(), best, rtol=0, atol=1e-5)
    hooks.after_backward(nn.Module(), 0)
    np.testing.assert_allclose(to_matrix(conv.weight.grad.double(), scheme).numpy(), uv, rtol=0, atol=1e-6)
    hooks.on_train_end(nn.Module())
    hooks.after_backward(nn.Module(), 1)  # after training: nothing pending
    np.testing.assert_allclose(to_matrix(conv.weight.grad.double(), scheme).numpy(), uv, rtol=0, atol=1e-6)


def test_numerically_zero_directions_get_no_subgradient() -> None:
    """Singular directions below 1e-6 of the largest are left out of U_r V_r^T."""
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(36, 4, dtype=torch.float64))
    for tiny, counted in ((1.5e-6, True), (0.5e-6, False)):
        s = torch.tensor([1.0, 0.5, 0.2, tiny], dtype=torch.float64)
        conv = nn.Conv2d(4, 4, 3, bias=False).double()
        with torch.no_grad():
            conv.weight.copy_(from_matrix((u * s) @ v.T, conv.weight.shape, "channel"))
        hooks = TRPHooks({"c": conv}, energy=1.0, nuclear=1.0, period=1, scheme="channel")
        hooks.project()
        hooks.after_backward(nn.Module(), 0)
        keep = 4 if counted else 3
        expected = u[:, :keep] @ v[:, :keep].T
        # (a direction that small is resolved to ~1e-5 through the Gram matrix; it is worth 1 here)
        torch.testing.assert_close(to_matrix(conv.weight.grad, "channel"), expected, rtol=0, atol=1e-4)


def test_trained_convs_are_those_with_a_spatial_kernel() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # the first conv: never
        nn.Conv2d(4, 4, (3, 1), padding=(1, 0)),
        nn.Conv2d(4, 4, (1, 2)),
        nn.Conv2d(4, 4, 1),  # 1x1: nothing to regularise
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # trained, but never split (strided)
    )
    assert TRP().training_targets(model) == ["1", "2", "4"]
    assert TRP().targets(model) == ["1", "2"]


def test_split_defaults_and_messages() -> None:
    import re

    from prunebench.protocols import Knob

    assert TRP.knob == Knob("energy", 0.05, 1.0, False)
    torch.manual_seed(24)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    default = trp_conv(conv, 0.8)
    assert default[0].kernel_size == (3, 3) and default[1].kernel_size == (1, 1)  # the channel scheme
    with pytest.raises(ValueError, match=r"^trp needs a conv with groups == 1$"):
        trp_conv(nn.Conv2d(4, 4, 3, groups=2), 0.5)
    with pytest.raises(ConfigError, match="^" + re.escape("trp scheme 'spatail' is unknown. Did you mean 'spatial'? Available: channel, spatial") + "$"):
        TRP.from_kwargs(scheme="spatail")
    with pytest.raises(ConfigError, match=r"^trp energy is the share"):
        TRPHooks({}, energy=0.0, nuclear=0.0, period=1, scheme="channel")


def test_metadata_log_and_messages_are_exact() -> None:
    import dataclasses
    import re

    assert TRP.summary == (
        "Trained Rank Pruning: periodic SVD projection + nuclear-norm sub-gradient during training, "
        "then each kxk conv -> two convs at the energy rank"
    )
    assert TRP.reference == "Xu et al., 'TRP: Trained Rank Pruning for Efficient Deep Neural Networks', IJCAI 2020"
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRP().params.period = 2

    def raises(message: str):
        return pytest.raises(ConfigError, match="^" + re.escape(message) + "$")

    with raises("trp period is a number of optimiser steps and must be an integer >= 1, got 0"):
        TRP.from_kwargs(period=0)
    for period in (True, 1.5):  # a flag or a fraction is no number of steps
        with raises(f"trp period is a number of optimiser steps and must be an integer >= 1, got {period!r}"):
            TRP.Params(period=period)
    with raises("trp nuclear (the nuclear-norm weight) must be >= 0, got -1"):
        TRP.from_kwargs(nuclear=-1)
    with raises("trp train_fraction is a share of the remaining epochs and must lie in [0, 1], got 2"):
        TRP.from_kwargs(train_fraction=2)
    with raises("trp energy is the share of squared singular values kept and must lie in (0, 1], got 2"):
        TRP.from_kwargs(energy=2)
    with raises("trp energy is the share of squared singular values kept and must lie in (0, 1], got 0.0"):
        TRP().transform(nn.Sequential(nn.Conv2d(2, 2, 3)), 0.0)
    # the training summary: steps, projections, sub-gradient steps, ranks of the full ones
    torch.manual_seed(0)
    msgs: list[str] = []
    convs = {"a": nn.Conv2d(4, 6, 3), "b": nn.Conv2d(6, 6, 3)}  # spatial matrices 12 x 18, 18 x 18
    hooks = TRPHooks(convs, energy=0.5, nuclear=0.1, period=2, scheme="spatial", log=msgs.append)
    hooks.project()
    hooks.after_step(nn.Module(), 0)
    hooks.after_step(nn.Module(), 1)
    hooks.after_backward(nn.Module(), 1)
    hooks.on_train_end(nn.Module())
    r = sum(hooks.ranks.values())
    assert msgs == [
        f"trp: 2 steps, 2 projections, 1 with the nuclear sub-gradient; energy-0.5 ranks sum to {r} of "
        "30 full (spatial scheme)"
    ]


def test_matching_the_target_is_logged() -> None:
    from prunebench import registry
    from prunebench.pipeline.meter import Meter
    from prunebench.protocols import Calibration

    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1).eval()
    x = torch.randn(4, 1, 8, 8)
    meter = Meter(model, x[:1], Target("macs", 0.5))
    msgs: list[str] = []
    ctx = CompressionContext(
        example_inputs=x[:1], calibration=Calibration(x, torch.zeros(4, dtype=torch.long)), target=Target("macs", 0.5),
        device=torch.device("cpu"), seed=0, prunable=[], protected=["fc"], ledger=EpochLedger(1.0),
        reduction=meter.reduction, reduction_of=lambda kept: 0.0, train=lambda *a, **k: None, log=msgs.append,
    )
    crit = TRP.from_kwargs(match_target=True)
    crit.training_hooks(model, ctx)
    e = crit.train_energy  # matching the target: the energy of the target's factorisation
    assert msgs == [
        f"trp: projecting at energy {e:.4f} during training, never below the ranks of energy {e:.4f} "
        "(whose factorisation meets the target)"
    ]


def test_a_conv_that_would_not_save_is_skipped_and_the_next_one_split() -> None:
    import re

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1), nn.Conv2d(1, 16, 3, padding=1))
    # "1" has one output channel: any split costs more; "2" (16 x 9, rank 2 at energy 0.3) saves
    assert TRP().transform(model, 0.3) == [  # without a context: parameter counts decide
        {"op": "replace", "module": "2", "criterion": "trp", "spec": {"scheme": "channel", "rank": 2}}
    ]
    assert type(model[1]) is nn.Conv2d and isinstance(model[2], Factorized)
    spec = {"scheme": "diagonal", "rank": 2}
    expected = (
        f"trp cannot rebuild a Conv2d from plan spec {spec!r}: "
        "expected a Conv2d and {'scheme': 'channel' | 'spatial', 'rank': R}"
    )
    with pytest.raises(ConfigError, match="^" + re.escape(expected) + "$"):
        TRP.rebuild_module(nn.Conv2d(4, 4, 3), spec)
