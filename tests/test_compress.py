"""The harness meets targets within tolerance for every allocation, and removes what scores say."""

import copy

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.errors import ConfigError, PluginError, TargetMissedError
from prunebench.pipeline.allocation import plan_scores, unit_profile, unit_scores
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.surgery import prune_kept, pruning_units
from prunebench.protocols import (
    AllocateCriterion,
    CompressionContext,
    Criterion,
    EpochLedger,
    Knob,
    ScoreCriterion,
    Target,
    TrainingHooks,
    TransformCriterion,
)
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
    assert str(exc.value) == message
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
    from prunebench.pipeline.surgery import replay

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



# --- compress.py mutants: allocation decisions, the measured reduction and one-line errors ---
# A two-conv chain whose parameter count is known in closed form: conv 1->a (3x3, no bias),
# conv a->b (3x3, no bias), global pooling, linear b->2 with bias.
def _chain():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    ).eval()


def _reduction(removed0, removed2):
    """Parameter reduction of the chain with this many channels removed from each conv (by hand)."""
    a, b = 8 - removed0, 8 - removed2
    return 1 - (9 * a + 9 * a * b + 2 * b + 2) / 666


class _Fixed(ScoreCriterion):
    name = "fixed"

    def __init__(self, given):
        super().__init__()
        self.given = given

    def scores(self, model, layers, calibration):
        return {n: torch.tensor(self.given[n], dtype=torch.float64) for n in layers}


def _removed(original, pruned):
    """Output channels each chain conv lost, found by matching the surviving filters' weights."""
    w0, p0 = original[0].weight, pruned[0].weight
    kept0 = [i for i in range(8) if any(torch.equal(w0[i], w) for w in p0)]
    w2, p2 = original[2].weight[:, kept0], pruned[2].weight
    kept2 = [j for j in range(8) if any(torch.equal(w2[j], w) for w in p2)]
    assert (len(kept0), len(kept2)) == (p0.shape[0], p2.shape[0])  # each filter matched once
    return sorted(set(range(8)) - set(kept0)), sorted(set(range(8)) - set(kept2))


def _run_chain(crit, target, prunable=("0", "2"), **kw):
    model = _chain()
    original = copy.deepcopy(model)
    ctx, meter = make_ctx(model, list(prunable), target)
    logs = []
    ctx.log = logs.append
    result = compress(crit, model, ctx, meter, **kw)
    # the model itself, counted by hand
    assert sum(p.numel() for p in model.parameters()) == round((1 - result.achieved) * 666)
    assert abs(result.achieved - target.ratio) <= target.tolerance
    return result, _removed(original, model), logs


_S0 = [5, 1, 7, 3, 8, 2, 6, 4]
_S2 = [40, 10, 80, 20, 70, 30, 60, 50]


@pytest.mark.parametrize("s0, s2, ratio, removed", [
    # 4 + 4 channels land in the band: each layer loses the same share, its lowest scores
    (_S0, _S2, _reduction(4, 4), ([1, 3, 5, 7], [0, 1, 3, 5])),
    # one more channel must go, and either layer's would land in the band: the one whose next
    # channel has the lower normalised score (conv 2's 45, against conv 0's 5) goes
    (_S0, [40, 10, 80, 20, 70, 30, 90, 45], 0.777, ([1, 3, 5, 7], [0, 1, 3, 5, 7])),
    # conv 0's next channel is cheaper, but removing it would overshoot the band: conv 2's goes
    ([5, 1, 7, 3, 8, 2, 9, 4.5], _S2, 0.766, ([1, 3, 5, 7], [0, 1, 3, 5, 7])),
], ids=["even", "top-up-cheapest", "top-up-within-band"])
def test_uniform_removes_each_layers_lowest_scores_in_equal_shares(s0, s2, ratio, removed):
    assert abs(_reduction(4, 5) - ratio) <= 0.01 or ratio == _reduction(4, 4)
    _, got, _ = _run_chain(_Fixed({"0": s0, "2": s2}), Target("params", ratio), allocation="uniform")
    assert got == removed


@pytest.mark.parametrize("k, expected", [(5, ([0, 1], [0, 1, 2])), (9, ([0, 1, 2, 3, 4], [0, 1, 2, 3]))])
def test_global_removes_the_lowest_mean_normalised_scores_across_layers(k, expected):
    s0 = [1000 + 100 * i for i in range(8)]  # large raw scores, evenly spread
    s2 = [5, 5.1, 5.2, 14, 15, 16, 17, 18]  # small raw scores, three nearly the lowest
    norm = {k: [(v - min(s)) / (sum(s) / 8 - min(s)) for v in s] for k, s in (("0", s0), ("2", s2))}
    lowest = sorted((v, k, i) for k, vs in norm.items() for i, v in enumerate(vs))[:k]
    assert expected == ([i for _, n, i in lowest if n == "0"], [i for _, n, i in lowest if n == "2"])
    ratio = _reduction(len(expected[0]), len(expected[1])) + 1e-9
    result, got, _ = _run_chain(_Fixed({"0": s0, "2": s2}), Target("params", ratio), allocation="global")
    assert got == expected
    assert result.knob == {"allocation": "global"}


def test_profile_scales_the_given_ratios_and_leaves_unlisted_layers_whole():
    # 0.2 : 0.4 of 8 channels, scaled by one factor (1.25) to meet the target
    crit = _Fixed({"0": _S0, "2": _S2})
    _, got, logs = _run_chain(crit, Target("params", _reduction(2, 4) + 0.005), allocation="profile",
                              profile={"0": 0.2, "2": 0.4})
    assert got == ([1, 5], [0, 1, 3, 5]) and logs == []
    # a layer outside the pruned scope is skipped (and reported) without ending the profile;
    # a prunable layer the profile does not name keeps all its channels
    result, got, logs = _run_chain(crit, Target("params", _reduction(4, 0) + 0.005), allocation="profile",
                                   profile={"6": 0.3, "0": 0.5})
    assert got == ([1, 3, 5, 7], [])
    assert result.knob == {"allocation": "profile", "profile_ignored": ["6"]}
    assert len(logs) == 1 and logs[0].endswith(": 6") and "1 layer(s)" in logs[0]  # one line, naming it


def test_max_layer_ratio_lets_a_layer_keep_a_single_channel_but_no_fewer():
    crit = _Fixed({"0": _S0})
    # 90% of 8 channels rounds down to 7: one channel, conv 0's most important, survives
    _, got, _ = _run_chain(crit, Target("params", _reduction(7, 0)), prunable=("0",))
    assert got == ([0, 1, 2, 3, 5, 6, 7], [])
    message = ("could not reach a params reduction of 95.0% ± 1.0%: closest 85.14%. The architecture's "
               "prunable layers may not allow it (see `prunebench info --arch`), or raise --max-layer-ratio.")
    for ratio in (0.95, 0.99):  # even where removing the last channel would land in the band
        with pytest.raises(TargetMissedError) as exc:
            _run_chain(crit, Target("params", ratio), prunable=("0",))
        assert str(exc.value) == message.replace("95.0%", f"{ratio:.1%}")


def test_k_shot_meets_each_shots_share_of_the_target_and_its_plan_replays():
    from prunebench.pipeline.surgery import replay

    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", 0.64))
    after_first = []
    ctx.train = lambda m, epochs, hooks=None, purpose="": after_first.append(
        (1 - sum(p.numel() for p in m.parameters()) / 666, epochs, purpose))
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, shots=2, shot_epochs=0.5)
    assert len(after_first) == 1 and after_first[0][1:] == (0.5, "k-shot")
    assert abs(after_first[0][0] - 0.32) <= 0.01  # the first shot removes half the target
    assert abs(result.achieved - 0.64) <= 0.01
    assert result.achieved == 1 - sum(p.numel() for p in model.parameters()) / 666
    assert result.knob == {"allocation": "uniform", "shots": 2, "shot_epochs": 0.5}
    assert meter.target == Target("params", 0.64)  # the full target again, for whoever measures next
    fresh = _chain()
    replay(fresh, ctx.example_inputs, result.plan)
    fresh.load_state_dict(model.state_dict())
    assert [fresh[i].weight.shape for i in (0, 2)] == [model[i].weight.shape for i in (0, 2)]


def test_ties_are_broken_by_the_run_seed_not_the_global_generator():
    crit = _Fixed({"0": [1.0] * 8, "2": [1.0] * 8})
    removed = []
    for global_seed in (1, 2):
        model = _chain()
        original = copy.deepcopy(model)
        ctx, meter = make_ctx(model, ["0", "2"], Target("params", _reduction(4, 4)))
        torch.manual_seed(global_seed)
        compress(crit, model, ctx, meter)
        removed.append(_removed(original, model))
    assert removed[0] == removed[1]


def test_prune_and_count_fallback_allocates_as_the_cost_model_does(monkeypatch):
    """The same decision as with the cost model (the top-up case of the uniform test above)."""
    monkeypatch.setattr(Meter, "cost_model", lambda self, model, units: None)
    crit = _Fixed({"0": _S0, "2": [40, 10, 80, 20, 70, 30, 90, 45]})
    _, got, _ = _run_chain(crit, Target("params", 0.777), allocation="uniform")
    assert got == ([1, 3, 5, 7], [0, 1, 3, 5, 7])


def test_a_target_finer_than_one_channel_names_the_closest_reachable():
    # removing any one channel of conv 0 removes 12.2% of the parameters: 5% +- 1% is out of reach,
    # and keeping everything (0%) is the closest
    with pytest.raises(TargetMissedError) as exc:
        _run_chain(_Fixed({"0": _S0}), Target("params", 0.05), prunable=("0",), allocation="global")
    assert str(exc.value).startswith("could not reach a params reduction of 5.0% ± 1.0%: closest 0.00%. ")


class _Alloc(AllocateCriterion):
    """Probes a few plans through ``ctx.reduction_of`` (recording model widths), then keeps ``kept``."""

    name = "alloc"

    def __init__(self, kept, probes):
        super().__init__()
        self.kept, self.probes = kept, probes

    def allocate(self, model, ctx):
        self.seen = [ctx.reduction_of(p) for p in self.probes]
        self.widths = [model[0].out_channels, model[2].out_channels]
        return self.kept


_PROBES = [{"0": [0, 1, 2, 3]}, {"0": list(range(8)), "2": [0, 1]}, {"2": [5]}]


@pytest.mark.parametrize("cost_model", [True, False], ids=["cost-model", "prune-and-count"])
def test_allocate_plans_are_measured_exactly_and_a_plan_at_the_band_edge_is_accepted(cost_model, monkeypatch):
    if not cost_model:  # the fallback when the cost model does not validate: prune a copy and count
        monkeypatch.setattr(Meter, "cost_model", lambda self, model, units: None)
    achieved = _reduction(4, 0)
    model = _chain()
    # exactly one tolerance away from the target: inside the closed band
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", 0.9, tolerance=0.9 - achieved))
    crit = _Alloc({"0": torch.tensor([0, 1, 2, 3])}, _PROBES)
    result = compress(crit, model, ctx, meter)
    assert crit.seen == [pytest.approx(r, abs=1e-12) for r in (_reduction(4, 0), _reduction(0, 6), _reduction(0, 7))]
    assert crit.widths == [8, 8]  # probing never touches the model
    assert result.achieved == achieved and model[0].out_channels == 4
    assert result.search_evaluations == len(_PROBES) + 1  # every probe and the final count
    assert (result.knob, [s["layer"] for s in result.plan]) == ({}, ["0"])


@pytest.mark.parametrize("kept, message", [
    ({"0": [0, 1, 2, 3]}, "criterion 'alloc' reached 48.65% params reduction, outside 30.0% ± 1.0%"),
    ({"6": [0]}, "criterion 'alloc' allocated non-prunable layers: ['6']"),
    ({n: [0] for n in "abcdef"}, "criterion 'alloc' allocated non-prunable layers: ['a', 'b', 'c', 'd', 'e']"),
], ids=["missed", "non-prunable", "non-prunable-many"])
def test_allocate_errors_are_one_line(kept, message):
    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", 0.3))
    with pytest.raises((TargetMissedError, PluginError)) as exc:
        compress(_Alloc({k: torch.tensor(v) for k, v in kept.items()}, []), model, ctx, meter)
    assert str(exc.value) == message


@pytest.mark.parametrize("kw, message", [
    ({"allocation": "bogus"}, "unknown allocation 'bogus'. Available: uniform, global, profile"),
    ({"allocation": "profile"}, "allocation 'profile' needs per-layer ratios (--layer-ratios FILE)"),
    ({"allocation": "profile", "profile": {"layer1.0.conv": 0.5}},
     "layer-ratio profile names 'layer1.0.conv', which is not a layer of the model. Did you mean "
     "'layer1.0.conv1' or 'layer3.0.conv1' or 'layer2.0.conv1'? Prunable: layer1.0.conv1, layer1.1.conv1, "
     "layer1.2.conv1, layer2.0.conv1, layer2.1.conv1, layer2.2.conv1, layer3.0.conv1, layer3.1.conv1..."),
], ids=["allocation", "no-profile", "profile-layer"])
def test_allocation_config_errors_are_one_line(kw, message):
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", 0.3))
    with pytest.raises(ConfigError) as exc:
        compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, **kw)
    assert str(exc.value) == message


def test_plan_scores_rejects_a_profile_of_non_units():
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    example = torch.randn(1, 1, 8, 8)
    units = pruning_units(model, example, arch.prunable(model))
    with pytest.raises(ConfigError) as exc:
        plan_scores(units, {u.root: torch.rand(u.channels) for u in units}, Meter(model, example, Target()),
                    model, "profile", 0.9, 0, {f"x{i}": 0.1 for i in range(7)})
    assert str(exc.value) == (
        "layer-ratio profile names layers that are not prunable units: ['x0', 'x1', 'x2', 'x3', 'x4']. "
        "Prunable: layer1.0.conv1, layer1.1.conv1, layer1.2.conv1, layer2.0.conv1, layer2.1.conv1, "
        "layer2.2.conv1, layer3.0.conv1, layer3.1.conv1...")


def test_members_of_one_unit_share_a_profile_ratio_and_their_scores_add():
    model = TinyNet()
    units = pruning_units(model, torch.randn(1, 3, 8, 8), ["stem.0", "conv2", "conv1"])
    assert unit_profile({"stem.0": 0.3, "conv2": 0.3}, units, model) == ({"stem.0": 0.3}, [])
    with pytest.raises(ConfigError) as exc:
        unit_profile({"stem.0": 0.3, "conv2": 0.5}, units, model)
    assert str(exc.value) == ("layer-ratio profile gives 'stem.0' ratio 0.3 and 'conv2' ratio 0.5, but they share "
                              "their output channels (one pruning unit): give them one ratio")
    given = {"stem.0": [float(i) for i in range(12)], "conv2": [float(12 - i) ** 2 for i in range(12)],
             "conv1": [1.0] * 24}
    summed = unit_scores(_Fixed(given), model, units, None)
    assert summed["stem.0"].tolist() == [i + (12 - i) ** 2 for i in range(12)]
    assert summed["conv1"].tolist() == [1.0] * 24


class _Toy(TransformCriterion):
    """Removes floor(8 * share) of conv 0's channels, where share is the knob or one minus it."""

    name = "toy"
    knob = Knob("frac", 0.0, 1.0, increases_compression=True)

    def __init__(self, hooks=None, epochs=0.0):
        super().__init__()
        self.hooks, self.epochs, self.values = hooks, epochs, []

    def training_epochs(self, ctx):
        return self.epochs

    def training_hooks(self, model, ctx):
        return self.hooks

    def transform(self, model, value, ctx):
        self.values.append(value)
        share = value if self.knob.increases_compression else 1 - value
        n = min(7, int(share * 8))
        return prune_kept(model, ctx.example_inputs, {"0": torch.arange(n, 8)})

    @classmethod
    def rebuild_module(cls, original, spec):
        raise NotImplementedError


class _ToyKeep(_Toy):
    knob = Knob("keep", 0.0, 1.0, increases_compression=False)


@pytest.mark.parametrize("crit, removed, values", [
    (_Toy, 2, [0.5, 0.25]), (_ToyKeep, 2, [0.5, 0.75]), (_Toy, 6, [0.5, 0.75]), (_ToyKeep, 6, [0.5, 0.25]),
], ids=["increasing-down", "decreasing-up", "increasing-up", "decreasing-down"])
def test_transform_knob_is_bisected_in_its_direction_to_the_target(crit, removed, values):
    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", _reduction(removed, 0)))
    c = crit()
    result = compress(c, model, ctx, meter)
    # 0.5 removes 4 channels (too many or too few), the next midpoint in the right direction lands
    assert c.values == [*values, values[-1]]  # two probes on copies, then the model itself
    assert result.knob == {c.knob.name: values[-1]} and model[0].out_channels == 8 - removed
    assert result.achieved == _reduction(removed, 0) and result.search_evaluations == 3
    assert [s["layer"] for s in result.plan] == ["0"]


def test_transform_out_of_reach_is_a_one_line_error():
    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", 0.95))
    with pytest.raises(TargetMissedError) as exc:
        compress(_Toy(), model, ctx, meter)
    assert str(exc.value) == ("toy: no frac in [0.0, 1.0] gives 95.0% ± 1.0% params reduction; "
                              "closest 85.14% at frac=0.8750")
    assert model[0].out_channels == 8


class _Hooks(TrainingHooks):
    def _after_step(self, model, step):  # private helpers are not checked, however named
        pass


class _TypoHooks(TrainingHooks):
    def after_stepp(self, model, step):
        pass

    def helper(self):  # not close to any hook name: allowed
        pass


@pytest.mark.parametrize("hooks, message", [
    (_TypoHooks(), "criterion 'toy': hook method 'after_stepp' is not a training hook and would never be called. "
                   "Did you mean 'after_step'? Hooks: after_backward, after_step, extra_loss, on_train_end"),
    ("hooks", "criterion 'toy': training_hooks() must return a TrainingHooks, got 'hooks'"),
], ids=["typo", "not-hooks"])
def test_transform_training_hooks_are_checked_before_training(hooks, message):
    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", _reduction(2, 0)))
    trained = []
    ctx.train = lambda *a, **k: trained.append(k)
    with pytest.raises(PluginError) as exc:
        compress(_Toy(hooks, epochs=1.5), model, ctx, meter)
    assert str(exc.value) == message and trained == []


def test_transform_trains_with_its_hooks_for_its_epochs_first():
    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", _reduction(2, 0)))
    hooks, trained = _Hooks(), []
    ctx.train = lambda m, epochs, hooks=None, purpose="": trained.append((m, epochs, hooks, purpose))
    compress(_Toy(hooks, epochs=0.5), model, ctx, meter)
    assert trained == [(model, 0.5, hooks, "toy")]
    model = _chain()
    ctx2, meter = make_ctx(model, ["0", "2"], Target("params", _reduction(2, 0)))
    ctx2.train = ctx.train
    compress(_Toy(hooks, epochs=0.0), model, ctx2, meter)  # no epochs: no training
    assert len(trained) == 1


def test_k_shot_trains_between_shots_only_when_given_epochs_and_shots_must_be_positive():
    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", 0.64))
    trained = []
    ctx.train = lambda *a, **k: trained.append(a)
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, shots=2)
    assert trained == [] and result.knob == {"allocation": "uniform", "shots": 2, "shot_epochs": 0.0}
    with pytest.raises(ConfigError) as exc:
        compress(registry.criteria.get("l1").from_kwargs(), _chain(), ctx, meter, shots=0)
    assert str(exc.value) == "--shots must be at least 1, got 0"


@pytest.mark.parametrize("count, listed", [
    (6, "layer1.0.conv2, layer1.1.conv2, layer1.2.conv2, layer2.0.conv2, layer2.1.conv2, layer2.2.conv2"),
    (7, "layer1.0.conv2, layer1.1.conv2, layer1.2.conv2, layer2.0.conv2, layer2.1.conv2, layer2.2.conv2..."),
])
def test_profile_layers_outside_the_scope_are_logged_once_by_name(count, listed):
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=1).eval()
    outside = [f"layer{i}.{j}.conv2" for i in (1, 2, 3) for j in range(3)][:count]
    ctx, meter = make_ctx(model, arch.prunable(model), Target("macs", 0.3))
    logs = []
    ctx.log = logs.append
    profile = {**{n: 0.5 for n in outside}, **{n: 0.5 for n in arch.prunable(model)}}
    result = compress(registry.criteria.get("l1").from_kwargs(), model, ctx, meter, allocation="profile",
                      profile=profile, shots=2)
    # one line (in the first shot only), naming how many and the first six
    assert len(logs) == 1 and logs[0].endswith(f": {listed}") and f" {count} layer(s) " in logs[0]
    assert result.knob["profile_ignored"] == outside


class _Recording(_Fixed):
    def compensate(self, model, removal, calibration):
        self.removal = {k: v.tolist() for k, v in removal.items()}
        self.widths = [model[0].out_channels, model[2].out_channels]


def test_compensate_sees_the_removed_channels_before_they_go():
    crit = _Recording({"0": _S0, "2": _S2})
    _, got, _ = _run_chain(crit, Target("params", _reduction(4, 4)))
    assert crit.removal == {"0": got[0], "2": got[1]} == {"0": [1, 3, 5, 7], "2": [0, 1, 3, 5]}
    assert crit.widths == [8, 8]


def test_a_criterion_of_no_known_kind_is_a_plugin_error():
    class _Kindless(Criterion):
        name = "kindless"

    model = _chain()
    ctx, meter = make_ctx(model, ["0", "2"], Target("params", 0.3))
    with pytest.raises(PluginError, match=r"^criterion <.*_Kindless object at 0x[0-9a-f]+> has no known kind$"):
        compress(_Kindless(), model, ctx, meter)
