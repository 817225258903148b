import dataclasses
import json
import re

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.errors import CheckpointError, ConfigError, PluginError
from prunebench.pipeline.surgery import load_compressed, prune_kept, pruning_units, replay, save_compressed


def test_pruned_model_round_trips_through_plan_and_weights_only_load(tmp_path):
    arch = registry.architectures.get("resnet20")
    model = arch.build(num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32)
    kept = {"layer1.0.conv1": [0, 2, 4, 6], "layer3.2.conv1": list(range(0, 64, 3))}
    plan = prune_kept(model, x[:1], kept)
    assert model.get_submodule("layer1.0.conv1").out_channels == 4
    assert model.get_submodule("layer1.0.conv2").in_channels == 4
    path = tmp_path / "m.pt"
    save_compressed(path, "resnet20", {"num_classes": 10, "in_channels": 3}, plan, model, [1, 3, 32, 32])
    raw = torch.load(path, weights_only=True)  # must not need pickle of arbitrary objects
    assert raw["format"] == "prunebench-compressed/1"
    rebuilt, info = load_compressed(path)
    rebuilt.eval()
    assert info["arch"] == "resnet20" and len(info["plan"]) == 2
    assert torch.allclose(rebuilt(x), model(x), atol=1e-6)


def test_replay_applies_steps_in_order():
    arch = registry.architectures.get("vgg16_bn")
    model = arch.build(num_classes=10, in_channels=1)
    x = torch.randn(1, 1, 8, 8)
    plan = prune_kept(model, x, {"features.0": [1, 2, 3]})
    fresh = arch.build(num_classes=10, in_channels=1)
    replay(fresh, x, plan)
    assert fresh.get_submodule("features.0").out_channels == 3
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_replay_of_two_prunings_of_one_layer_keeps_the_composed_channels():
    """Iterative pruning records the same layer twice; the second step's indices refer to the
    channels the first one kept, so replay must apply them in that order, not merge them."""
    arch = registry.architectures.get("resnet20")
    torch.manual_seed(0)
    model = arch.build(num_classes=10, in_channels=1).eval()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 1, 8, 8)
    first = [2, 3, 5, 7, 8, 10, 11, 13, 14, 15]  # of 16
    second = [1, 3, 5, 7, 9]  # of the 10 left: original channels 3, 7, 10, 13, 15
    plan = prune_kept(model, x[:1], {"layer1.0.conv1": first, "layer2.0.conv1": list(range(0, 32, 2))})
    plan += prune_kept(model, x[:1], {"layer1.0.conv1": second})
    assert [(s["layer"], s["channels"]) for s in plan] == [
        ("layer1.0.conv1", 16), ("layer2.0.conv1", 32), ("layer1.0.conv1", 10)]
    composed = [first[i] for i in second]
    assert composed == [3, 7, 10, 13, 15]
    torch.testing.assert_close(model.get_submodule("layer1.0.conv1").weight,
                               initial["layer1.0.conv1.weight"][composed], rtol=0, atol=0)

    fresh = arch.build(num_classes=10, in_channels=1)
    fresh.load_state_dict(initial)  # replay prunes the real weights: it must keep the same channels
    replay(fresh, x[:1], plan)
    fresh.eval()
    assert fresh.get_submodule("layer1.0.conv1").out_channels == 5
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


class _Residual(nn.Module):
    """``a`` and ``b`` are added (one unit of 4 channels); ``c`` is a conv of its own (3 channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 1)
        self.b = nn.Conv2d(1, 4, 1)
        self.c = nn.Conv2d(4, 3, 1)
        self.d = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.d(self.c(self.a(x) + self.b(x)))


class _CatAdd(nn.Module):
    """``cat(a, b) + c``: channels 0-1 of ``c`` are tied to ``a``, 2-3 to ``b``; no conv shares all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 2, 1)
        self.c = nn.Conv2d(1, 4, 1)
        self.d = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.d(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


_X = torch.zeros(1, 1, 4, 4)


def test_units_hold_only_convs_sharing_all_their_channels_and_are_immutable():
    torch.manual_seed(0)
    units = pruning_units(_Residual(), _X, ["c", "b", "a"])
    assert [(u.root, u.members, u.channels) for u in units] == [("c", ("c",), 3), ("b", ("b", "a"), 4)]
    # c's channels are tied to a's or b's one by one, but c (4 channels) shares no unit with them (2 each)
    units = pruning_units(_CatAdd(), _X, ["c", "a", "b"])
    assert [(u.root, u.members, u.channels) for u in units] == [("c", ("c",), 4), ("a", ("a",), 2), ("b", ("b",), 2)]
    assert len(set(units)) == 3  # hashable value objects
    with pytest.raises(dataclasses.FrozenInstanceError):
        units[0].channels = 1


def test_units_of_layers_that_do_not_exist_name_the_first_five():
    names = ["a", "n0", "n1", "n2", "n3", "n4", "n5"]
    with pytest.raises(PluginError, match=re.escape(
            "architecture declares prunable layers that do not exist: ['n0', 'n1', 'n2', 'n3', 'n4']") + "$"):
        pruning_units(_Residual(), _X, names)


def test_naming_two_members_of_a_unit_with_one_kept_set_prunes_the_unit_once():
    torch.manual_seed(0)
    model = _Residual()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prune_kept(model, _X, {"a": [0, 1, 3], "b": torch.tensor([3, 1, 0]), "c": [0, 2]})
    assert plan == [{"op": "prune", "layer": "a", "keep": [0, 1, 3], "channels": 4},
                    {"op": "prune", "layer": "c", "keep": [0, 2], "channels": 3}]
    for name, rows in (("a", [0, 1, 3]), ("b", [0, 1, 3])):
        torch.testing.assert_close(model.get_submodule(name).weight, before[f"{name}.weight"][rows], rtol=0, atol=0)
    torch.testing.assert_close(model.c.weight, before["c.weight"][[0, 2]][:, [0, 1, 3]], rtol=0, atol=0)
    assert model.d.in_channels == 2


def test_naming_two_members_of_a_unit_with_different_kept_sets_is_refused():
    model = _Residual()
    with pytest.raises(PluginError, match="^" + re.escape(
            "'b' and 'a' share their output channels (one pruning unit) but the plan keeps different channels "
            "of them; give one kept set per unit") + "$"):
        prune_kept(model, _X, {"a": [0, 1, 3], "b": [0, 1, 2]})


@pytest.mark.parametrize("keep", [[0, 1, 9], [0, 3], [-1, 0, 1], [-1, 0]])
def test_kept_indices_out_of_range_are_refused_before_any_change(keep):
    model = _Residual()
    with pytest.raises(PluginError, match="^" + re.escape("kept indices for 'c' out of range 0..2") + "$"):
        prune_kept(model, _X, {"c": keep})
    assert model.c.out_channels == 3


def test_a_plan_removing_every_channel_is_refused():
    with pytest.raises(ConfigError, match="^" + re.escape(
            "plan removes every channel of 'c'; at least one must stay") + "$"):
        prune_kept(_Residual(), _X, {"c": []})


def test_removing_every_channel_of_a_conv_tied_to_part_of_the_root_is_refused():
    model = _CatAdd()
    with pytest.raises(PluginError, match="^" + re.escape(
            "torch-pruning refused to prune 'c' (would remove all channels)") + "$"):
        prune_kept(model, _X, {"c": [0, 1]})  # b's channels are c's 2 and 3
    assert prune_kept(model, _X, {"c": [0, 2]}) == [{"op": "prune", "layer": "c", "keep": [0, 2], "channels": 4}]
    assert (model.a.out_channels, model.b.out_channels, model.d.in_channels) == (1, 1, 2)


@pytest.mark.parametrize("recorded_widths", [True, False])
def test_replay_keeps_two_consecutive_prunings_of_one_layer_apart(recorded_widths):
    torch.manual_seed(0)
    model = _Residual()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prune_kept(model, _X, {"c": [0, 2]}) + prune_kept(model, _X, {"c": [1]})
    if not recorded_widths:  # hand-written plans may leave out "channels"
        plan = [{k: v for k, v in step.items() if k != "channels"} for step in plan]
    fresh = _Residual()
    fresh.load_state_dict(initial)
    replay(fresh, _X, plan)
    torch.testing.assert_close(fresh.c.weight, initial["c.weight"][[2]], rtol=0, atol=0)


def test_replay_of_one_unit_pruned_under_two_member_names_keeps_the_composed_channels():
    """Two calls may name different members of one unit; the second call's indices refer to the
    channels the first one left, so replay must not merge the two steps into one call."""
    torch.manual_seed(0)
    model = _Residual()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prune_kept(model, _X, {"a": [0, 1, 3]}) + prune_kept(model, _X, {"b": [0, 2]})
    assert [(s["layer"], s["channels"]) for s in plan] == [("a", 4), ("b", 3)]
    fresh = _Residual()
    fresh.load_state_dict(initial)
    replay(fresh, _X, plan)
    for name in ("a", "b"):
        torch.testing.assert_close(fresh.get_submodule(name).weight, initial[f"{name}.weight"][[0, 3]], rtol=0, atol=0)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("step, shown", [({"op": "bogus"}, "'bogus'"), ({"layer": "c"}, "None")])
def test_replay_refuses_an_unknown_step(step, shown):
    with pytest.raises(PluginError, match="^" + re.escape(f"unknown plan step {shown}") + "$"):
        replay(_Residual(), _X, [step])


@pytest.fixture()
def compressed_file(tmp_path):
    """A valid compressed resnet20 file, and a writer of variants of its payload."""
    model = registry.architectures.get("resnet20").build(num_classes=10, in_channels=1)
    path = tmp_path / "good.pt"
    save_compressed(path, "resnet20", {"num_classes": 10, "in_channels": 1}, [], model, [1, 1, 8, 8])
    payload = torch.load(path, weights_only=True)

    def variant(changes=None, drop=(), raw=None):
        out = tmp_path / "variant.pt"
        data = {k: v for k, v in {**payload, **(changes or {})}.items() if k not in drop}
        torch.save(data if raw is None else raw, out)
        return out

    return path, payload, variant


def _load_error(path) -> str:
    with pytest.raises(CheckpointError) as exc:
        load_compressed(path)
    return str(exc.value)


def test_load_compressed_refuses_a_file_of_another_kind_naming_it(compressed_file):
    _, payload, variant = compressed_file
    for path in (variant(raw={"state_dict": payload["state_dict"]}), variant({"format": "prunebench-compressed/0"}),
                 variant(raw=torch.zeros(3))):
        assert _load_error(path) == (f"{path} is not a prunebench compressed-model file "
                                     "(no format 'prunebench-compressed/1')")


def test_load_compressed_names_every_missing_field(compressed_file):
    _, _, variant = compressed_file
    path = variant({}, drop=("plan", "meta"))
    assert _load_error(path) == f"compressed model {path} lacks plan, meta"


@pytest.mark.parametrize("changes", [
    {"arch_kwargs": json.dumps([10, 1])},  # a list, not an object
    {"plan": json.dumps({"op": "prune"})},  # an object, not a list
    {"input_shape": [8]},  # no channel dimension
])
def test_load_compressed_refuses_malformed_fields(compressed_file, changes):
    _, _, variant = compressed_file
    path = variant(changes)
    assert _load_error(path) == (f"compressed model {path} has malformed fields (arch_kwargs must be an object, "
                                 "plan a list, input_shape [N, C, ...])")


def test_load_compressed_accepts_the_shortest_input_shape(compressed_file):
    _, _, variant = compressed_file
    model, info = load_compressed(variant({"input_shape": [1, 1]}))  # [N, C]: enough to replay an empty plan
    assert info == {"arch": "resnet20", "plan": [], "meta": {}}
    assert model.get_submodule("conv1").in_channels == 1


def test_load_compressed_with_a_plan_that_does_not_apply_names_the_file_and_the_step(compressed_file):
    _, _, variant = compressed_file
    path = variant({"plan": json.dumps([{"op": "bogus"}])})
    assert _load_error(path) == (f"compressed model {path}: its plan does not apply to resnet20 "
                                 "(PluginError: unknown plan step 'bogus')")
