"""The streamed training path: DataLoader workers decode and augment, the device trains.

For datasets that return :class:`~prunebench.datasets.streaming.StreamedSplits` (ImageNet):
workers read and decode the images and apply the ImageNet recipe, returning uint8 batches
(pinned on CUDA); the training device normalises them and trains with the same optimiser,
learning-rate schedules, precision options, hooks, progress ticks and divergence checks
as the device-resident engine (:func:`prunebench.training.engine.train`, which hands streamed data
to :func:`train_streamed`).

Batches: each epoch is a permutation of the training split drawn from (seed, epoch); step
``s`` trains on the ``s``-th slice of ``batch_size`` images of it, the *global* batch, of
which rank ``r`` of ``N`` takes images ``r, r + N, ...`` (:func:`epoch_batches`). Each
image's crop and flip are drawn from (seed, epoch, image index). The images and their
augmentation at every step are therefore the same whatever the number of workers and
processes; only BatchNorm statistics (per process, see docs/protocol.md) and the order
of floating-point sums differ.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prunebench.datasets.streaming import ImageFiles, StreamedSplits
from prunebench.protocols import TrainingHooks
from prunebench.training import distributed
from prunebench.training.steps import Recipe, TrainOptions, check_tick, optimizer, plan, prepare, train_step

EVAL_BATCH = 256
TRAIN, TEST = 0, 1  # the splits of ImageFiles' keys
Key = tuple[int, int, "int | None"]  # (split, image index, augmentation seed or None)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one image's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_659 + index) % (2**63)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  size: int = 1) -> Iterator[list[Key]]:
    """This rank's share of each global batch of one epoch, as dataset keys (split, index, seed):
    a permutation of ``n`` drawn from (seed, epoch), cut into ``max(1, n // batch_size)`` global
    batches, of which rank ``r`` takes positions ``r, r + size, ...``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=gen).tolist()
    for b in range(max(1, n // batch_size)):
        yield [(TRAIN, i, sample_seed(seed, epoch, i)) for i in perm[b * batch_size : (b + 1) * batch_size][rank::size]]


def eval_batches(split: int, indices: list[int], batch_size: int = EVAL_BATCH) -> Iterator[list[Key]]:
    for start in range(0, len(indices), batch_size):
        yield [(split, i, None) for i in indices[start : start + batch_size]]


class Batches:
    """The batch sampler of a run's one DataLoader: what the next pass reads is set by
    :meth:`StreamData.batches` before it starts (the workers stay up between passes)."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterator[list[Key]]] = lambda: iter(())

    def __iter__(self) -> Iterator[list[Key]]:
        return self.source()


def default_workers() -> int:
    """DataLoader workers per process: the CPUs shared by this node's processes, at most 8."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, (os.cpu_count() or 1) // local))


@dataclass
class StreamData:
    """A streamed dataset ready for a run: image lists, preprocessing, normalisation on ``device``,
    and one DataLoader (``workers`` persistent worker processes) for every pass of the run."""

    splits: StreamedSplits
    device: torch.device
    mean: Tensor  # [1, C, 1, 1] float on device
    std: Tensor
    workers: int = 0

    def __post_init__(self) -> None:
        import torchvision.transforms.v2.functional  # noqa: F401 - imported once here, not in every worker

        self._sampler = Batches()
        self._loader: torch.utils.data.DataLoader | None = None

    @property
    def hflip(self) -> bool:
        return self.splits.hflip

    @property
    def n_train(self) -> int:
        return len(self.splits.train)

    @property
    def n_test(self) -> int:
        return len(self.splits.test)

    def normalise(self, x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - self.mean) / self.std

    def batches(self, source: Callable[[], Iterator[list[Key]]]) -> Iterator[tuple[Tensor, Tensor]]:
        """uint8 image batches and labels (pinned on CUDA) for the keys ``source()`` yields.
        ``source`` must not refer to this object: the loader's workers then end with it."""
        if self._loader is None:
            dataset = ImageFiles(self.splits.train, self.splits.test, self.splits.preprocess, hflip=self.splits.hflip)
            extra = {"prefetch_factor": 4, "persistent_workers": True} if self.workers > 0 else {}
            self._loader = torch.utils.data.DataLoader(dataset, batch_sampler=self._sampler, num_workers=self.workers,
                                                       pin_memory=self.device.type == "cuda", **extra)
        self._sampler.source = source
        return iter(self._loader)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        w, n = distributed.world(), self.n_train
        return self.batches(lambda: epoch_batches(n, batch_size, seed, epoch, w.rank, w.size))

    def calibration(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Training images ``indices`` with the evaluation preprocessing, normalised, on the
        device (the same on every rank), and their labels."""
        xs, ys = [], []
        keys = list(indices)
        for x, y in self.batches(lambda: eval_batches(TRAIN, keys)):
            xs.append(self.normalise(x.to(self.device)))
            ys.append(y.to(self.device))
        return torch.cat(xs), torch.cat(ys)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, topk: tuple[int, ...]) -> dict[int, float]:
        """Top-k accuracy in percent over the test split (sharded over ranks, counts summed)."""
        w = distributed.world()
        was_training = model.training
        model.eval()
        correct = [0.0] * len(topk)
        n = 0
        shard = list(range(w.rank, self.n_test, w.size))
        for x, y in self.batches(lambda: eval_batches(TEST, shard)):
            logits = model(self.normalise(x.to(self.device, non_blocking=True))).float()
            y = y.to(self.device, non_blocking=True)
            kmax = min(max(topk), logits.shape[1])
            hit = logits.topk(kmax, dim=1).indices.eq(y[:, None])
            for j, k in enumerate(topk):
                correct[j] += int(hit[:, : min(k, kmax)].any(dim=1).sum())
            n += int(y.numel())
        model.train(was_training)
        *correct, n = distributed.all_sum([*correct, float(n)])
        return {k: 100.0 * c / max(n, 1) for k, c in zip(topk, correct, strict=True)}


def train_streamed(
    model: nn.Module,
    data: StreamData,
    recipe: Recipe,
    seed: int,
    hooks: TrainingHooks | None = None,
    progress: Callable[[str, int, int, float], None] | None = None,
    description: str = "train",
    *,
    options: TrainOptions | None = None,
) -> dict[str, float]:
    """:func:`prunebench.training.engine.train` for streamed data, data-parallel over the ranks of
    :mod:`prunebench.training.distributed` (``recipe.batch_size`` is the global batch). The loss of
    each tick is averaged over ranks before the divergence check, so all ranks stop together."""
    hooks = hooks or TrainingHooks()
    opts = options or TrainOptions()
    world = distributed.world()
    dev = data.device
    n, bs = data.n_train, recipe.batch_size
    p = plan(recipe, n, dev, opts)
    steps_per_epoch, total, precision, channels_last, tick, cuda = \
        p.steps_per_epoch, p.total, p.precision, p.channels_last, p.tick, p.cuda
    model.train()
    if total == 0:
        hooks.on_train_end(model)
        return {"steps": 0, "loss": float("nan")}
    prepare(model, p)
    opt = optimizer(model, recipe, fused=cuda)
    parallel = distributed.wrap(model)
    forward = torch.compile(parallel, mode=opts.compile_mode) if opts.compile else parallel
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    window = torch.zeros((), dtype=torch.float64, device=dev)
    last = torch.zeros(3, dtype=torch.float64, device=dev)  # loss * images, correct, images (last epoch)
    window_start, step, epoch = 1, 0, 0
    lr = recipe.lr
    while step < total:
        for xb, yb in data.train_batches(bs, seed, epoch):
            x = data.normalise(xb.to(dev, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = yb.to(dev, non_blocking=True)
            out, loss, lr = train_step(model, forward, opt, hooks, autocast, x, y, recipe, step, total)
            step += 1
            value = loss.detach().double()
            window += value
            if step > total - steps_per_epoch:
                last[0] += value * y.numel()
                last[1] += (out.argmax(1) == y).sum()
                last[2] += y.numel()
            if step % tick == 0 or step == total:
                mean = float(distributed.all_sum_(window)) / world.size / (step - window_start + 1)
                check_tick(mean, description, window_start, step, total, lr)
                if progress is not None:
                    progress(description, step, total, mean)
                window.zero_()
                window_start = step + 1
            if step >= total:
                break
        epoch += 1
    hooks.on_train_end(model)
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    loss_sum, correct, seen = distributed.all_sum_(last).tolist()
    return {"steps": float(total), "loss": loss_sum / max(seen, 1), "train_top1": 100.0 * correct / max(seen, 1)}
