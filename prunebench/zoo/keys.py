"""Mapping a checkpoint's state dict onto prunebench's architectures.

``idelbayev`` (pytorch_resnet_cifar10): the state dict was saved from ``DataParallel`` (keys
start with ``module.``), the classifier is called ``linear`` (prunebench: ``fc``), and the
BatchNorm layers predate ``num_batches_tracked`` (filled with 0, the value PyTorch's own
loader assumes for such files; it only matters for BatchNorm with ``momentum=None``).
``none``: the keys already match (torchvision weights on torchvision models).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from prunebench.errors import ConfigError

KEY_MAPS = ("none", "idelbayev")


def map_keys(state: Mapping[str, Tensor], key_map: str) -> dict[str, Tensor]:
    """Rename ``state``'s keys as ``key_map`` says (see the module docstring)."""
    if key_map == "none":
        return dict(state)
    if key_map != "idelbayev":
        raise ConfigError(f"unknown key map {key_map!r}; known: {', '.join(KEY_MAPS)}")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        head, dot, rest = key.partition(".")
        out[("fc" if head == "linear" else head) + dot + rest] = value
    for key in [k for k in out if k.endswith(".running_mean")]:
        tracked = key.removesuffix("running_mean") + "num_batches_tracked"
        out.setdefault(tracked, torch.tensor(0, dtype=torch.long))
    return out
