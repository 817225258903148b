"""On-disk cache of decoded :class:`DataSplits` (``cache_dir()/datasets/*.pt``).

Decoding tens of thousands of JPEGs takes seconds; loading the decoded uint8 tensors back
with ``torch.load(..., weights_only=True)`` takes a fraction of a second. Entries are named
after the source path and stamped with the source's size and mtime; a changed source gets a
new entry and the stale one is removed. Writes go to a temporary file first and are moved
into place with ``os.replace`` (:mod:`prunebench.storage.files`), so a reader never sees half a file,
and get the mode the umask gives new files.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from pathlib import Path
from typing import Any

from prunebench.datasets import cache_dir
from prunebench.datasets.base import DataSplits
from prunebench.storage.files import replace_atomically

FORMAT = 1  # bump when the cached layout or the decoding changes


def _digest(text: str, n: int = 16) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:n]


def entry_path(kind: str, source: Path, stamp: str) -> Path:
    """Cache file for ``source`` (an absolute path) in the state described by ``stamp``."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.name)[:40] or "root"
    return cache_dir() / "datasets" / f"{kind}-{slug}-{_digest(str(source), 12)}-{_digest(stamp)}.pt"


def load(path: Path, stamp: str) -> dict[str, Any] | None:
    """The cached fields, or None when there is no usable entry (missing, stale, corrupt)."""
    if not path.is_file():
        return None
    from prunebench.errors import CheckpointError
    from prunebench.storage.checkpoints import read

    try:
        data = read(path, "dataset cache")
    except CheckpointError as exc:  # a corrupt or foreign file: rebuild it
        warnings.warn(f"ignoring unreadable dataset cache ({exc})", stacklevel=3)
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("stamp") != stamp:
        return None
    return data


def save(path: Path, stamp: str, splits: DataSplits) -> None:
    """Write ``splits`` atomically; remove older entries of the same source. Failures to
    write (read-only home, full disk) only warn: the data are already in memory."""
    import torch

    data = {
        "format": FORMAT,
        "stamp": stamp,
        "train_x": splits.train_x,
        "train_y": splits.train_y,
        "test_x": splits.test_x,
        "test_y": splits.test_y,
        "classes": list(splits.classes),
        "mean": [float(v) for v in splits.mean],
        "std": [float(v) for v in splits.std],
    }
    try:
        replace_atomically(path, lambda f: torch.save(data, f))
    except OSError as exc:
        warnings.warn(f"could not write dataset cache {path}: {exc}", stacklevel=3)
        return
    prefix = path.name[: path.name.rindex("-") + 1]  # same kind, source name and path digest
    for old in path.parent.glob(prefix + "*.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def to_splits(data: dict[str, Any], name: str, hflip: bool) -> DataSplits:
    return DataSplits(
        name=name,
        train_x=data["train_x"],
        train_y=data["train_y"],
        test_x=data["test_x"],
        test_y=data["test_y"],
        classes=list(data["classes"]),
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        hflip=hflip,
    )
