"""Streamed datasets: images read, decoded and augmented per batch by DataLoader workers.

A dataset too large for the device (ImageNet: about 1.28 M training JPEGs) returns
:class:`StreamedSplits` from its ``load`` instead of :class:`~prunebench.datasets.base.DataSplits`;
the runner then trains through :mod:`prunebench.training.streaming` instead of the device-resident
engine. The choice is the dataset's, never the user's.

Sources (:func:`scan`): an ImageFolder directory, or an uncompressed ``.tar`` read in place
(member offsets are indexed once; workers ``seek`` and read), holding::

    train/<class>/<image>.JPEG|.jpg|.jpeg|.png
    val/<class>/<image>...          (the evaluation split; ``test/`` where the dataset allows it)

Preprocessing is the standard ImageNet recipe (torchvision's reference scripts; Szegedy et
al., "Going Deeper with Convolutions", CVPR 2015, for the random-resized crop): for training
a random-resized crop (scale 0.08-1, aspect ratio 3/4-4/3) to ``train_size`` and a random
horizontal flip; for evaluation a resize of the shorter side to ``eval_resize`` and a
centre crop of ``eval_crop``. Decoding uses ``torchvision.io.decode_image`` (RGB). The
random crop and flip of an image are drawn from a generator seeded by (run seed, epoch,
image index), so they do not depend on the number of workers or processes. Workers return
uint8 tensors; normalisation happens on the training device.
"""

from __future__ import annotations

import hashlib
import os
import random
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebench.errors import DataNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
TRAIN = "train"
#: random-resized-crop ranges of the ImageNet recipe
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class ImageList:
    """The images of one split: where each is (a file relative to ``source``, or a byte range
    of the tar ``source``) and its label."""

    source: Path
    names: tuple[str, ...]
    labels: tuple[int, ...]
    offsets: tuple[int, ...] | None = None  # tar: where each member's data start
    sizes: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def is_tar(self) -> bool:
        return self.offsets is not None

    def subset(self, indices: list[int]) -> ImageList:
        pick = lambda seq: None if seq is None else tuple(seq[i] for i in indices)  # noqa: E731
        return ImageList(self.source, pick(self.names), pick(self.labels), pick(self.offsets), pick(self.sizes))


@dataclass(frozen=True)
class Preprocess:
    """Input sizes of the ImageNet recipe (training crop; evaluation resize and centre crop)."""

    train_size: int = 224
    eval_resize: int = 256
    eval_crop: int = 224

    def __post_init__(self) -> None:
        from prunebench.errors import ConfigError

        for key in ("train_size", "eval_resize", "eval_crop"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.eval_crop > self.eval_resize:
            raise ConfigError(f"eval_crop ({self.eval_crop}) cannot exceed eval_resize ({self.eval_resize})")


@dataclass
class StreamedSplits:
    """A dataset that streams from storage: the image lists, classes and preprocessing.

    The counterpart of :class:`~prunebench.datasets.base.DataSplits` for datasets that do
    not fit on the device; ``mean``/``std`` are the normalisation (in [0, 1] units).
    """

    name: str
    train: ImageList
    test: ImageList
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    preprocess: Preprocess = field(default_factory=Preprocess)
    hflip: bool = True
    streamed: bool = True  # what the runner checks

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return 3

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one evaluated image (what the model is measured at)."""
        return (3, self.preprocess.eval_crop, self.preprocess.eval_crop)

    @property
    def input_size(self) -> int:
        return self.preprocess.eval_crop


def layout(what: str, test_names: tuple[str, ...]) -> str:
    tests = " or ".join(f"{t}/<class>/..." for t in test_names)
    return f"{what} holding train/<class>/<image>.JPEG and {tests} (ImageFolder class folders)"


def _image(name: str) -> bool:
    return not name.startswith(".") and "." in name and "." + name.rsplit(".", 1)[1].lower() in IMAGE_SUFFIXES


def _scan_split_dir(root: Path, split: str) -> dict[str, list[str]]:
    """{class: [relative image paths]} of ``root/split``, sorted."""
    out: dict[str, list[str]] = {}
    with os.scandir(root / split) as it:
        classes = sorted(e.name for e in it if e.is_dir(follow_symlinks=True) and not e.name.startswith("."))
    for cls in classes:
        files: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root / split / cls, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(root).as_posix()
            files += [f"{rel}/{f}" for f in sorted(filenames) if _image(f)]
        out[cls] = files
    return out


def _scan_tar(path: Path) -> tuple[dict[str, dict[str, list[str]]], dict[str, tuple[int, int]]]:
    """({split: {class: [member names]}}, {member: (offset, size)}) of an uncompressed tar."""
    splits: dict[str, dict[str, list[str]]] = {}
    where: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tf:
            for m in tf:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not m.isfile() or len(parts) < 3 or not _image(parts[-1]):
                    continue
                splits.setdefault(parts[0], {}).setdefault(parts[1], []).append(m.name)
                where[m.name] = (m.offset_data, m.size)
    except tarfile.ReadError as exc:
        raise DataNotFoundError(
            f"{path}: not an uncompressed tar archive ({exc}); streaming reads a directory or a plain .tar "
            "(extract a .tar.gz first)") from None
    for classes in splits.values():
        for names in classes.values():
            names.sort()
    return splits, where


INDEX_FORMAT = 1  # bump when the cached index changes


def _stamp(source: Path) -> str:
    """What the index of ``source`` depends on: a tar's size and mtime; for a directory, the
    mtimes of its split and class folders (adding or removing an image changes its folder's)."""
    if source.is_file():
        st = source.stat()
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha256()
    for split in sorted(os.scandir(source), key=lambda e: e.name):
        if split.is_dir():
            h.update(f"{split.name}:{split.stat().st_mtime_ns};".encode("utf-8", "surrogateescape"))
            for cls in sorted(os.scandir(split.path), key=lambda e: e.name):
                if cls.is_dir():
                    h.update(f"{cls.name}:{cls.stat().st_mtime_ns};".encode("utf-8", "surrogateescape"))
    return "dir:" + h.hexdigest()


Index = tuple[set[str], dict[str, dict[str, list[str]]], dict[str, list[int]] | None]


def _scan(source: Path, splits: tuple[str, ...]) -> Index:
    """(split folders present, {split: {class: [images]}} for ``splits``, tar offsets and sizes)."""
    if source.is_dir():
        present = {p.name for p in source.iterdir() if p.is_dir()}
        return present, {s: _scan_split_dir(source, s) for s in splits if s in present}, None
    tree, where = _scan_tar(source)
    return set(tree), {s: tree[s] for s in splits if s in tree}, {k: list(v) for k, v in where.items()}


def index_images(source: Path, splits: tuple[str, ...]) -> Index:
    """:func:`_scan`, cached as JSON under ``<cache>/datasets/index-*.json`` by the source's
    stamp: listing ImageNet's 1.3 M files, or reading a tar's 1.3 M headers, is done once, by
    one process."""
    import json

    from prunebench.datasets import cache_dir
    from prunebench.storage.files import replace_atomically
    from prunebench.storage.locks import hold

    source = source.absolute()
    stamp = _stamp(source)
    digest = hashlib.sha256(str(source).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    entry = cache_dir() / "datasets" / f"index-{source.name[:40]}-{digest}.json"

    def cached() -> Index | None:
        try:
            data = json.loads(entry.read_bytes())
        except (OSError, ValueError):  # missing, partial or foreign: scan again
            return None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or data.get("stamp") != stamp \
                or data.get("splits") != list(splits):
            return None
        return set(data["present"]), data["trees"], data["where"]

    found = cached()
    if found is not None:
        return found
    entry.parent.mkdir(parents=True, exist_ok=True)
    with hold(f"{entry}.lock"):
        found = cached()  # another process may have just written it
        if found is not None:
            return found
        present, trees, where = _scan(source, splits)
        payload = {"format": INDEX_FORMAT, "stamp": stamp, "splits": list(splits), "present": sorted(present),
                   "trees": trees, "where": where}
        try:
            data = json.dumps(payload, separators=(",", ":")).encode("utf-8", "surrogateescape")
            replace_atomically(entry, lambda f: f.write(data))
        except OSError as exc:
            warnings.warn(f"could not write the image index {entry}: {exc}", stacklevel=2)
    return present, trees, where


def scan(source: Path, test_names: tuple[str, ...] = ("val",), what: str = "an image folder") -> tuple[
        ImageList, ImageList, list[str], str]:
    """Index ``source`` (a directory or an uncompressed ``.tar``): (train, test, classes, test split name).

    The listing is cached (:func:`index_images`). Raises a one-line :class:`DataNotFoundError`
    naming the expected layout when the source
    is missing, a split or its class folders are missing or empty, or the evaluation split
    has classes the training split lacks.
    """
    expected = layout(what, test_names)
    source = Path(source).expanduser()
    if not source.exists():
        raise DataNotFoundError(f"{source} not found: expected {expected}")
    present, trees, where = index_images(source, (TRAIN, *test_names))
    test_name = next((t for t in test_names if t in present), None)
    missing = [n for n, ok in ((f"{TRAIN}/", TRAIN in present), (" or ".join(f"{t}/" for t in test_names),
                                                                  test_name is not None)) if not ok]
    if missing:
        found = ", ".join(sorted(f"{p}/" for p in present)[:10]) or "nothing"
        raise DataNotFoundError(f"{source}: no {' and no '.join(missing)} (found {found}); expected {expected}")
    train_tree, test_tree = trees[TRAIN], trees[test_name]
    for split, tree in ((TRAIN, train_tree), (test_name, test_tree)):
        if not tree:
            raise DataNotFoundError(f"{source}/{split}/ has no class folders; expected {expected}")
        empty = [c for c, files in tree.items() if not files]
        if empty:
            raise DataNotFoundError(f"{source}/{split}/{empty[0]}/ holds no images (.JPEG, .jpg, .png)"
                                    f"{f' (nor do {len(empty) - 1} more classes)' if len(empty) > 1 else ''}; "
                                    f"expected {expected}")
    classes = sorted(train_tree)
    extra = sorted(set(test_tree) - set(classes))
    if extra:
        raise DataNotFoundError(f"{source}/{test_name}/ has classes that train/ lacks ({', '.join(extra[:5])}); "
                                f"expected {expected}")
    index = {c: i for i, c in enumerate(classes)}

    def image_list(tree: dict[str, list[str]]) -> ImageList:
        names = [n for c in sorted(tree) for n in tree[c]]
        labels = [index[c] for c in sorted(tree) for _ in tree[c]]
        if where is None:
            return ImageList(source, tuple(names), tuple(labels))
        return ImageList(source, tuple(names), tuple(labels), tuple(where[n][0] for n in names),
                         tuple(where[n][1] for n in names))

    return image_list(train_tree), image_list(test_tree), classes, test_name


def crop_box(rng: random.Random, height: int, width: int, scale: tuple[float, float] = SCALE,
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: ten tries at a random area fraction in
    ``scale`` and log-uniform aspect ratio in ``ratio``, else the centre crop of the clamped
    ratio (the algorithm of torchvision's ``RandomResizedCrop``, drawn from ``rng``)."""
    import math

    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFiles:
    """A map-style dataset over a run's two :class:`ImageList` (``torch.utils.data.Dataset``
    protocol), keyed by ``(split, index, seed)``: split 0 is training, 1 the test split.

    With a ``seed`` it returns the random-resized crop and flip drawn from that seed (training);
    with ``seed=None`` the resized centre crop (evaluation, calibration). Both as uint8
    ``[3, H, W]`` with the int label.
    """

    def __init__(self, train: ImageList, test: ImageList, preprocess: Preprocess, hflip: bool = True) -> None:
        self.lists, self.preprocess, self.hflip = (train, test), preprocess, hflip
        self._files: dict[Path, Any] = {}
        self._pid: int | None = None

    def __len__(self) -> int:
        return sum(len(images) for images in self.lists)

    def __getstate__(self) -> dict[str, Any]:  # open files do not travel to workers
        return {**self.__dict__, "_files": {}, "_pid": None}

    def read(self, split: int, i: int) -> Tensor:
        """The encoded bytes of image ``i`` of ``split`` as a 1-D uint8 tensor."""
        import torch

        imgs = self.lists[split]
        if not imgs.is_tar:
            return torch.frombuffer(bytearray((imgs.source / imgs.names[i]).read_bytes()), dtype=torch.uint8)
        if self._pid != os.getpid():  # a forked worker opens its own handle
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(imgs.source)
        if f is None:
            f = self._files[imgs.source] = open(imgs.source, "rb")  # noqa: SIM115 - kept for the worker's life
        f.seek(imgs.offsets[i])  # type: ignore[index]
        return torch.frombuffer(bytearray(f.read(imgs.sizes[i])), dtype=torch.uint8)  # type: ignore[index]

    def decode(self, split: int, i: int) -> Tensor:
        from torchvision.io import ImageReadMode, decode_image

        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for torchcodec; they work
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                return decode_image(self.read(split, i), mode=ImageReadMode.RGB)
            except (RuntimeError, ValueError) as exc:
                imgs = self.lists[split]
                raise DataNotFoundError(f"cannot decode image {imgs.source}/{imgs.names[i]}: {exc}") from None

    def __getitem__(self, key: tuple[int, int, int | None]) -> tuple[Tensor, int]:
        import torchvision.transforms.v2.functional as TF

        split, i, seed = key
        p = self.preprocess
        img = self.decode(split, i)
        if seed is not None:
            rng = random.Random(seed)
            top, left, h, w = crop_box(rng, int(img.shape[1]), int(img.shape[2]))
            img = TF.resized_crop(img, top, left, h, w, [p.train_size, p.train_size], antialias=True)
            if self.hflip and rng.random() < 0.5:
                img = TF.horizontal_flip(img)
        else:
            img = TF.center_crop(TF.resize(img, [p.eval_resize], antialias=True), [p.eval_crop, p.eval_crop])
        return img.contiguous(), self.lists[split].labels[i]
