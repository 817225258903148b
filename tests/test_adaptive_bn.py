"""Adaptive BN (EagleEye): BatchNorm statistics re-estimated on calibration images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunebench import registry
from prunebench.pipeline.adaptive_bn import batchnorms, recalibrate_bn
from prunebench.pipeline.metrics import accuracy
from prunebench.pipeline.runner import oneshot_bn
from prunebench.protocols import Calibration
from prunebench.testing import TinyNet
from prunebench.training.engine import DeviceData, train
from prunebench.training.steps import Recipe


def device_data(n_train: int = 512) -> DeviceData:
    splits = registry.datasets.get("synthetic").load(n_train=n_train, n_test=256, num_classes=4, size=16, noise=0.1)
    c = splits.in_channels
    return DeviceData(splits.train_x, splits.train_y, splits.test_x, splits.test_y,
                      torch.tensor(splits.mean).view(1, c, 1, 1), torch.tensor(splits.std).view(1, c, 1, 1), True)


@pytest.fixture(scope="module")
def trained():
    """TinyNet trained on the synthetic task (a few seconds), with its test accuracy."""
    torch.manual_seed(0)
    data = device_data()
    model = TinyNet(num_classes=4)
    train(model, data, Recipe(epochs=6, lr=0.1, batch_size=64, momentum=0.9, weight_decay=5e-4,
                              schedule="onecycle"), seed=0)
    top1 = accuracy(model, data.normalise(data.test_x), data.test_y)[1]
    assert top1 > 90, top1  # the task is learnable; otherwise the recovery test below means nothing
    return model, data, top1


def perturb(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for bn in batchnorms(model):
        bn.running_mean += 2.0 * torch.randn(bn.running_mean.shape, generator=gen)
        bn.running_var *= 6.0


def test_only_batchnorm_buffers_change(trained):
    model, data, _ = trained
    model = _copy(model)
    perturb(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_buffers = {f"{name}.{b}" for name, m in model.named_modules() if m in batchnorms(model)
                  for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert recalibrate_bn(model, data.normalise(data.train_x[:256]), batch_size=64) == len(batchnorms(model))
    after = model.state_dict()
    for key, value in before.items():
        if key in bn_buffers:
            continue
        assert torch.equal(after[key], value), f"{key} changed"
    changed = [k for k in bn_buffers if k.endswith("running_mean") and not torch.equal(after[k], before[k])]
    assert len(changed) == len(batchnorms(model))
    assert all(int(after[k]) == 4 for k in bn_buffers if k.endswith("num_batches_tracked"))  # 256 / 64 batches


def test_recovers_accuracy_after_the_statistics_were_perturbed(trained):
    model, data, top1 = trained
    model = _copy(model)
    perturb(model)
    broken = accuracy(model, data.normalise(data.test_x), data.test_y)[1]
    assert broken < top1 - 30, (broken, top1)
    recalibrate_bn(model, data.normalise(data.train_x[:256]))
    recovered = accuracy(model, data.normalise(data.test_x), data.test_y)[1]
    assert recovered >= top1 - 2.0, (recovered, top1)


def test_statistics_are_a_cumulative_average_over_the_batches():
    torch.manual_seed(0)
    model = TinyNet(num_classes=4)
    images = torch.randn(96, 3, 16, 16)
    recalibrate_bn(model, images, batch_size=32)
    stem_out = model.stem[0](images)  # what the first BatchNorm sees
    # equal batches: the running mean is the mean over all images, not a momentum-weighted one
    assert torch.allclose(model.stem[1].running_mean, stem_out.mean(dim=(0, 2, 3)), atol=1e-5)
    per_batch = torch.stack([stem_out[i:i + 32].var(dim=(0, 2, 3), unbiased=True) for i in (0, 32, 64)])
    assert torch.allclose(model.stem[1].running_var, per_batch.mean(0), atol=1e-4)
    assert model.stem[1].momentum == 0.1 and not model.training  # restored


def test_other_layers_stay_in_evaluation_mode():
    modes = []

    class Spy(nn.Module):
        def forward(self, x):
            modes.append(self.training)
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), Spy())
    model.train()
    recalibrate_bn(model, torch.randn(8, 3, 8, 8), batch_size=4)
    assert modes == [False, False] and not model.training


def test_oneshot_bn_measures_a_copy(trained):
    model, data, top1 = trained
    model = _copy(model)
    perturb(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = Calibration(images=data.normalise(data.train_x[:256]), labels=data.train_y[:256], batch_size=64)
    result = oneshot_bn(model, calibration, data, num_classes=4)
    assert result["top1"] >= top1 - 2.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the run's model is untouched
    assert oneshot_bn(nn.Sequential(nn.Flatten(), nn.Linear(768, 4)), calibration, data, 4) is None


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
