import torch

from prunebench import registry
from prunebench.surgery import load_compressed, prune_kept, replay, save_compressed


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
