"""``imagefolder`` and ``cifar10-jpeg``: images stored as files, ImageFolder style.

Layout (a directory, or a ``.tar`` / ``.tar.gz`` / ``.tar.bz2`` / ``.tar.xz`` archive, read
in memory and never extracted to disk)::

    train/<class>/<image>.jpg|.jpeg|.png
    test/<class>/<image>...        (or val/<class>/...)

Everything is decoded once with ``torchvision.io`` into uint8 tensors and cached as a
``.pt`` file under ``cache_dir()/datasets/`` (keyed by the absolute path and its size and
mtime), so later loads take a fraction of a second.

``cifar10-jpeg`` is this loader pointed at ``<root>/cifar10-jpeg.tar.gz``: the 60,000
CIFAR-10 images (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images",
2009) re-encoded as JPEG (quality about 75). Its pixels differ slightly from the official
release, so results on it are labelled ``cifar10-jpeg``, never ``cifar10``.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import tarfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prunebench.datasets import cache as _cache
from prunebench.datasets import channel_stats, data_root, dataset_options
from prunebench.datasets.base import Dataset, DataSplits
from prunebench.errors import ConfigError, DataNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from rich.progress import Progress, TaskID
    from torch import Tensor

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TRAIN = "train"
TEST_NAMES = ("test", "val")  # the first one present is the test split
_SPLITS = (TRAIN, *TEST_NAMES)
_CHUNK = 1024  # images decoded per progress update
_LAYOUT = "train/<class>/<image>.jpg|png and test/<class>/... (or val/<class>/...)"


@dataclass
class _Item:
    split: str
    cls: str
    name: str  # path relative to the folder or archive root, for messages
    data: Tensor | None = None  # encoded bytes (archives)
    file: Path | None = None  # or where to read them (directories)


def _parse(rel: str) -> tuple[str, str] | None:
    """``(split, class)`` for an image path like ``[prefix/]train/cat/001.jpg``, else None."""
    parts = [p for p in rel.replace("\\", "/").split("/") if p not in ("", ".")]
    if len(parts) < 3 or parts[-1].startswith(".") or Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    for i, part in enumerate(parts[:-2]):
        if part in _SPLITS:
            return part, parts[i + 1]
    return None


def _scan_dir(path: Path) -> tuple[list[_Item], str]:
    """All images under a directory, and a stamp of their names, sizes and mtimes."""
    items: list[_Item] = []
    stamp = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for fname in sorted(filenames):
            full = Path(dirpath, fname)
            rel = full.relative_to(path).as_posix()
            parsed = _parse(rel)
            if parsed is None:
                continue
            st = full.stat()
            stamp.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            items.append(_Item(parsed[0], parsed[1], rel, file=full))
    return items, f"dir:{len(items)}:{stamp.hexdigest()}"


def _read_archive(path: Path) -> list[_Item]:
    """All images in a tar archive, read into memory (one decompression, no extraction)."""
    import torch

    raw = path.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif raw[:3] == b"BZh":
            raw = bz2.decompress(raw)
        elif raw[:6] == b"\xfd7zXZ\x00":
            raw = lzma.decompress(raw)
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot decompress the archive ({exc})") from exc
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    items: list[_Item] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                parsed = _parse(member.name)
                if parsed is not None:
                    start = member.offset_data
                    items.append(
                        _Item(parsed[0], parsed[1], member.name, data=buf[start : start + member.size])
                    )
    except tarfile.TarError as exc:
        raise ConfigError(f"{path}: not a readable tar archive ({exc})") from exc
    return items


def _top_entries(path: Path) -> list[str]:
    """First-level names in a directory or archive, for 'found ...' messages."""
    try:
        if path.is_dir():
            return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
        names: set[str] = set()
        with tarfile.open(path, mode="r:*") as tf:
            for m in tf:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if parts:
                    names.add(parts[0] + ("/" if len(parts) > 1 or m.isdir() else ""))
        return sorted(names)
    except (OSError, tarfile.TarError):
        return []


def _describe_found(path: Path, items: Sequence[_Item]) -> str:
    counts: dict[str, set[str]] = {}
    n_images: dict[str, int] = {}
    for it in items:
        counts.setdefault(it.split, set()).add(it.cls)
        n_images[it.split] = n_images.get(it.split, 0) + 1
    if counts:
        return "found " + ", ".join(
            f"{s}/ ({len(counts[s])} classes, {n_images[s]} images)" for s in _SPLITS if s in counts
        )
    top = _top_entries(path)
    if not top:
        return "found no images (.jpg, .jpeg, .png) at all"
    shown = ", ".join(top[:10]) + (f", ... ({len(top)} entries)" if len(top) > 10 else "")
    return f"found no images in that layout; top-level entries: {shown}"


def _decode_batch(encoded: list[Tensor], names: list[str]) -> list[Tensor]:
    """Decode encoded images (1-D uint8 tensors) to uint8 ``[C, H, W]`` tensors."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of torchcodec; they still work.
        warnings.simplefilter("ignore", DeprecationWarning)
        if all(Path(n).suffix.lower() in (".jpg", ".jpeg") for n in names):
            try:
                return list(decode_jpeg(encoded))
            except (RuntimeError, ValueError):
                pass  # a mislabelled or corrupt file: find it below, one image at a time
        out = []
        for data, name in zip(encoded, names, strict=True):
            try:
                out.append(decode_image(data, mode=ImageReadMode.UNCHANGED))
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"cannot decode image {name}: {exc}") from exc
        return out


class _Decoder:
    """Decodes splits into preallocated tensors, checking that all images share one size."""

    def __init__(self, source: Path, progress: Progress, task: TaskID) -> None:
        self.source = source
        self.progress = progress
        self.task = task
        self.hw: tuple[int, int] | None = None
        self.first = ""

    def _check(self, img: Tensor, name: str) -> Tensor:
        if img.ndim != 3:
            raise ConfigError(f"cannot decode image {name}: got shape {tuple(img.shape)}")
        if img.shape[0] in (2, 4):  # drop alpha
            img = img[: img.shape[0] - 1]
        hw = (int(img.shape[1]), int(img.shape[2]))
        if self.hw is None:
            self.hw, self.first = hw, name
        elif hw != self.hw:
            raise ConfigError(
                f"{self.source}: images have different sizes: {self.first} is {self.hw[0]}x{self.hw[1]} "
                f"but {name} is {hw[0]}x{hw[1]}; resize them to one size first"
            )
        return img

    def split(self, items: list[_Item]) -> Tensor:
        import torch

        out: Tensor | None = None
        for start in range(0, len(items), _CHUNK):
            chunk = items[start : start + _CHUNK]
            encoded = [
                it.data
                if it.data is not None
                else torch.frombuffer(bytearray(it.file.read_bytes()), dtype=torch.uint8)  # type: ignore[union-attr]
                for it in chunk
            ]
            names = [it.name for it in chunk]
            for j, (img, name) in enumerate(zip(_decode_batch(encoded, names), names, strict=True)):
                img = self._check(img, name)
                if out is None:
                    out = torch.empty((len(items), img.shape[0], *img.shape[1:]), dtype=torch.uint8)
                elif img.shape[0] != out.shape[1]:  # grey and colour mixed: make all colour
                    if out.shape[1] == 1:
                        out = out.expand(-1, img.shape[0], -1, -1).contiguous()
                    else:
                        img = img.expand(out.shape[1], -1, -1)
                out[start + j] = img
            self.progress.advance(self.task, len(chunk))
        assert out is not None
        return out


def _progress() -> Progress:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _build(path: Path, items: list[_Item], progress: Progress) -> DataSplits:
    import torch

    train = sorted((it for it in items if it.split == TRAIN), key=lambda it: (it.cls, it.name))
    test_name = next((s for s in TEST_NAMES if any(it.split == s for it in items)), None)
    if not train or test_name is None:
        missing = "train/" if not train else "test/ or val/"
        raise DataNotFoundError(
            f"{path}: no {missing} split with images. Expected {_LAYOUT}; {_describe_found(path, items)}."
        )
    test = sorted((it for it in items if it.split == test_name), key=lambda it: (it.cls, it.name))
    classes = sorted({it.cls for it in train})
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted({it.cls for it in test} - index.keys())
    if extra:
        raise ConfigError(f"{path}: {test_name}/ has classes that train/ lacks: {', '.join(extra[:10])}")

    task = progress.add_task(f"decoding {path.name}", total=len(train) + len(test))
    decoder = _Decoder(path, progress, task)
    train_x = decoder.split(train)
    test_x = decoder.split(test)
    if train_x.shape[1] != test_x.shape[1]:  # grey in one split, colour in the other
        c = max(train_x.shape[1], test_x.shape[1])
        train_x = train_x.expand(-1, c, -1, -1).contiguous()
        test_x = test_x.expand(-1, c, -1, -1).contiguous()
    mean, std = channel_stats(train_x)
    return DataSplits(
        name="imagefolder",
        train_x=train_x,
        train_y=torch.tensor([index[it.cls] for it in train], dtype=torch.int64),
        test_x=test_x,
        test_y=torch.tensor([index[it.cls] for it in test], dtype=torch.int64),
        classes=classes,
        mean=mean,
        std=std,
    )


def _check_folder(path: str | Path) -> Path:
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise DataNotFoundError(
            f"image folder not found: {path} (expected a directory, .tar or .tar.gz holding {_LAYOUT})"
        )
    return path


def load_imagefolder(
    path: str | Path, *, name: str = "imagefolder", hflip: bool = True, cache: bool = True
) -> DataSplits:
    """Decode (or load from the cache) an ImageFolder tree at ``path``: a directory or a tar
    archive. ``name`` labels the returned splits; ``cache=False`` neither reads nor writes
    the cache."""
    path = _check_folder(path)
    items: list[_Item] | None = None
    if path.is_dir():
        items, stamp = _scan_dir(path)
    else:
        st = path.stat()
        stamp = f"file:{st.st_size}:{st.st_mtime_ns}"
    entry = _cache.entry_path("imagefolder", path, stamp)
    if cache:
        data = _cache.load(entry, stamp)
        if data is not None:
            return _cache.to_splits(data, name=name, hflip=hflip)
    with _progress() as progress:
        if items is None:
            reading = progress.add_task(f"reading {path.name}", total=None)
            items = _read_archive(path)
            progress.remove_task(reading)
        splits = _build(path, items, progress)
    if cache:
        _cache.save(entry, stamp, splits)
    splits.name, splits.hflip = name, hflip
    return splits


def _resolve(root: Path | None, path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    under_root = data_root(root) / p
    if not under_root.exists() and p.exists():  # a path relative to the working directory
        return p.absolute()
    return under_root


@dataset_options("imagefolder")
def load(
    root: Path | None = None, *, path: str | None = None, hflip: bool = True, cache: bool = True
) -> DataSplits:
    """Option ``path``: a directory or tar archive (relative paths are taken against the
    data root); ``hflip``: whether mirroring preserves labels; ``cache``: use the decoded cache."""
    return load_imagefolder(_check_imagefolder(root, path), name="imagefolder", hflip=hflip, cache=cache)


def _check_imagefolder(root: Path | None, path: str | None = None, **_: object) -> Path:
    if path is None or str(path) == "":
        raise ConfigError(
            "dataset 'imagefolder' needs the option path=<directory or .tar.gz> holding " + _LAYOUT
        )
    return _check_folder(_resolve(root, path))


CIFAR10_JPEG_ARCHIVE = "cifar10-jpeg.tar.gz"


@dataset_options("cifar10-jpeg")
def load_cifar10_jpeg(root: Path | None = None, *, cache: bool = True) -> DataSplits:
    """``<root>/cifar10-jpeg.tar.gz`` (or a directory ``<root>/cifar10-jpeg/``)."""
    return load_imagefolder(_find_cifar10_jpeg(root), name="cifar10-jpeg", hflip=True, cache=cache)


def _find_cifar10_jpeg(root: Path | None, **_: object) -> Path:
    base = data_root(root)
    candidates = (base / CIFAR10_JPEG_ARCHIVE, base / "cifar10-jpeg", base / "cifar10-jpeg.tar")
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise DataNotFoundError(
            f"cifar10-jpeg not found: expected {base / CIFAR10_JPEG_ARCHIVE} (or a directory "
            f"{base / 'cifar10-jpeg'}/ with train/<class>/*.jpg and test/<class>/*.jpg). Put the archive "
            "there, or point --data-dir or PRUNEBENCH_DATA at the folder that holds it."
        )
    return found


IMAGEFOLDER = Dataset(
    name="imagefolder",
    load=load,
    description="images in train/<class>/ and test/<class>/ (or val/), as a directory or .tar(.gz); option path",
    needs_files=True,
    check=_check_imagefolder,
)

CIFAR10_JPEG = Dataset(
    name="cifar10-jpeg",
    load=load_cifar10_jpeg,
    description="CIFAR-10 re-encoded as JPEG (cifar10-jpeg.tar.gz in the data root); 50,000 train / 10,000 test",
    needs_files=True,
    check=_find_cifar10_jpeg,
)
