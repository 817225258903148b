"""HBGS / HBGTS whole-network search on small CNNs with a torch-pruning-backed context."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from _hbgs_support import LAYERS, SmallCNN, check_allocation, make_ctx, prune_copy, randomise_bn
from torch import nn

from prunebench.criteria.hbgs import HBGS, HBGSB, HBGTS
from prunebench.criteria.hbgs.links import CostModel, unit_links
from prunebench.criteria.hbgs.runner import SuffixRunner
from prunebench.errors import ConfigError, TargetMissedError
from prunebench.pipeline.metrics import count_macs


@pytest.mark.parametrize("cls", [HBGS, HBGTS])
@pytest.mark.parametrize("selector", ["backward", "omp"])
@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_reaches_target_with_valid_indices(cls, selector: str, ratio: float) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    randomise_bn(model)
    ctx = make_ctx(model, ratio)
    kept = cls.from_kwargs(selector=selector).allocate(model, ctx)
    check_allocation(model, ctx, kept)


def test_params_target() -> None:
    torch.manual_seed(1)
    model = SmallCNN().eval()
    # one filter holds up to 5.4% of this toy's params: a 2 pp tolerance leaves room to land
    ctx = make_ctx(model, 0.4, metric="params", tolerance=0.02)
    kept = HBGS().allocate(model, ctx)
    check_allocation(model, ctx, kept)


def plant_scaled_twins(conv: nn.Conv2d, bn: nn.BatchNorm2d, n_twins: int, seed: int = 0) -> list[int]:
    """Make filters n-n_twins.. scaled copies of the first ones, with BN statistics to match.

    A twin's BN output equals its original's exactly, so folding it back (with the BN-aware
    coefficient) must leave the network's output unchanged.
    """
    g = torch.Generator().manual_seed(seed)
    n = conv.out_channels
    twins = list(range(n - n_twins, n))
    with torch.no_grad():
        for j, t in enumerate(twins):
            s = float(0.5 + 1.5 * torch.rand(1, generator=g))
            conv.weight[t] = s * conv.weight[j]
            bn.running_mean[t] = s * bn.running_mean[j]
            bn.running_var[t] = s * s * (bn.running_var[j] + bn.eps) - bn.eps
            bn.weight[t] = bn.weight[j]
            bn.bias[t] = bn.bias[j]
    return twins


@pytest.mark.parametrize("cls", [HBGS, HBGTS])
def test_duplicate_layer_is_pruned_more_than_random_layers(cls) -> None:
    torch.manual_seed(2)
    model = SmallCNN().eval()
    randomise_bn(model)
    plant_scaled_twins(model.conv2, model.bn2, 8)
    ctx = make_ctx(model, 0.3)
    kept = cls().allocate(model, ctx)
    check_allocation(model, ctx, kept)
    frac = {n: 1 - kept[n].numel() / 16 for n in LAYERS}
    assert frac["conv2"] > frac["conv1"] and frac["conv2"] > frac["conv3"]


@pytest.mark.parametrize("cls", [HBGS, HBGTS])
@pytest.mark.parametrize("selector", ["backward", "omp"])
def test_compensation_is_exact_for_scaled_twins(cls, selector: str) -> None:
    torch.manual_seed(3)
    model = SmallCNN().eval()
    randomise_bn(model)
    plant_scaled_twins(model.conv2, model.bn2, 8)
    x = torch.randn(16, 3, 8, 8)
    reference = model(x)
    # the target that removes exactly eight conv2 filters (minus a little, inside the tolerance)
    probe = make_ctx(model, 0.5, prunable=["conv2"])
    r8 = probe.reduction_of({"conv2": torch.arange(8)})
    ctx = make_ctx(model, r8 - 0.002, prunable=["conv2"])
    work = copy.deepcopy(model)
    kept = cls.from_kwargs(selector=selector, ridge=1e-9).allocate(work, ctx)
    assert kept["conv2"].numel() == 8
    pruned = prune_copy(work, x, kept)
    torch.testing.assert_close(pruned(x), reference, rtol=1e-4, atol=1e-4)
    # without compensation the same removal changes the output
    work = copy.deepcopy(model)
    kept = cls.from_kwargs(selector=selector, ridge=1e-9, compensation=False).allocate(work, ctx)
    assert not torch.allclose(prune_copy(work, x, kept)(x), reference, atol=1e-2)


def test_hbgts_on_resnet20_inner_convs() -> None:
    from prunebench.architectures.cifar_resnet import RESNET20, inner_convs

    torch.manual_seed(4)
    model = RESNET20.build().eval()
    randomise_bn(model)
    ctx = make_ctx(model, 0.3, n_images=32, prunable=inner_convs(model))
    kept = HBGTS.from_kwargs(lazy=True).allocate(model, ctx)
    check_allocation(model, ctx, kept)


def test_suffix_runner_matches_full_forward() -> None:
    from prunebench.architectures.cifar_resnet import RESNET20, inner_convs

    torch.manual_seed(5)
    model = RESNET20.build().eval()
    randomise_bn(model)
    x = torch.randn(8, 3, 8, 8)
    reference = model(x)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    names = inner_convs(model)
    touched = {n: [c.name for c in unit_links(graph, model, (n,)).consumers] for n in names}
    assert all(touched[n] == [n[: -len("conv1")] + "conv2"] for n in names)
    work = copy.deepcopy(model).eval()
    runner = SuffixRunner(work, [x[:5], x[5:]], touched)
    assert runner.gm is not None
    full = torch.cat(runner.run(0, record=True))
    torch.testing.assert_close(full, reference)
    for n in names:
        assert runner.start[n] > 0
        torch.testing.assert_close(torch.cat(runner.run(runner.start[n], record=False)), reference)
    # editing a consumer and forwarding from it equals a full forward of the edited network
    n = names[4]
    cons = work.get_submodule(touched[n][0])
    with torch.no_grad():
        cons.weight[:, :3] = 0
    edited = torch.cat(runner.run(runner.start[n], record=True))
    torch.testing.assert_close(edited, work(x))
    # the refreshed caches serve later starts
    torch.testing.assert_close(torch.cat(runner.run(runner.start[names[-1]], record=False)), work(x))


def test_cost_model_tracks_exact_count() -> None:
    from prunebench.architectures.cifar_resnet import RESNET20, inner_convs

    model = RESNET20.build().eval()
    x = torch.randn(2, 3, 8, 8)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    modules = dict(model.named_modules())
    names = inner_convs(model)
    links = {n: unit_links(graph, model, (n,)) for n in names}
    ctx = make_ctx(model, 0.5, prunable=names)
    g = torch.Generator().manual_seed(0)
    for metric in ("macs", "params"):
        cost = CostModel(model, x, links, metric)
        removed = {n: int(torch.randint(0, modules[n].out_channels - 1, (1,), generator=g)) for n in names}
        pruned = prune_copy(
            model, x, {n: torch.arange(modules[n].out_channels - k) for n, k in removed.items()}
        )
        exact = count_macs(pruned, x) if metric == "macs" else sum(p.numel() for p in pruned.parameters())
        assert cost.total(removed) == pytest.approx(exact, rel=1e-9)
        # the incremental form used during the search agrees with the full count
        cost.set_state(removed)
        assert cost.current == pytest.approx(cost.total(removed), rel=1e-12)
        n = names[3]
        more = dict(removed, **{n: removed[n] + 1})
        assert cost.with_move(n, 1) == pytest.approx(cost.total(more), rel=1e-12)
    assert ctx.reduction_of({n: torch.arange(modules[n].out_channels) for n in names}) == 0.0


def test_finetune_between_steps_uses_the_ledger_and_keeps_removed_channels_dead() -> None:
    torch.manual_seed(6)
    model = SmallCNN().eval()
    calls, zero_cols = [], []

    def train(m, epochs, hooks=None, purpose="compress"):
        ctx.ledger.draw(epochs, purpose)
        calls.append(purpose)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.01 * torch.randn_like(p))
        hooks.after_step(m, 0)
        hooks.on_train_end(m)
        # the channels removed so far are silent again: zero filters and zero consumer columns
        dead = [int(i) for i in torch.nonzero(m.conv1.weight.flatten(1).abs().sum(1) == 0)]
        zero_cols.append(len(dead))
        assert m.conv2.weight[:, dead].abs().sum() == 0

    ctx = make_ctx(model, 0.5, epochs=3.0, train=train)
    kept = HBGS.from_kwargs(finetune_epochs_between=1.0).allocate(model, ctx)
    assert calls and set(calls) == {"hbgs-finetune"}
    assert any(zero_cols), zero_cols  # conv1 lost filters before some fine-tune
    assert len(calls) <= 3 and ctx.ledger.spent["hbgs-finetune"] == float(len(calls))
    check_allocation(model, ctx, kept)


def test_bad_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backward"):
        HBGS.from_kwargs(selector="bakward")
    with pytest.raises(ConfigError, match="block"):
        HBGS.from_kwargs(block=0)
    with pytest.raises(ConfigError, match="max_layer_ratio"):
        HBGTS.from_kwargs(max_layer_ratio=1.0)
    with pytest.raises(ConfigError, match="blok"):
        HBGS.from_kwargs(blok=3)
    model = SmallCNN(width=8).eval()
    ctx = make_ctx(model, 0.3)
    with pytest.raises(ConfigError, match="conv1"):
        HBGS.from_kwargs(block=9).allocate(model, ctx)
    torch.manual_seed(8)
    twin = SmallCNN(width=8).eval()
    with torch.no_grad():
        twin.conv3.weight[1] = twin.conv3.weight[0]  # a singular filter Gram needs a ridge
    with pytest.raises(ConfigError, match="conv3.*ridge > 0"):
        HBGSB.from_kwargs(ridge=0.0).allocate(twin, make_ctx(twin, 0.3))
    ctx.calibration = None
    with pytest.raises(ConfigError, match="calibration"):
        HBGS().allocate(model, ctx)


def test_unreachable_target_reports_the_reduction_reached() -> None:
    model = SmallCNN().eval()
    ctx = make_ctx(model, 0.6, prunable=["conv3"])  # conv3 alone can remove ~15% of the MACs
    with pytest.raises(TargetMissedError, match=r"reduction reached is 0\.1"):
        HBGS().allocate(model, ctx)


class FlattenHead(nn.Module):
    """conv2 is read by a linear layer after flatten (4 columns per channel): no fold there."""

    def __init__(self, branchy: bool = False) -> None:
        super().__init__()
        self.branchy = branchy
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        if self.branchy and bool(x.mean() > 1e6):  # data-dependent: torch.fx cannot trace this
            x = x * 0
        x = torch.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.parametrize("branchy", [False, True])
def test_hbgts_with_flatten_consumer_and_untraceable_forward(branchy: bool) -> None:
    torch.manual_seed(7)
    model = FlattenHead(branchy).eval()
    randomise_bn(model)
    # one filter is worth <= 3.1% of the MACs here: a 2 pp tolerance can always be met
    ctx = make_ctx(model, 0.4, prunable=["conv1", "conv2"], tolerance=0.02)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=ctx.example_inputs)
    links = unit_links(graph, model, ("conv2",))
    assert [c.name for c in links.consumers] == ["fc"] and not links.foldable
    runner = SuffixRunner(copy.deepcopy(model), [ctx.calibration.images], {"conv1": ["conv2"]})
    assert (runner.gm is None) == branchy
    kept = HBGTS().allocate(model, ctx)
    check_allocation(model, ctx, kept)
