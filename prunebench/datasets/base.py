"""The dataset plug-in type and the in-memory splits every dataset produces."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor


@dataclass
class DataSplits:
    """A whole dataset as uint8 image tensors ``[N, C, H, W]`` and int64 labels.

    Small vision datasets fit in memory (CIFAR-10 is 184 MB as uint8), so the engine can
    keep them on the device and augment there, with no DataLoader workers.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, ...]  # per-channel, in [0, 1] units
    std: tuple[float, ...]
    hflip: bool = True  # is a horizontal flip label-preserving?

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.train_x.shape[1:])

    @property
    def input_size(self) -> int:
        return int(self.train_x.shape[-1])


@dataclass(frozen=True)
class Dataset:
    """A registered dataset. ``load(root, **options)`` returns :class:`DataSplits` (the run keeps
    it on the device), or, with ``streamed=True``,
    :class:`~prunebench.datasets.streaming.StreamedSplits` (the run streams it through
    DataLoader workers, and may use several processes).

    ``root`` is the data directory (``--data-dir`` or ``$PRUNEBENCH_DATA``); datasets that
    need files raise :class:`prunebench.errors.DataNotFoundError` naming the exact paths
    expected when they are missing.
    """

    name: str
    load: Callable[..., DataSplits]
    description: str
    needs_files: bool = False
    default_root: Callable[[Path], Path] | None = None
    streamed: bool = False
    #: ``check(root, **options)``: a cheap look (no decoding) that the files the dataset needs are
    #: there, made before any work; raises :class:`prunebench.errors.DataNotFoundError` if not
    check: Callable[..., None] | None = None
