"""``synthetic``: a generated, learnable image-classification task (no files needed).

Each class has a fixed random template: smooth, low-frequency per-channel patterns drawn
from a 4x4 grid of uniform values and bilinearly upsampled. An image is its class template
plus Gaussian pixel noise, clipped to uint8. The whole dataset is a deterministic function
of its options (``seed`` included), so it is useful for fast, reproducible smoke tests.
"""

from __future__ import annotations

from pathlib import Path

from prunebench.datasets import channel_stats, dataset_options
from prunebench.datasets.base import Dataset, DataSplits
from prunebench.errors import ConfigError

_GRID = 4  # template resolution before upsampling
_LOW, _HIGH = 32.0, 224.0  # template value range (uint8 units)


def _generator(seed: int, stream: int):  # -> torch.Generator
    import torch

    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63))


def templates(num_classes: int, size: int, channels: int, seed: int):  # -> Tensor [K, C, S, S] float32
    """The class templates (uint8 units, float32) for the given options."""
    import torch
    import torch.nn.functional as F

    grid = min(_GRID, size)
    low = torch.rand(num_classes, channels, grid, grid, generator=_generator(seed, 0))
    up = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return _LOW + (_HIGH - _LOW) * up


def _sample(templ, n: int, noise: float, gen):  # -> (Tensor uint8, Tensor int64)
    import torch

    k = templ.shape[0]
    y = (torch.arange(n) % k)[torch.randperm(n, generator=gen)]
    eps = torch.randn((n, *templ.shape[1:]), generator=gen) * (noise * 255.0)
    x = (templ[y] + eps).round_().clamp_(0, 255).to(torch.uint8)
    return x, y.to(torch.int64)


@dataset_options("synthetic", minimum={"n_train": 1, "n_test": 1, "num_classes": 2, "size": 1, "channels": 1,
                                       "noise": 0.0})
def load(
    root: Path | None = None,
    *,
    n_train: int = 512,
    n_test: int = 256,
    num_classes: int = 10,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    noise: float = 0.25,
) -> DataSplits:
    """Generate ``n_train``/``n_test`` images ``[C=channels, size, size]`` of ``num_classes``
    balanced classes; ``noise`` is the pixel-noise std in [0, 1] units. ``root`` is ignored."""
    for opt, value, least in (
        ("n_train", n_train, 1),
        ("n_test", n_test, 1),
        ("num_classes", num_classes, 2),
        ("size", size, 1),
        ("channels", channels, 1),
    ):
        if value < least:
            raise ConfigError(f"dataset 'synthetic': option {opt}={value} must be at least {least}")
    if noise < 0:
        raise ConfigError(f"dataset 'synthetic': option noise={noise} must be >= 0")
    templ = templates(num_classes, size, channels, seed)
    train_x, train_y = _sample(templ, n_train, noise, _generator(seed, 1))
    test_x, test_y = _sample(templ, n_test, noise, _generator(seed, 2))
    mean, std = channel_stats(train_x)
    return DataSplits(
        name="synthetic",
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        classes=[f"class{i}" for i in range(num_classes)],
        mean=mean,
        std=std,
        hflip=False,  # templates are not mirror-symmetric
    )


SYNTHETIC = Dataset(
    name="synthetic",
    load=load,
    description="generated class templates + noise (options n_train, n_test, num_classes, size, channels, seed, noise)",
    needs_files=False,
)
