import torch
from torch import nn

from prunebench import registry
from prunebench.pipeline.metrics import accuracy
from prunebench.protocols import TrainingHooks
from prunebench.training.engine import DeviceData, augment, train
from prunebench.training.steps import Recipe, lr_at


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


# --- speed: precision, host reads, divergence -------------------------------------------------

import math  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from prunebench.errors import DivergedError  # noqa: E402
from prunebench.training.engine import Augmenter  # noqa: E402
from prunebench.training.steps import TrainOptions, optimizer  # noqa: E402


def reference_train(model, data, recipe, seed):
    """The plain loop the engine must equal in fp32 on a CPU: one ``float(loss)`` per step, the
    random draws made on a CPU generator in this order, no autocast, contiguous tensors."""
    n = int(data.train_x.shape[0])
    steps_per_epoch = max(1, n // recipe.batch_size)
    total = int(round(recipe.epochs * steps_per_epoch))
    model.train()
    opt = optimizer(model, recipe)
    gen = torch.Generator().manual_seed(seed)
    step, loss_sum, seen, correct, losses = 0, 0.0, 0, 0, []
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            x = data.normalise(augment(data.train_x[idx], data.hflip, gen))
            y = data.train_y[idx]
            for g in opt.param_groups:
                g["lr"] = lr_at(recipe, step, total)
            out = model(x)
            loss = F.cross_entropy(out.float(), y, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(float(loss.detach()))
            if step > total - steps_per_epoch:
                loss_sum += float(loss.detach()) * y.numel()
                correct += int((out.argmax(1) == y).sum())
                seen += y.numel()
    stats = {"steps": float(total), "loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1)}
    return stats, losses


RECIPE = Recipe(epochs=2.5, lr=0.05, batch_size=32, momentum=0.9, weight_decay=5e-4, schedule="onecycle",
                label_smoothing=0.1)


def test_fp32_on_a_cpu_computes_exactly_what_the_plain_loop_computes():
    data = synthetic_data()
    torch.manual_seed(0)
    a = small_net()
    b = copy_of(a)
    calls = []
    stats = train(a, data, RECIPE, seed=5, options=TrainOptions(precision="fp32"),
                  progress=lambda d, s, t, loss: calls.append((s, loss)))
    ref_stats, ref_losses = reference_train(b, data, RECIPE, seed=5)
    assert stats == ref_stats
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert calls == list(enumerate(ref_losses, start=1))  # on a CPU: every step, the step's own loss


def copy_of(model):
    import copy

    return copy.deepcopy(model)


def test_progress_ticks_report_the_mean_loss_of_their_steps():
    data = synthetic_data()
    torch.manual_seed(0)
    a = small_net()
    b = copy_of(a)
    every, ticked = [], []
    train(a, data, RECIPE, seed=1, options=TrainOptions(precision="fp32"),
          progress=lambda d, s, t, loss: every.append(loss))
    train(b, data, RECIPE, seed=1, options=TrainOptions(precision="fp32", tick=3),
          progress=lambda d, s, t, loss: ticked.append((s, t, loss)))
    total = len(every)
    assert total == 20 and [s for s, _, _ in ticked] == [3, 6, 9, 12, 15, 18, 20]
    assert all(t == total for _, t, _ in ticked)
    starts = [0, 3, 6, 9, 12, 15, 18]
    for (s, _, loss), start in zip(ticked, starts, strict=True):
        assert math.isclose(loss, sum(every[start:s]) / (s - start), rel_tol=1e-12)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)  # ticks change what is read, never what is computed


def test_the_loop_reads_the_device_only_at_ticks(monkeypatch):
    """The hot loop may not move a tensor's value to the host per step (on a GPU each read
    waits for the device): with ticks every 5 steps, 20 steps make 4 reads plus 2 for the
    final statistics."""
    data = synthetic_data()
    reads = []
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    train(small_net(), data, RECIPE, seed=0, options=TrainOptions(precision="fp32", tick=5),
          progress=lambda *a: None)
    assert len(reads) == 4 + 2, reads


class NanAt(TrainingHooks):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def extra_loss(self, model):
        self.calls += 1
        return torch.tensor(float("nan")) if self.calls == self.step else None


@pytest.mark.parametrize("tick, where", [(None, "in step 7 of 20"), (5, "in steps 6-10 of 20")])
def test_a_non_finite_loss_raises_diverged_naming_stage_and_step(tick, where):
    with pytest.raises(DivergedError) as exc:
        train(small_net(), synthetic_data(), RECIPE, seed=0, hooks=NanAt(7), description="finetune",
              options=TrainOptions(precision="fp32", tick=tick))
    message = str(exc.value)
    assert message.startswith("finetune diverged: the training loss became nan") and where in message


def test_a_huge_learning_rate_diverges():
    recipe = Recipe(epochs=2, lr=1e20, batch_size=32, momentum=0.9, weight_decay=0.0, schedule="constant")
    with pytest.raises(DivergedError, match="baseline diverged"):
        train(small_net(), synthetic_data(), recipe, seed=0, description="baseline")


def test_bf16_trains_deterministically_and_learns():
    data = synthetic_data()
    recipe = Recipe(epochs=4, lr=0.05, batch_size=32, momentum=0.9, weight_decay=5e-4, schedule="onecycle")
    torch.manual_seed(0)
    a = small_net()
    b = copy_of(a)
    c = copy_of(a)
    bf16 = TrainOptions(precision="bf16")
    train(a, data, recipe, seed=3, options=bf16)
    train(b, data, recipe, seed=3, options=bf16)
    train(c, data, recipe, seed=3, options=TrainOptions(precision="fp32"))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb) and pa.dtype == torch.float32  # master weights stay fp32
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))
    assert accuracy(a, data.normalise(data.test_x), data.test_y)[1] > 60.0
    assert all(p.is_contiguous() for p in a.parameters())  # channels_last is undone after training


def test_channels_last_changes_the_layout_not_the_augmentation():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    aug = Augmenter(16, 8, 8, x.device, hflip=True)
    nchw = aug(x, torch.Generator().manual_seed(4))
    nhwc = aug(x, torch.Generator().manual_seed(4), channels_last=True)
    assert torch.equal(nchw, nhwc) and nchw.is_contiguous()
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(nchw, augment(x, True, torch.Generator().manual_seed(4)))


def test_train_options_are_checked():
    from prunebench.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown precision 'bf61'. Did you mean 'bf16'"):
        TrainOptions(precision="bf61")
    with pytest.raises(ValueError, match="tick"):
        TrainOptions(tick=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_is_seeded_and_draws_on_the_device():
    data = synthetic_data()
    dev = torch.device("cuda")
    data = DeviceData(*(t.to(dev) for t in (data.train_x, data.train_y, data.test_x, data.test_y, data.mean,
                                            data.std)), data.hflip)
    torch.manual_seed(0)
    a = small_net().to(dev)
    b = copy_of(a)
    ticks = []
    train(a, data, RECIPE, seed=2, progress=lambda d, s, t, loss: ticks.append(s))
    train(b, data, RECIPE, seed=2)
    assert ticks == [20]  # one read per CUDA_TICK steps and at the end
    assert accuracy(a, data.normalise(data.test_x), data.test_y)[1] > 40.0
    aug = Augmenter(8, 8, 8, dev, hflip=True)
    g = torch.Generator(device=dev).manual_seed(0)
    assert aug(data.train_x[:8], g).device.type == "cuda"
