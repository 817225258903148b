"""``cifar10`` and ``cifar100``: the official "python version" releases.

Source: A. Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009,
https://www.cs.toronto.edu/~kriz/cifar.html. Files expected under the data root::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch   (or cifar-10-python.tar.gz)
    cifar-100-python/train, test, meta                             (or cifar-100-python.tar.gz)

An archive found in the root is checked against the published md5 and extracted next to
it. When neither is there, the official archive is downloaded (``download=True``, the
default; md5-checked) and, failing that, a :class:`DataNotFoundError` names the exact files
expected. The batch files are unpickled by :mod:`prunebench.datasets.safe_pickle`, which
admits only the numpy reconstruction the real files need, so a crafted file in the data
root cannot run code.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunebench.datasets import channel_stats, data_root, dataset_options
from prunebench.datasets.base import Dataset, DataSplits
from prunebench.datasets.safe_pickle import load_file
from prunebench.errors import ConfigError, DataNotFoundError

DOWNLOAD_TIMEOUT_S = 10.0

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip


@dataclass(frozen=True)
class _Release:
    name: str
    title: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    required_meta: bool  # cifar-100's class names come only from its meta file

    @property
    def files(self) -> tuple[str, ...]:
        return self.train_files + self.test_files + ((self.meta_file,) if self.required_meta else ())


_C10 = _Release(
    name="cifar10",
    title="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    label_key=b"labels",
    meta_file="batches.meta",
    names_key=b"label_names",
    required_meta=False,
)
_C100 = _Release(
    name="cifar100",
    title="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    train_files=("train",),
    test_files=("test",),
    label_key=b"fine_labels",
    meta_file="meta",
    names_key=b"fine_label_names",
    required_meta=True,
)


def _download(url: str, dest: Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Fetch ``url`` to ``dest`` (via ``dest.part``), checking its md5; raises on any failure."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as f:
            while block := response.read(1 << 20):
                digest.update(block)
                f.write(block)
        if digest.hexdigest() != md5:
            raise OSError(f"md5 mismatch for {url}: got {digest.hexdigest()}, expected {md5}")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _verify(archive: Path, rel: _Release) -> None:
    """A local archive must be the published one before anything in it is extracted."""
    try:
        got = md5sum(archive)
    except OSError as exc:
        raise DataNotFoundError(f"cannot read {archive}: {exc.strerror or exc}") from None
    if got != rel.md5:
        raise DataNotFoundError(
            f"{archive} is not the official {rel.title} archive: its md5 is {got}, the published one is "
            f"{rel.md5} ({rel.url}). Delete it, or replace it with the official file"
        )


def _extract(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive, mode="r:*") as tf:
            if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
                tf.extractall(into, filter="data")
            else:  # older Pythons: refuse absolute paths, '..' and links ourselves
                for m in tf.getmembers():
                    parts = Path(m.name).parts
                    if Path(m.name).is_absolute() or ".." in parts or not (m.isfile() or m.isdir()):
                        raise tarfile.TarError(f"unsafe member {m.name!r}")
                tf.extractall(into)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataNotFoundError(f"could not extract {archive}: {exc}") from exc


def _missing(folder: Path, rel: _Release) -> list[str]:
    return [f for f in rel.files if not (folder / f).is_file()]


def _not_found(root: Path, rel: _Release, why: str) -> DataNotFoundError:
    folder = root / rel.folder
    return DataNotFoundError(
        f"{rel.title} not found: expected the python-version files {', '.join(rel.files)} in {folder}/ "
        f"(or the archive {root / rel.archive}, from {rel.url}); {why}. Put them there, or point "
        "--data-dir or PRUNEBENCH_DATA at the folder that holds them."
    )


def _check_present(rel: _Release, root: Path | None, download: bool = True) -> None:
    """Before any work: without downloading, the files or the archive must be in the data root."""
    root = data_root(root)
    if not download and _missing(root / rel.folder, rel) and not (root / rel.archive).is_file():
        raise _not_found(root, rel, "download=False, so nothing was fetched")


def _ensure_files(root: Path, rel: _Release, download: bool) -> Path:
    folder = root / rel.folder
    if not _missing(folder, rel):
        return folder
    archive = root / rel.archive
    if not archive.is_file():
        if not download:
            raise _not_found(root, rel, "download=False, so nothing was fetched")
        try:
            _download(rel.url, archive, rel.md5)
        except Exception as exc:  # offline, firewalled, read-only root, bad checksum...
            raise _not_found(root, rel, f"downloading failed ({type(exc).__name__}: {exc})") from exc
    _verify(archive, rel)
    _extract(archive, root)
    missing = _missing(folder, rel)
    if missing:
        raise _not_found(root, rel, f"{archive} did not provide {', '.join(missing)}")
    return folder


def _unpickle(path: Path) -> dict[bytes, Any]:
    data = load_file(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a CIFAR python-version file (expected a pickled dict)")
    return data


def _read_batches(folder: Path, files: tuple[str, ...], label_key: bytes):  # -> (Tensor, Tensor)
    import numpy as np
    import torch

    xs, ys = [], []
    for fname in files:
        batch = _unpickle(folder / fname)
        if b"data" not in batch or label_key not in batch:
            raise ConfigError(
                f"{folder / fname} lacks the keys b'data' and {label_key!r} of the CIFAR python format"
            )
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[label_key], dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(f"{folder / fname}: data or labels are not numbers ({exc})") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ConfigError(f"{folder / fname}: data has shape {data.shape}, expected [N, 3072]")
        if labels.ndim != 1:
            raise ConfigError(f"{folder / fname}: labels have shape {labels.shape}, expected [N]")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    if len(x) != len(y):
        raise ConfigError(f"{folder}: {len(x)} images but {len(y)} labels")
    return x, y


def _load(rel: _Release, root: Path | None, download: bool) -> DataSplits:
    base = data_root(root)
    folder = _ensure_files(base, rel, download)
    train_x, train_y = _read_batches(folder, rel.train_files, rel.label_key)
    test_x, test_y = _read_batches(folder, rel.test_files, rel.label_key)
    meta = folder / rel.meta_file
    if meta.is_file():
        names = _unpickle(meta).get(rel.names_key)
        if not isinstance(names, list):
            raise ConfigError(f"{meta} lacks the list {rel.names_key!r} of class names")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    else:
        classes = list(CIFAR10_CLASSES)
    for split, y in (("train", train_y), ("test", test_y)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
            raise ConfigError(f"{folder}: {split} labels outside 0..{len(classes) - 1}")
    mean, std = channel_stats(train_x)
    return DataSplits(
        name=rel.name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=classes,
        mean=mean,
        std=std,
        hflip=True,
    )


@dataset_options("cifar10")
def load_cifar10(root: Path | None = None, *, download: bool = True) -> DataSplits:
    """CIFAR-10 (50,000 train / 10,000 test, 10 classes) from ``<root>/cifar-10-batches-py/``."""
    return _load(_C10, root, download)


@dataset_options("cifar100")
def load_cifar100(root: Path | None = None, *, download: bool = True) -> DataSplits:
    """CIFAR-100 (50,000 train / 10,000 test, 100 fine classes) from ``<root>/cifar-100-python/``."""
    return _load(_C100, root, download)


CIFAR10 = Dataset(
    name="cifar10",
    load=load_cifar10,
    description="CIFAR-10, official python version (cifar-10-batches-py/ in the data root); 50,000 / 10,000",
    needs_files=True,
    check=lambda root, download=True: _check_present(_C10, root, download),
)

CIFAR100 = Dataset(
    name="cifar100",
    load=load_cifar100,
    description="CIFAR-100, official python version (cifar-100-python/ in the data root); 50,000 / 10,000",
    needs_files=True,
    check=lambda root, download=True: _check_present(_C100, root, download),
)
