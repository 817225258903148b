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
