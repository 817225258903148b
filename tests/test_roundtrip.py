"""Factorised models survive saving: save_compressed -> load_compressed (weights_only) rebuilds
the transform criteria's models from architecture + plan + state dict, with identical outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.pipeline.compress import compress
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.surgery import load_compressed, save_compressed
from prunebench.protocols import CompressionContext, EpochLedger, Target

pytestmark = pytest.mark.usefixtures("one_thread")


def compressed(criterion: str, arch_name: str, params: dict, ratio: float = 0.4):
    arch = registry.architectures.get(arch_name)
    torch.manual_seed(0)
    model = arch.build(num_classes=10, in_channels=1)
    with torch.no_grad():  # trained-looking BatchNorm statistics and affine parameters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    model.eval()
    example = torch.randn(1, 1, 8, 8)
    target = Target("macs", ratio)
    meter = Meter(copy.deepcopy(model), example, target)
    ctx = CompressionContext(
        example_inputs=example, calibration=None, target=target, device=torch.device("cpu"), seed=0,
        prunable=arch.prunable(model), protected=arch.protected(model), ledger=EpochLedger(0.0),
        reduction=meter.reduction, reduction_of=lambda kept: meter.reduction_of(model, kept),
        train=lambda *a, **k: None, log=lambda msg: None,
    )
    result = compress(registry.criteria.get(criterion).from_kwargs(**params), model, ctx, meter)
    return model.eval(), result, example


@pytest.mark.parametrize("criterion, arch, params", [
    ("ht2", "resnet20", {}),
    ("ht2", "mobilenetv2", {}),  # 1x1 convs (SVD) beside a depthwise conv
    ("trp", "resnet20", {}),
    ("trp", "resnet20", {"scheme": "spatial"}),
])
def test_factorised_model_round_trips_with_identical_outputs(tmp_path, criterion, arch, params):
    model, result, example = compressed(criterion, arch, params)
    replaced = [s for s in result.plan if s["op"] == "replace"]
    assert replaced and all(s["criterion"] == criterion for s in replaced)
    assert abs(result.achieved - 0.4) <= 0.01

    path = tmp_path / "model.pt"
    save_compressed(path, arch, {"num_classes": 10, "in_channels": 1}, result.plan, model, list(example.shape),
                    meta={"criterion": criterion})
    assert torch.load(path, weights_only=True)["format"] == "prunebench-compressed/1"
    rebuilt, info = load_compressed(path)  # weights_only inside
    rebuilt.eval()
    assert info["plan"] == result.plan and info["meta"] == {"criterion": criterion}
    assert repr(rebuilt) == repr(model)  # the same modules, wired the same way
    state = model.state_dict()
    assert rebuilt.state_dict().keys() == state.keys()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)
