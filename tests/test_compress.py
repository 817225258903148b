"""The harness meets targets within tolerance for every allocation, and removes what scores say."""

import copy

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.compress import Meter, compress
from prunebench.errors import ConfigError, PluginError, TargetMissedError
from prunebench.protocols import CompressionContext, EpochLedger, ScoreCriterion, Target
from prunebench.surgery import pruning_units
from prunebench.testing import TinyNet


def make_ctx(model, arch_prunable, target, seed=0):
    example = torch.randn(1, 1, 8, 8)
    meter = Meter(copy.deepcopy(model), example, target)
    ctx = CompressionContext(
        example_inputs=example, calibration=None, target=target, device=torch.device("cpu"), seed=seed,
        prunable=arch_prunable, protected=[], ledger=EpochLedger(0.0), reduction=meter.reduction,
        reduction_of=lambda kept: meter.reduction_of(model, kept), train=lambda *a, **k: None,
    )
    return ctx, meter


@pytest.mark.parametrize("criterion", ["l1", "random"])
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_macs_target_met_within_one_point(criterion, allocation, ratio):
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", ratio))
    crit = registry.criteria.get(criterion).from_kwargs()
    result = compress(crit, model, ctx, meter, allocation=allocation)
    assert abs(result.achieved - ratio) <= 0.01
    assert abs(meter.reduction(model) - ratio) <= 0.01  # the model itself, not an estimate
    assert model(ctx.example_inputs).shape == (1, 10)


def test_params_target_and_profile_allocation():
    """profile: every layer removes its profile ratio times one common factor (to a channel)."""
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    prunable = arch.prunable(model)
    channels = {n: model.get_submodule(n).out_channels for n in prunable}
    ctx, meter = make_ctx(model, prunable, Target("params", 0.4))
    profile = {n: {"layer1": 0.1, "layer2": 0.3, "layer3": 0.6}[n.split(".")[0]] for n in prunable}
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter,
                      allocation="profile", profile=profile)
    assert abs(result.achieved - 0.4) <= 0.01
    removed = {n: c - model.get_submodule(n).out_channels for n, c in channels.items()}
    factor = sum(removed.values()) / sum(profile[n] * c for n, c in channels.items())
    for n, c in channels.items():  # rounding to whole channels, plus at most one channel of top-up
        assert abs(removed[n] - factor * profile[n] * c) <= 1.5, (n, removed, factor)
    # uniform would remove about the same share everywhere; the profile asks for 1 : 3 : 6
    assert removed["layer1.0.conv1"] / 16 < 0.5 * removed["layer2.0.conv1"] / 32 < removed["layer3.0.conv1"] / 64


def test_profile_with_unknown_layer_is_rejected():
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", 0.3))
    with pytest.raises(ConfigError, match="not a layer of the model"):
        compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter,
                 allocation="profile", profile={"layer9.conv": 0.5})


def test_impossible_target_is_a_clear_error():
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    # only inner convs are prunable, capped at 90% each: 95% of MACs cannot be removed
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", 0.95))
    with pytest.raises(TargetMissedError, match="closest"):
        compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter)


def test_l1_scores_are_the_filters_absolute_sums():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv2d(5, 4, (1, 2)))
    s = registry.criteria.get("l1")().scores(model, ["0", "1"], None)
    for name, conv in (("0", model[0]), ("1", model[1])):
        w = conv.weight.detach().tolist()
        expected = [sum(abs(v) for row in f for col in row for v in col) for f in w]  # one filter at a time
        assert s[name].tolist() == pytest.approx(expected, rel=1e-6)


def test_l1_removes_the_smallest_filters():
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    conv = model.get_submodule("layer1.0.conv1")
    with torch.no_grad():
        conv.weight[[2, 5, 11]] *= 1e-4  # three nearly-dead filters
        marker = conv.weight[[0, 1, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15]].clone()
    # one layer, ~3 channels' worth of MACs: exactly the nearly-dead filters must go
    ctx, meter = make_ctx(model, ["layer1.0.conv1"], Target("macs", 0.022, tolerance=0.004))
    compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, allocation="global", max_ratio=0.5)
    pruned = model.get_submodule("layer1.0.conv1")
    assert pruned.out_channels == 13
    for m in marker:  # every large filter survives
        assert any(torch.equal(w, m) for w in pruned.weight)


def test_coupled_prunable_layers_form_one_unit():
    model = TinyNet()
    units = pruning_units(model, torch.randn(1, 3, 8, 8), ["stem.0", "conv2", "conv1"])
    roots = {u.root: u.members for u in units}
    assert set(roots["stem.0"]) == {"stem.0", "conv2"}  # tied by the residual addition
    assert roots["conv1"] == ("conv1",)


class _Ones(ScoreCriterion):
    name = "bad"

    def scores(self, model, layers, calibration):
        modules = dict(model.named_modules())
        return {n: torch.ones(modules[n].out_channels) for n in layers}


class _Short(_Ones):
    def scores(self, model, layers, calibration):
        return {n: torch.ones(3) for n in layers}


class _NaN(_Ones):
    def scores(self, model, layers, calibration):
        out = super().scores(model, layers, calibration)
        out["layer2.1.conv1"][5] = float("nan")
        return out


class _Missing(_Ones):
    def scores(self, model, layers, calibration):
        out = super().scores(model, layers, calibration)
        del out["layer3.2.conv1"]
        return out


@pytest.mark.parametrize("criterion, message", [
    (_Short, "criterion 'bad' returned 3 scores for 'layer1.0.conv1', which has 16 output channels"),
    (_NaN, "criterion 'bad' returned non-finite scores for 'layer2.1.conv1'"),
    (_Missing, "criterion 'bad' returned no scores for layer 'layer3.2.conv1'"),
], ids=["length", "nan", "missing"])
def test_bad_scores_are_a_plugin_error(criterion, message):
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", 0.3))
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    with pytest.raises(PluginError) as exc:
        compress(criterion(), model, ctx, meter)
    assert message in str(exc.value)
    assert {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} == before


def test_random_depends_on_seed():
    model = nn.Sequential(nn.Conv2d(1, 8, 3))
    a = registry.criteria.get("random").from_kwargs(seed=0).scores(model, ["0"], None)["0"]
    b = registry.criteria.get("random").from_kwargs(seed=1).scores(model, ["0"], None)["0"]
    assert not torch.equal(a, b)


def test_k_shot_prunes_iteratively_and_charges_the_ledger():
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", 0.5))
    trained = []
    ctx.train = lambda m, epochs, hooks=None, purpose="compress": trained.append((epochs, purpose))
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, shots=3, shot_epochs=0.25)
    assert abs(result.achieved - 0.5) <= 0.01
    assert trained == [(0.25, "k-shot"), (0.25, "k-shot")]  # between shots only
    layers = [s["layer"] for s in result.plan]
    assert len(layers) == 3 * len(arch.prunable(model))  # every layer pruned in each shot
    fresh = arch.build(num_classes=10, in_channels=1).eval()
    from prunebench.surgery import replay

    replay(fresh, ctx.example_inputs, result.plan)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.allclose(fresh(x), model(x), atol=1e-5)


# --- the built-in controls (l1, random) as a user sees them ------------------------------
@pytest.mark.parametrize("entry", ["l1", "random"])
def test_controls_are_data_free_and_described_by_prunebench_info(entry):
    from typer.testing import CliRunner

    from prunebench.cli import app

    ep = registry.criteria.entries()[entry]
    assert registry.criteria.get(entry).needs_data is False  # a bool, as the protocol declares
    res = CliRunner().invoke(app, ["info", "--criterion", entry])
    assert res.exit_code == 0, res.output
    header, summary, reference, params = res.output.splitlines()
    assert header == f"{entry} (score) from {ep.distribution} {ep.version}"  # no calibration data
    assert summary.startswith("  ") and summary.strip() not in ("", "None")
    assert reference.startswith("  reference: ") and reference[len("  reference: "):] not in ("", "None")
    assert params == "  no hyper-parameters"


@pytest.mark.parametrize("entry", ["l1", "random"])
def test_control_classes_used_directly_carry_their_entry_point_name(entry):
    """Before (or without) the registry, a control's errors name it as `prunebench list` does."""
    import importlib.util
    import re
    import runpy

    module, attr = registry.criteria.entries()[entry].value.split(":")
    # the class as its source defines it, not the loaded one the registry has named
    fresh = runpy.run_path(importlib.util.find_spec(module).origin)[attr]
    message = f"criterion {entry!r} has no hyper-parameter 'bogus'. Available: (none)"
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        fresh.from_kwargs(bogus=1)


def test_random_scores_come_from_the_seed_alone():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 5, 1))
    crit = registry.criteria.get("random").from_kwargs(seed=7)
    torch.manual_seed(0)
    a = crit.scores(model, ["0", "1"], None)
    torch.manual_seed(1)
    torch.rand(3)  # the global generator is elsewhere: the scores must not move
    b = crit.scores(model, ["0", "1"], None)
    assert a["0"].shape == (8,) and a["1"].shape == (5,)
    assert torch.equal(a["0"], b["0"]) and torch.equal(a["1"], b["1"])
    assert all(((s >= 0) & (s < 1)).all() for s in a.values())
