"""Training engine: device-resident uint8 data, on-device augmentation, one shared recipe.

The whole (subset of the) dataset lives on the device as uint8; each step slices a batch,
augments it there (random crop with zero padding, horizontal flip where label-preserving),
normalises and trains. No DataLoader workers in the hot loop. On CUDA the model runs in
channels_last with bf16 autocast. On CPU, runs are seeded and deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunebench.protocols import TrainingHooks


@dataclass
class DeviceData:
    """uint8 images and labels on the training device, plus normalisation constants."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    mean: Tensor  # [1, C, 1, 1] float on device
    std: Tensor
    hflip: bool

    def normalise(self, x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - self.mean) / self.std

    @property
    def device(self) -> torch.device:
        return self.train_x.device


def augment(x: Tensor, hflip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding (size/8 pixels) and random horizontal flip, batched."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev)[None, :])  # [n, h]
    cols = (ox[:, None] + torch.arange(w, device=dev)[None, :])  # [n, w]
    if hflip:
        flip = torch.rand(n, generator=generator, device="cpu").to(dev) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
    return out.permute(0, 3, 1, 2).contiguous()


@dataclass(frozen=True)
class Recipe:
    epochs: float
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    schedule: str
    milestones: tuple[float, ...] = ()
    label_smoothing: float = 0.0


def lr_at(recipe: Recipe, step: int, total: int) -> float:
    frac = step / max(total, 1)
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "step":
        drops = sum(frac >= m for m in recipe.milestones)
        return recipe.lr * (0.1**drops)
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * frac))
    if recipe.schedule == "onecycle":
        warm = 0.15
        if frac < warm:
            return recipe.lr * (0.1 + 0.9 * frac / warm)
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * (frac - warm) / (1 - warm)))
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


def train(
    model: nn.Module,
    data: DeviceData,
    recipe: Recipe,
    seed: int,
    hooks: TrainingHooks | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
    description: str = "train",
) -> dict[str, float]:
    """Train ``model`` in place for ``recipe.epochs`` (fractions allowed). Returns last-epoch stats."""
    hooks = hooks or TrainingHooks()
    dev = data.device
    n = int(data.train_x.shape[0])
    steps_per_epoch = max(1, n // recipe.batch_size)
    total = int(round(recipe.epochs * steps_per_epoch))
    model.train()
    if total == 0:
        hooks.on_train_end(model)
        return {"steps": 0, "loss": float("nan")}
    cuda = dev.type == "cuda"
    if cuda:
        model.to(memory_format=torch.channels_last)
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0,
    )
    gen = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
    step, loss_sum, seen, correct = 0, 0.0, 0, 0
    while step < total:
        perm = torch.randperm(n, generator=gen).to(dev)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size]
            x = data.normalise(augment(data.train_x[idx], data.hflip, gen))
            y = data.train_y[idx]
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            for g in opt.param_groups:
                g["lr"] = lr_at(recipe, step, total)
            with autocast:
                out = model(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=recipe.label_smoothing)
                extra = hooks.extra_loss(model)
                if extra is not None:
                    loss = loss + extra
            opt.zero_grad(set_to_none=True)
            loss.backward()
            hooks.after_backward(model, step)
            opt.step()
            hooks.after_step(model, step)
            step += 1
            if step > total - steps_per_epoch:  # stats over the last epoch
                loss_sum += float(loss.detach()) * y.numel()
                correct += int((out.argmax(1) == y).sum())
                seen += y.numel()
            if progress is not None:
                progress(description, step, total, float(loss.detach()))
    hooks.on_train_end(model)
    if cuda:
        model.to(memory_format=torch.contiguous_format)
    return {"steps": float(total), "loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1)}
