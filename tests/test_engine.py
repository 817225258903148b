import torch
from torch import nn

from prunebench import registry
from prunebench.engine import DeviceData, Recipe, augment, lr_at, train
from prunebench.metrics import accuracy
from prunebench.protocols import TrainingHooks


def synthetic_data():
    splits = registry.datasets.get("synthetic").load(None, n_train=256, n_test=128, size=8, num_classes=4)
    c = splits.in_channels
    return DeviceData(splits.train_x, splits.train_y, splits.test_x, splits.test_y,
                      torch.tensor(splits.mean).view(1, c, 1, 1), torch.tensor(splits.std).view(1, c, 1, 1), True)


def small_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))


def test_augment_keeps_shape_dtype_and_content():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    y = augment(x, hflip=True, generator=g)
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.is_contiguous()
    # a crop of a zero-padded image: every output pixel is 0 or a pixel of the same image
    for i in range(16):
        assert set(y[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0}
    y2 = augment(x, hflip=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, y2)


def test_no_flip_when_not_label_preserving():
    # a one-hot image at column 0: without flips it can only move by the crop offset (≤ 1 pixel at 8×8)
    x = torch.zeros(64, 1, 8, 8, dtype=torch.uint8)
    x[:, :, :, 0] = 255
    y = augment(x, hflip=False, generator=torch.Generator().manual_seed(1))
    cols = y.float().sum((1, 2)).argmax(1)
    assert int(cols.max()) <= 1


def test_training_learns_and_is_deterministic_on_cpu():
    data = synthetic_data()
    recipe = Recipe(epochs=4, lr=0.05, batch_size=32, momentum=0.9, weight_decay=5e-4, schedule="onecycle")
    torch.manual_seed(0)
    a = small_net()
    torch.manual_seed(0)
    b = small_net()
    before = accuracy(a, data.normalise(data.test_x), data.test_y)[1]
    train(a, data, recipe, seed=3)
    train(b, data, recipe, seed=3)
    after = accuracy(a, data.normalise(data.test_x), data.test_y)[1]
    assert after > max(before, 60.0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_hooks_are_called_in_order():
    calls = []

    class Spy(TrainingHooks):
        def extra_loss(self, model):
            calls.append("loss")
            return 0.0 * sum(p.sum() for p in model.parameters())

        def after_backward(self, model, step):
            assert all(p.grad is not None for p in model.parameters())
            calls.append("backward")

        def after_step(self, model, step):
            calls.append("step")

        def on_train_end(self, model):
            calls.append("end")

    data = synthetic_data()
    train(small_net(), data, Recipe(epochs=2 / 8, lr=0.01, batch_size=32, momentum=0.9, weight_decay=0.0,
                                    schedule="constant"), seed=0, hooks=Spy())
    assert calls == ["loss", "backward", "step"] * 2 + ["end"]


def test_schedules():
    r = Recipe(1, 0.1, 1, 0.9, 0, "step", milestones=(0.5, 0.75))
    assert lr_at(r, 0, 100) == 0.1 and abs(lr_at(r, 60, 100) - 0.01) < 1e-12 and abs(lr_at(r, 80, 100) - 0.001) < 1e-12
    c = Recipe(1, 0.1, 1, 0.9, 0, "cosine")
    assert lr_at(c, 0, 100) == 0.1 and lr_at(c, 100, 100) < 1e-9
