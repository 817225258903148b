"""A run's data: loaded onto the device or streamed, the budget's subsets, normalisation, and
evaluation on the test split."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunebench import registry
from prunebench.datasets.base import DataSplits
from prunebench.datasets.streaming import StreamedSplits
from prunebench.errors import ConfigError
from prunebench.pipeline.metrics import accuracy, topk_hits
from prunebench.storage import checkpoints
from prunebench.training import threads
from prunebench.training.engine import DeviceData

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.config.run import RunConfig
    from prunebench.training.streaming import StreamData


#: images per evaluation forward: :data:`CPU_BATCH` on a CPU where it computes the logits that
#: batches of :data:`BATCH` compute (checked on every evaluation's first batch), else BATCH
BATCH, CPU_BATCH = 512, 128


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return dev


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_data(cfg: RunConfig, device: torch.device) -> tuple[DataSplits | StreamedSplits, DeviceData | StreamData]:
    """The run's data: on the device (small datasets), or streamed when the dataset returns
    :class:`StreamedSplits` (the dataset chooses). Subsets are taken alike in both."""
    from prunebench.datasets import data_root

    ds = registry.datasets.get(cfg.dataset)
    splits = ds.load(data_root(cfg.data_dir), **dict(cfg.dataset_options))
    if isinstance(splits, StreamedSplits):
        return splits, stream_data(cfg, splits, device)
    # the data subset is fixed (seed 0) so that every seed and criterion sees the same images
    tx, ty = subset(splits.train_x, splits.train_y, cfg.budget.train_subset, 0)
    vx, vy = subset(splits.test_x, splits.test_y, cfg.budget.test_subset, 1)
    c = splits.in_channels
    mean, std = preprocessing(cfg, splits)
    data = DeviceData(
        train_x=tx.to(device), train_y=ty.to(device), test_x=vx.to(device), test_y=vy.to(device),
        mean=torch.tensor(mean, device=device).view(1, c, 1, 1),
        std=torch.tensor(std, device=device).view(1, c, 1, 1),
        hflip=splits.hflip,
    )
    return splits, data


def stream_data(cfg: RunConfig, splits: StreamedSplits, device: torch.device) -> StreamData:
    """A streamed dataset's budget subsets (seeded permutations, as on the device path), its
    normalisation on ``device`` and its loader's worker count."""
    from prunebench.training.streaming import StreamData, default_workers

    def pick(images, n: int | None, seed: int):
        if n is None or n >= len(images):
            return images
        return images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].tolist())

    splits = dataclasses.replace(splits, train=pick(splits.train, cfg.budget.train_subset, 0),
                                 test=pick(splits.test, cfg.budget.test_subset, 1))
    mean, std = preprocessing(cfg, splits)
    c = splits.in_channels
    workers = default_workers() if cfg.workers is None else cfg.workers
    return StreamData(splits, device, torch.tensor(mean, device=device).view(1, c, 1, 1),
                      torch.tensor(std, device=device).view(1, c, 1, 1), workers=workers)


def preprocessing(cfg: RunConfig, splits: DataSplits | StreamedSplits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) for everything the run evaluates and trains: a pretrained
    checkpoint's own, else the dataset's training-split statistics."""
    if cfg.pretrained:
        from prunebench import zoo

        entry = zoo.lookup(cfg.arch, cfg.dataset)
        return tuple(entry.mean), tuple(entry.std)
    return tuple(splits.mean), tuple(splits.std)


def evaluate(model: nn.Module, data: DeviceData | StreamData, num_classes: int) -> dict[str, float]:
    ks = (1, 5) if num_classes >= 100 else (1,)
    if isinstance(data, DeviceData):
        images, labels = data.normalise(data.test_x), data.test_y
        if images.device.type != "cpu" or images.shape[0] <= BATCH:
            acc = accuracy(model, images, labels, batch_size=BATCH, topk=ks)
        else:
            acc = _evaluate_on_cpu(model, images, labels, ks)
    else:
        acc = data.evaluate(model, ks)
    return {f"top{k}": round(v, 4) for k, v in acc.items()}


@torch.no_grad()
def _evaluate_on_cpu(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]
                     ) -> dict[int, float]:
    """:func:`accuracy` in batches of :data:`CPU_BATCH`, the fastest way that gives the first
    batch of :data:`BATCH` the same logits to the bit (a thread count, or the batches shared among
    workers of one thread each: ``threads.evaluation_plan``); else as before. The threads are the
    caller's again afterwards."""
    was_training = model.training
    model.eval()
    head = images[:BATCH]
    reference = model(head)
    current = torch.get_num_threads()
    plan = threads.evaluation_plan(model, head, reference, CPU_BATCH, images.shape[0])
    try:
        return accuracy(model, images, labels, batch_size=CPU_BATCH if plan else BATCH, topk=ks, start=BATCH,
                        counted=topk_hits(reference, labels[:BATCH], ks), workers=plan.workers if plan else 1)
    finally:
        torch.set_num_threads(current)
        model.train(was_training)


def data_block(splits: DataSplits | StreamedSplits, data: DeviceData | StreamData) -> dict[str, Any]:
    """The record's ``data``: sizes, shape, classes, and a digest of the images and labels the
    run trains and evaluates on (device-resident data only)."""
    block: dict[str, Any] = {"train_images": data.n_train, "test_images": data.n_test,
                             "input_shape": list(splits.input_shape), "num_classes": splits.num_classes}
    if isinstance(data, DeviceData):
        block["sha256"] = checkpoints.weights_sha256(
            {"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x, "test_y": data.test_y})
    return block
