"""Tiny ImageFolder trees of random JPEGs for the streamed-data tests."""

from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import torch


def make_folder(root: Path, classes: int = 3, train: int = 4, test: int = 2, test_name: str = "val",
                size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """``root/train/c<k>/<i>.jpg`` and ``root/<test_name>/c<k>/<i>.jpg``: class ``k`` images are
    noise around a grey level of their own, so a model can learn them."""
    from torchvision.io import encode_jpeg

    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", train), (test_name, test)):
        for k in range(classes):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                level = 40 + 170 * k / max(classes - 1, 1)
                img = (torch.randn(3, *size, generator=gen) * 30 + level).clamp(0, 255).to(torch.uint8)
                with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs; they work
                    warnings.simplefilter("ignore", DeprecationWarning)
                    data = encode_jpeg(img, quality=90)
                (folder / f"{i:04d}.jpg").write_bytes(bytes(data.numpy()))
    return root


def make_tar(folder: Path, dest: Path) -> Path:
    """An uncompressed tar of ``folder``'s contents (members ``train/...``, ``val/...``)."""
    with tarfile.open(dest, "w") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, arcname=p.relative_to(folder).as_posix(), recursive=False)
    return dest
