"""``digits``: scikit-learn's bundled copy of the UCI optical handwritten digits.

Source: ``sklearn.datasets.load_digits`` (E. Alpaydin and C. Kaynak, "Optical Recognition
of Handwritten Digits", UCI Machine Learning Repository, 1998): 1,797 images of 8x8 pixels
with values 0..16, 10 classes. Ships with scikit-learn, so it needs no files or network.
"""

from __future__ import annotations

from pathlib import Path

from prunebench.datasets import channel_stats, dataset_options
from prunebench.datasets.base import Dataset, DataSplits

TEST_SIZE = 360  # 1,437 train / 360 test, stratified by class
SPLIT_SEED = 0


@dataset_options("digits")
def load(root: Path | None = None) -> DataSplits:
    """Load the digits as ``[N, 1, 8, 8]`` uint8 (0..16 scaled to 0..255) with a fixed
    stratified train/test split (seed 0). ``root`` is ignored."""
    import numpy as np
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    x = torch.from_numpy(images.clip(0, 255).astype(np.uint8)).unsqueeze(1)  # [N, 1, 8, 8]
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=TEST_SIZE, stratify=bunch.target, random_state=SPLIT_SEED
    )
    train_idx = torch.from_numpy(np.asarray(train_idx, dtype=np.int64))
    test_idx = torch.from_numpy(np.asarray(test_idx, dtype=np.int64))
    train_x = x[train_idx].contiguous()
    mean, std = channel_stats(train_x)
    return DataSplits(
        name="digits",
        train_x=train_x,
        train_y=y[train_idx].contiguous(),
        test_x=x[test_idx].contiguous(),
        test_y=y[test_idx].contiguous(),
        classes=[str(int(c)) for c in bunch.target_names],
        mean=mean,
        std=std,
        hflip=False,  # a mirrored digit is not the same digit
    )


DIGITS = Dataset(
    name="digits",
    load=load,
    description="scikit-learn's 8x8 handwritten digits (1,437 train / 360 test, 10 classes); no files needed",
    needs_files=False,
)
