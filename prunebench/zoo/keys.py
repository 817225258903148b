"""Mapping a checkpoint's state dict onto prunebench's architectures.

``idelbayev`` (pytorch_resnet_cifar10): the state dict was saved from ``DataParallel`` (keys
start with ``module.``), the classifier is called ``linear`` (prunebench: ``fc``), and the
BatchNorm layers predate ``num_batches_tracked`` (filled with 0, the value PyTorch's own
loader assumes for such files; it only matters for BatchNorm with ``momentum=None``).
``none``: the keys already match (torchvision weights on torchvision models).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from prunebench.errors import ConfigError

KEY_MAPS = ("none", "idelbayev")


def state_dict_of(payload: Any, where: str) -> dict[str, Tensor]:
    """The tensors of a loaded checkpoint: ``{"state_dict": {...}, ...}`` or a bare state dict."""
    if isinstance(payload, Mapping) and isinstance(payload.get("state_dict"), Mapping):
        payload = payload["state_dict"]
    if not isinstance(payload, Mapping) or not all(isinstance(v, Tensor) for v in payload.values()):
        raise ConfigError(f"{where} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    return dict(payload)


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


def load_into(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    """``model.load_state_dict(state)`` (strict), with a one-line error naming the first differences."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)) if items]
        raise ConfigError(f"{where} does not fit the architecture: {'; '.join(parts)}")
    model.load_state_dict(state)
