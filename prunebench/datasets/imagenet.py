"""``imagenet``, ``cifar10-folder`` and ``imagefolder-stream``: streamed datasets (:mod:`prunebench.datasets.streaming`).

``imagenet``: ILSVRC-2012 (Russakovsky et al., "ImageNet Large Scale Visual Recognition
Challenge", IJCV 2015), 1,281,167 training and 50,000 validation images in 1,000 classes,
expected under ``<data root>/imagenet`` (or the option ``path``) as::

    train/n01440764/n01440764_10026.JPEG ...
    val/n01440764/ILSVRC2012_val_00000293.JPEG ...   (validation images sorted into class folders)

a directory or an uncompressed ``.tar`` of that layout. Class indices follow the sorted
folder names (the WordNet ids), which is torchvision's order, so its pretrained weights
apply as they are. Normalisation uses ImageNet's channel statistics.

``cifar10-folder``: ``cifar10-jpeg.tar.gz`` decompressed once into the cache as a plain tar
of its ImageFolder layout (one file, read in place, rather than 60,000) and streamed like
ImageNet, at a small input size (32 by default). It exists to
test and measure the streamed path on data that is at hand; results on it are not the
device-resident ``cifar10-jpeg``'s (different augmentation), and are labelled apart.

``imagefolder-stream``: any ImageFolder tree (option ``path``) streamed the same way, for
datasets too large for the device; normalised with ImageNet's statistics.
"""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

from prunebench.datasets import cache_dir, data_root, dataset_options
from prunebench.datasets.base import Dataset
from prunebench.datasets.streaming import Preprocess, StreamedSplits, scan
from prunebench.errors import DataNotFoundError
from prunebench.storage.locks import hold


def _imagenet_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    from prunebench.zoo.entries import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def _under_root(root: Path | None, path: str, default: str) -> Path:
    p = Path(path or default).expanduser()
    return p if p.is_absolute() else data_root(root) / p


@dataset_options("imagenet")
def load_imagenet(root: Path | None = None, *, path: str = "", train_size: int = 224, eval_resize: int = 256,
                  eval_crop: int = 224) -> StreamedSplits:
    """ImageNet from ``<root>/imagenet`` (option ``path``: another directory or a plain .tar,
    relative to the data root); ``train_size``, ``eval_resize``, ``eval_crop``: the recipe's sizes."""
    source = _check_imagenet(root, path)
    train, test, classes, _ = scan(source, ("val",), what="the ImageNet folder")
    return StreamedSplits("imagenet", train, test, classes, *_imagenet_stats(),
                          Preprocess(train_size, eval_resize, eval_crop))


def _check_imagenet(root: Path | None, path: str = "", **_: object) -> Path:
    source = _under_root(root, path, "imagenet")
    if not source.exists():
        if path:
            raise DataNotFoundError(f"imagenet not found: {source} (option path) does not exist")
        raise DataNotFoundError(
            f"imagenet not found: expected the folder {source} holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG "
            "(validation images sorted into class folders), or a plain .tar of it (--dataset-option path=...); "
            "point --data-dir or PRUNEBENCH_DATA at the folder that holds imagenet/")
    return source


CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"


def decompressed(archive: Path) -> Path:
    """``archive`` (a ``.tar.gz``) decompressed once into a plain tar,
    ``<cache>/datasets/<name>-<size>-<mtime>.tar``, which workers read in place (under a lock,
    via a temporary file renamed into place, so a reader never sees half of it)."""
    st = archive.stat()
    dest = cache_dir() / "datasets" / f"{archive.name.split('.')[0]}-{st.st_size}-{st.st_mtime_ns}.tar"
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with hold(f"{dest}.lock"):
        if dest.is_file():
            return dest
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            with gzip.open(archive, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except (OSError, EOFError) as exc:
            tmp.unlink(missing_ok=True)
            raise DataNotFoundError(f"cannot decompress {archive} into {dest} ({exc})") from None
    return dest


@dataset_options("cifar10-folder")
def load_cifar10_folder(root: Path | None = None, *, train_size: int = 32, eval_resize: int = 32,
                        eval_crop: int = 32) -> StreamedSplits:
    """``<root>/cifar10-jpeg.tar.gz`` decompressed into the cache and streamed (sizes as for imagenet)."""
    archive = _check_cifar10_folder(root)
    train, test, classes, _ = scan(decompressed(archive), ("test", "val"), what="cifar10-jpeg")
    return StreamedSplits("cifar10-folder", train, test, classes, *_imagenet_stats(),
                          Preprocess(train_size, eval_resize, eval_crop))


def _check_cifar10_folder(root: Path | None, **_: object) -> Path:
    archive = data_root(root) / CIFAR10_ARCHIVE
    if not archive.is_file():
        raise DataNotFoundError(
            f"cifar10-folder not found: expected {archive} (decompressed once into {cache_dir() / 'datasets'}). "
            "Put the archive there, or point --data-dir or PRUNEBENCH_DATA at the folder that holds it.")
    return archive


def _check_imagefolder_stream(root: Path | None, path: str = "", **_: object) -> Path:
    if not path:
        raise DataNotFoundError("dataset 'imagefolder-stream' needs the option path=<directory or plain .tar> "
                                "holding train/<class>/<image> and val/<class>/... (or test/)")
    source = _under_root(root, path, "")
    if not source.exists():
        raise DataNotFoundError(f"image folder not found: {source} (option path) does not exist")
    return source


@dataset_options("imagefolder-stream")
def load_imagefolder_stream(root: Path | None = None, *, path: str = "", hflip: bool = True, train_size: int = 224,
                            eval_resize: int = 256, eval_crop: int = 224) -> StreamedSplits:
    """Any ImageFolder tree too large for the device (option ``path``: a directory or plain .tar
    with train/ and val/ or test/, relative to the data root), streamed with the ImageNet recipe."""
    train, test, classes, _ = scan(_check_imagefolder_stream(root, path), ("val", "test"), what="an image folder")
    return StreamedSplits("imagefolder-stream", train, test, classes, *_imagenet_stats(),
                          Preprocess(train_size, eval_resize, eval_crop), hflip=hflip)


IMAGENET = Dataset(
    name="imagenet",
    load=load_imagenet,
    description="ImageNet-1k, streamed from <data root>/imagenet/{train,val}/<wnid>/ (options path, train_size, "
                "eval_resize, eval_crop)",
    needs_files=True,
    check=_check_imagenet,
    streamed=True,
)

CIFAR10_FOLDER = Dataset(
    name="cifar10-folder",
    load=load_cifar10_folder,
    description="cifar10-jpeg as a plain tar in the cache, streamed with the ImageNet recipe (input 32 by default)",
    needs_files=True,
    check=_check_cifar10_folder,
    streamed=True,
)

IMAGEFOLDER_STREAM = Dataset(
    name="imagefolder-stream",
    load=load_imagefolder_stream,
    description="an ImageFolder directory or plain .tar (option path), streamed with the ImageNet recipe "
                "(options hflip, train_size, eval_resize, eval_crop)",
    needs_files=True,
    check=_check_imagefolder_stream,
    streamed=True,
)
