"""Training engine: device-resident uint8 data, on-device augmentation, one shared recipe.

The whole (subset of the) dataset lives on the device as uint8; each step slices a batch,
augments it there (random crop with zero padding, horizontal flip where label-preserving),
normalises and trains. No DataLoader workers in the hot loop.

Speed (:class:`TrainOptions`): with ``bf16`` precision (the default wherever the hardware
computes bfloat16 natively, see :mod:`prunebench.training.precision`) the model runs under bf16
autocast with channels_last activations. The loop never reads a device value back per
step: the loss is accumulated on the device and read once per progress tick (every step
on a CPU, where reading is free; every ``tick`` steps on CUDA), which is also where
divergence is detected. On CUDA the augmentation's random numbers are drawn on the device.
On a CPU, runs are seeded and deterministic, and ``fp32`` computes exactly what the plain
loop (one ``float(loss)`` per step, no autocast) computes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunebench.protocols import TrainingHooks
from prunebench.training.steps import Recipe, TrainOptions, check_tick, optimizer, plan, prepare, train_step

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.training.resume import StageCheckpoint
    from prunebench.training.streaming import StreamData



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

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test_x.shape[0])


class Augmenter:
    """Random crop with zero padding (size/8 pixels) and random horizontal flip for batches of
    one shape; the index tensors are built once, the random offsets drawn from ``generator``
    on the generator's device (on the GPU for a CUDA generator: no host-to-device copy)."""

    def __init__(self, n: int, h: int, w: int, device: torch.device, hflip: bool) -> None:
        self.n, self.h, self.w, self.hflip = n, h, w, hflip
        self.pad = max(1, h // 8)
        self.rows = torch.arange(h, device=device)[None, :]
        self.cols = torch.arange(w, device=device)[None, :]
        self.cols_flipped = self.cols.flip(1)
        self.batch = torch.arange(n, device=device)[:, None, None]

    def __call__(self, x: Tensor, generator: torch.Generator, channels_last: bool = False) -> Tensor:
        n, _, h, w = x.shape
        if (n, h, w) != (self.n, self.h, self.w):
            raise ValueError(f"augmenter built for batches of {(self.n, self.h, self.w)}, got {(n, h, w)}")
        pad, dev = self.pad, x.device
        padded = F.pad(x, (pad, pad, pad, pad))
        gdev = generator.device
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(dev)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=gdev).to(dev)
        cols = self.cols
        if self.hflip:
            flip = torch.rand(n, generator=generator, device=gdev).to(dev) < 0.5
            cols = torch.where(flip[:, None], self.cols_flipped, self.cols)
        rows = oy[:, None] + self.rows  # [n, h]
        cols = ox[:, None] + cols  # [n, w]
        out = padded.permute(0, 2, 3, 1)[self.batch, rows[:, :, None], cols[:, None, :]]  # [n, h, w, c]
        # [n, c, h, w] in channels_last memory as it is, or copied to contiguous NCHW
        return out.permute(0, 3, 1, 2) if channels_last else out.permute(0, 3, 1, 2).contiguous()


def augment(x: Tensor, hflip: bool, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding (size/8 pixels) and random horizontal flip, batched."""
    n, _, h, w = x.shape
    return Augmenter(n, h, w, x.device, hflip)(x, generator)


def train(
    model: nn.Module,
    data: DeviceData | StreamData,
    recipe: Recipe,
    seed: int,
    hooks: TrainingHooks | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
    description: str = "train",
    *,
    options: TrainOptions | None = None,
    checkpoint: StageCheckpoint | None = None,
) -> dict[str, float]:
    """Train ``model`` in place for ``recipe.epochs`` (fractions allowed). Returns last-epoch stats.

    ``checkpoint`` (:mod:`prunebench.training.resume`): resume from its newest usable state, and save
    the whole training state at every epoch's end and every few minutes, so that an
    interrupted stage started again ends with the same weights.

    ``progress(description, step, total, loss)`` is called every ``tick`` steps and after the
    last one, with the mean loss since the previous call. Raises :class:`DivergedError`
    naming ``description`` and the steps when that loss is not finite. Streamed data
    (:class:`prunebench.training.streaming.StreamData`) train through :func:`prunebench.training.streaming.train_streamed`.
    """
    if not isinstance(data, DeviceData):
        from prunebench.training.streaming import train_streamed

        return train_streamed(model, data, recipe, seed, hooks, progress, description, options=options)
    hooks = hooks or TrainingHooks()
    opts = options or TrainOptions()
    dev = data.device
    n = int(data.train_x.shape[0])
    bs = recipe.batch_size
    p = plan(recipe, n, dev, opts)
    steps_per_epoch, total, precision, channels_last, tick, cuda = \
        p.steps_per_epoch, p.total, p.precision, p.channels_last, p.tick, p.cuda
    model.train()
    if total == 0:
        hooks.on_train_end(model)
        return {"steps": 0, "loss": float("nan")}
    prepare(model, p)
    opt = optimizer(model, recipe, fused=cuda)
    forward = torch.compile(model, mode=opts.compile_mode) if opts.compile else model
    # CPU: one CPU generator for permutations and augmentation (the seeded, reproducible path);
    # CUDA: the same draws made on the device, so no random numbers cross to it per step
    gen = torch.Generator(device=dev).manual_seed(seed) if cuda else torch.Generator().manual_seed(seed)
    augmenter = Augmenter(min(bs, n), data.train_x.shape[2], data.train_x.shape[3], dev, data.hflip)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # device-side accumulators: read by the host only at ticks and at the end
    window = torch.zeros((), dtype=torch.float64, device=dev)
    last_loss = torch.zeros((), dtype=torch.float64, device=dev)
    last_correct = torch.zeros((), dtype=torch.int64, device=dev)
    window_start, seen, step = 1, 0, 0
    perm = torch.empty(0, dtype=torch.long)
    fingerprint = {"n": n, "total": total, "seed": seed, "precision": precision}
    threads = None
    if dev.type == "cpu":  # the thread count: fixed by the user, or measured for a long stage
        from prunebench.training.threads import StageThreads, probe_step

        x0 = data.normalise(data.train_x[: min(bs, n)])
        x0 = x0.contiguous(memory_format=torch.channels_last) if channels_last else x0
        threads = StageThreads(description, total, min(bs, n),
                               lambda: probe_step(model, x0, data.train_y[: min(bs, n)], autocast))
    state = checkpoint.load() if checkpoint is not None else None
    if state is not None and state.get("engine") != fingerprint:
        state = None  # the same stage key, but trained otherwise here (e.g. another precision)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"].to(gen.get_state().device))
        perm, step, seen = state["perm"].to(dev), int(state["step"]), int(state["seen"])
        window_start = step + 1
        last_loss += float(state["last_loss"])
        last_correct += int(state["last_correct"])
    while step < total:
        b = step % steps_per_epoch
        if b == 0:  # a new epoch: a new permutation (after a resume, from the restored generator)
            perm = torch.randperm(n, generator=gen, device=gen.device).to(dev)
        idx = perm[b * bs : (b + 1) * bs]
        x = data.normalise(augmenter(data.train_x[idx], gen, channels_last=channels_last))
        y = data.train_y[idx]
        out, loss, lr = train_step(model, forward, opt, hooks, autocast, x, y, recipe, step, total)
        step += 1
        if threads is not None:
            threads.after(step)
        value = loss.detach().double()
        window += value
        if step > total - steps_per_epoch:  # stats over the last epoch
            last_loss += value * y.numel()
            last_correct += (out.argmax(1) == y).sum()
            seen += y.numel()
        if step % tick == 0 or step == total:
            mean = float(window) / (step - window_start + 1)  # the one host read per tick
            check_tick(mean, description, window_start, step, total, lr)
            if progress is not None:
                progress(description, step, total, mean)
            window.zero_()
            window_start = step + 1
        if checkpoint is not None and step < total and checkpoint.due(step % steps_per_epoch == 0):
            checkpoint.save({"engine": fingerprint, "step": step, "perm": perm.cpu(), "generator": gen.get_state(),
                             "model": model.state_dict(), "optimizer": opt.state_dict(), "seen": seen,
                             "last_loss": float(last_loss), "last_correct": int(last_correct)})
    hooks.on_train_end(model)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return {"steps": float(total), "loss": float(last_loss) / max(seen, 1),
            "train_top1": 100.0 * int(last_correct) / max(seen, 1)}
