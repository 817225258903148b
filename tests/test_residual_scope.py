"""Scope 'all' on option-A ResNets: residual-coupled channels are pruned through PadShortcut's pruner."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.architectures.cifar_resnet import BasicBlock, PadShortcut
from prunebench.pipeline.compress import compress
from prunebench.pipeline.costmodel import ChannelCost
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.metrics import count_macs, count_params
from prunebench.pipeline.surgery import load_compressed, prune_kept, pruning_units, replay, save_compressed
from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

pytestmark = pytest.mark.usefixtures("one_thread")


def _resnet(depth: int = 20, seed: int = 0) -> nn.Module:
    """A ResNet with non-trivial BatchNorm statistics and affine parameters, in eval mode."""
    torch.manual_seed(seed)
    model = registry.architectures.get(f"resnet{depth}").build(num_classes=10, in_channels=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _all_layers(model: nn.Module) -> list[str]:
    return registry.architectures.get("resnet20").prunable_layers(model, "all")


def _random_kept(units, seed: int, low: float = 0.3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for u in units:
        k = max(1, int(u.channels * (low + (1 - low) * float(torch.rand(1, generator=g)))))
        kept[u.root] = torch.sort(torch.randperm(u.channels, generator=g)[:k]).values
    return kept



def _assert_met_and_replayable(model, ctx, meter, result, images) -> None:
    """The target is met, and the plan replayed on a fresh network gives the same outputs."""
    assert meter.within(result.achieved)
    assert model(images[:2]).shape == (2, 10)
    fresh = _resnet()
    replay(fresh, ctx.example_inputs, result.plan)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(fresh.eval()(images), model.eval()(images), atol=1e-5)

def test_all_scope_forms_one_unit_per_stage():
    model = _resnet()
    units = pruning_units(model, torch.zeros(1, 3, 8, 8), _all_layers(model))
    residual = {u.root: u.members for u in units if len(u.members) > 1}
    assert residual == {
        "conv1": ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        "layer2.0.conv2": ("layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2"),
        "layer3.0.conv2": ("layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"),
    }
    assert len(units) == 3 + 9  # three residual groups, nine inner convs


def test_fresh_shortcut_uses_the_usual_padding_layout():
    sc = PadShortcut(16, 32)
    assert sc.mapping() == [(i, i + 8) for i in range(16)]
    x = torch.randn(2, 16, 8, 8)
    expected = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(sc(x), expected)
    assert PadShortcut(16, 33).mapping()[0] == (0, 8)  # odd padding: the smaller half first


def _silence(model: nn.Module, kept: dict[str, torch.Tensor], units) -> nn.Module:
    """The unpruned model with every removed channel's weights zeroed.

    A removed channel gets zero filters and zero BatchNorm affine parameters in every conv
    that writes it (so its value is 0 everywhere), and the option-A shortcuts stop copying
    into or out of removed channels (their 0/1 channel map is their only weight).
    """
    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    dead: dict[str, set[int]] = {}
    for u in units:
        gone = set(range(u.channels)) - set(kept[u.root].tolist())
        for member in u.members:
            dead[member] = gone
    with torch.no_grad():
        for name, gone in dead.items():
            idx = torch.tensor(sorted(gone), dtype=torch.long)
            if idx.numel() == 0:
                continue
            modules[name].weight[idx] = 0
            bn = modules["bn1" if name == "conv1" else name.replace("conv", "bn")]
            bn.weight[idx] = 0
            bn.bias[idx] = 0
    stage_dead = {1: dead["conv1"], 2: dead["layer2.0.conv2"], 3: dead["layer3.0.conv2"]}
    for s in (2, 3):
        sc = getattr(m, f"layer{s}")[0].shortcut
        pairs = [(i, o) for i, o in sc.mapping() if i not in stage_dead[s - 1] and o not in stage_dead[s]]
        sc.src = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        sc.dst = torch.tensor([o for _, o in pairs], dtype=torch.long)
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_net_equals_the_unpruned_one_with_zero_weights(seed):
    model = _resnet(seed=seed)
    example = torch.zeros(1, 3, 8, 8)
    units = pruning_units(model, example, _all_layers(model))
    kept = _random_kept(units, seed)
    silenced = _silence(model, kept, units)
    pruned = copy.deepcopy(model)
    prune_kept(pruned, example, kept)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 10))
    with torch.no_grad():
        assert torch.allclose(pruned(x), silenced(x), atol=1e-5)
        assert not torch.allclose(model(x), silenced(x), atol=1e-3)  # the removed channels mattered
    assert pruned.layer1[0].conv2.out_channels == len(kept["conv1"])
    assert pruned.layer3[0].shortcut.out_channels == len(kept["layer3.0.conv2"])
    assert pruned.layer3[0].shortcut.in_channels == len(kept["layer2.0.conv2"])


def test_shortcut_mapping_follows_the_kept_channels():
    model = _resnet()
    example = torch.zeros(1, 3, 8, 8)
    # stage 1 keeps channels 0..7 (16 -> 8); stage 2 keeps the even channels 8..23 (32 -> 8)
    kept = {"conv1": torch.arange(8), "layer2.0.conv2": torch.arange(8, 24, 2)}
    prune_kept(model, example, kept)
    # old stage-1 channel i fed old stage-2 channel i + 8: of the kept stage-1 channels 0..7,
    # those landing on kept stage-2 channels are 0, 2, 4, 6 (-> 8, 10, 12, 14 = new 0..3)
    assert model.layer2[0].shortcut.mapping() == [(0, 0), (2, 1), (4, 2), (6, 3)]
    # stage 3 is unpruned: the kept old stage-2 channels 8, 10, .., 22 (new 0..7) still land on i + 16
    assert model.layer3[0].shortcut.mapping() == [(k, 24 + 2 * k) for k in range(8)]


def _closed_form_macs(model: nn.Module, size: int) -> int:
    """Conv + linear MACs of a CIFAR ResNet from its layer widths (no bias on convs)."""
    total = model.conv1.in_channels * 9 * model.conv1.out_channels * size * size
    hw = size * size
    for block in model.modules():
        if isinstance(block, BasicBlock):
            if block.conv1.stride[0] == 2:
                hw = (size := (size + 1) // 2) ** 2
            total += block.conv1.in_channels * 9 * block.conv1.out_channels * hw
            total += block.conv2.in_channels * 9 * block.conv2.out_channels * hw
    return total + model.fc.in_features * model.fc.out_features + model.fc.out_features


@pytest.mark.parametrize("seed", [0, 1])
def test_macs_and_params_of_the_pruned_model_are_exact(seed):
    model = _resnet()
    example = torch.zeros(1, 3, 8, 8)
    units = pruning_units(model, example, _all_layers(model))
    kept = _random_kept(units, seed, low=0.1)
    pruned = copy.deepcopy(model)
    prune_kept(pruned, example, kept)
    assert count_macs(pruned, example) == _closed_form_macs(pruned, 8)
    # widths follow the plan: a block's second conv has its stage's residual width
    assert pruned.layer2[1].conv2.out_channels == pruned.layer2[2].conv1.in_channels == len(kept["layer2.0.conv2"])
    assert pruned.fc.in_features == len(kept["layer3.0.conv2"])
    for metric, count in (("macs", lambda m: count_macs(m, example)), ("params", count_params)):
        cost = ChannelCost(model, example, units, metric)
        assert cost.value({r: len(k) for r, k in kept.items()}) == pytest.approx(count(pruned), rel=1e-12)
        assert cost.validate(model, example, count)


def _ctx(model, layers, target, images):
    example = images[:1]
    meter = Meter(copy.deepcopy(model), example, target)
    ledger = EpochLedger(1.0)

    def train(m, epochs, hooks=None, purpose="compress"):
        ledger.draw(epochs, purpose)

    ctx = CompressionContext(
        example_inputs=example, calibration=Calibration(images, torch.zeros(len(images), dtype=torch.long), 32),
        target=target, device=torch.device("cpu"), seed=0, prunable=layers, protected=["fc"], ledger=ledger,
        reduction=meter.reduction, reduction_of=lambda kept: meter.reduction_of(model, kept), train=train,
        log=lambda msg: None,
    )
    return ctx, meter


def _stage_widths(model: nn.Module) -> dict[str, int]:
    return {
        "residual1": model.conv1.out_channels, "residual2": model.layer2[0].conv2.out_channels,
        "residual3": model.layer3[0].conv2.out_channels,
        **{f"inner{s}": sum(b.conv1.out_channels for b in getattr(model, f"layer{s}")) for s in (1, 2, 3)},
    }


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_all_scope_gives_other_stage_widths_than_inner_at_half_the_macs(criterion):
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    widths = {}
    for scope in ("inner", "all"):
        model = _resnet()
        arch = registry.architectures.get("resnet20")
        ctx, meter = _ctx(model, arch.prunable_layers(model, scope), Target("macs", 0.5), images)
        result = compress(registry.criteria.get(criterion).from_kwargs(), model, ctx, meter)
        assert meter.within(result.achieved)
        widths[scope] = _stage_widths(model)
    assert widths["inner"]["residual1"] == 16 and widths["inner"]["residual3"] == 64
    assert widths["all"] != widths["inner"]
    assert any(widths["all"][f"residual{s}"] < full for s, full in ((1, 16), (2, 32), (3, 64)))
    # with residual channels sharing the cut, the inner convs keep more channels
    assert sum(widths["all"][f"inner{s}"] for s in (1, 2, 3)) > sum(widths["inner"][f"inner{s}"] for s in (1, 2, 3))


SCORE = ["l1", "random", "coring", "qsfm"]


@pytest.mark.parametrize("criterion", SCORE)
@pytest.mark.parametrize("allocation", ["uniform", "global", "profile"])
def test_every_score_criterion_and_allocation_runs_with_scope_all(criterion, allocation):
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = _resnet()
    layers = _all_layers(model)
    ctx, meter = _ctx(model, layers, Target("macs", 0.4), images)
    profile = {n: (0.5 if n.endswith("conv1") else 0.25) for n in layers if n != "conv1"}
    result = compress(registry.criteria.get(criterion).from_kwargs(), model, ctx, meter,
                      allocation=allocation, profile=profile if allocation == "profile" else None)
    _assert_met_and_replayable(model, ctx, meter, result, images)


def test_k_shot_runs_with_scope_all():
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    model = _resnet()
    ctx, meter = _ctx(model, _all_layers(model), Target("macs", 0.5), images)
    result = compress(registry.criteria.get("coring").from_kwargs(), model, ctx, meter, shots=3, shot_epochs=0.0)
    assert meter.within(result.achieved) and result.knob["shots"] == 3
    assert len({s["layer"] for s in result.plan}) <= 12 and len(result.plan) > 12  # units pruned in several shots


def test_a_profile_ignores_layers_the_scope_does_not_prune():
    images = torch.randn(8, 3, 8, 8)
    model = _resnet()
    arch = registry.architectures.get("resnet20")
    ctx, meter = _ctx(model, arch.prunable_layers(model, "inner"), Target("macs", 0.3), images)
    profile = {n: 0.5 for n in _all_layers(model)}
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, allocation="profile",
                      profile=profile)
    assert meter.within(result.achieved)
    assert "layer1.0.conv2" in result.knob["profile_ignored"] and "conv1" in result.knob["profile_ignored"]
    assert model.conv1.out_channels == 16


def test_members_of_one_unit_must_agree_in_a_profile():
    from prunebench.errors import ConfigError

    images = torch.randn(8, 3, 8, 8)
    model = _resnet()
    ctx, meter = _ctx(model, _all_layers(model), Target("macs", 0.3), images)
    with pytest.raises(ConfigError, match="share their output channels"):
        compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, allocation="profile",
                 profile={"layer1.0.conv2": 0.3, "layer1.1.conv2": 0.5})


@pytest.mark.parametrize("depth", [20, 56, 110])
def test_resnets_end_to_end_with_scope_all_and_a_save_load_round_trip(depth, tmp_path):
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(depth))
    model = _resnet(depth)
    layers = registry.architectures.get(f"resnet{depth}").prunable_layers(model, "all")
    assert len(layers) == 1 + (depth - 2)  # the stem and two convs per block
    ctx, meter = _ctx(model, layers, Target("macs", 0.5), images)
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter)
    assert meter.within(result.achieved)
    assert model.layer3[0].conv2.out_channels < 64 or model.layer2[0].conv2.out_channels < 32
    path = tmp_path / "m.pt"
    save_compressed(path, f"resnet{depth}", {"num_classes": 10, "in_channels": 3}, result.plan, model,
                    list(ctx.example_inputs.shape))
    loaded, info = load_compressed(path)
    for name, m in model.named_modules():
        if isinstance(m, PadShortcut):
            assert loaded.get_submodule(name).mapping() == m.mapping()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(images), model.eval()(images))
    assert count_macs(loaded, ctx.example_inputs) == count_macs(model, ctx.example_inputs)


@pytest.mark.parametrize("criterion, params", [
    ("hbgs", {}), ("hbgs-b", {}), ("hbgts", {"lazy": True}), ("hbgts-b", {"lazy": True, "output": "last_bn"}),
])
def test_allocate_criteria_run_with_scope_all(criterion, params):
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    model = _resnet()
    ctx, meter = _ctx(model, _all_layers(model), Target("macs", 0.4), images)
    messages = []
    ctx.log = messages.append
    result = compress(registry.criteria.get(criterion).from_kwargs(**params), model, ctx, meter)
    _assert_met_and_replayable(model, ctx, meter, result, images)
    assert "widths" in messages[-1]


@pytest.mark.parametrize("criterion", ["ht2", "trp"])
def test_transform_criteria_run_on_the_same_setup(criterion):
    """Transform criteria factorise layers and ignore the pruning scope; they run all the same."""
    images = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    model = _resnet()
    ctx, meter = _ctx(model, _all_layers(model), Target("macs", 0.4, 0.02), images)
    result = compress(registry.criteria.get(criterion).from_kwargs(), model, ctx, meter)
    assert meter.within(result.achieved)
