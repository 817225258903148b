"""Datasets: where their files live, and helpers shared by the built-in loaders.

Importing this package is cheap (no torch, no scikit-learn); the loaders themselves live
in ``digits``, ``synthetic``, ``cifar`` and ``imagefolder`` and are registered through the
``prunebench.datasets`` entry points.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prunebench.errors import ConfigError, suggest

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["data_root", "cache_dir", "dataset_options", "channel_stats"]

F = TypeVar("F", bound=Callable[..., Any])


def data_root(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``$PRUNEBENCH_DATA``, else
    ``~/.cache/prunebench/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get("PRUNEBENCH_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/prunebench/data").expanduser()


def cache_dir() -> Path:
    """Where prunebench keeps derived files: ``$PRUNEBENCH_CACHE``, else ``~/.cache/prunebench``."""
    env = os.environ.get("PRUNEBENCH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/prunebench").expanduser()


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _coerce(dataset: str, name: str, value: Any, default: Any) -> Any:
    """Check an option against the type of its default; strings (as typed on a command
    line) are converted. Options whose default is None or a string are passed through."""
    where = f"dataset {dataset!r}: option {name}={value!r}"
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{where} must be true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where} must be an integer")
    if isinstance(default, float):
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where} must be a number")
        if not math.isfinite(number):
            raise ConfigError(f"{where} must be a finite number")
        return number
    return value


def coerce_option(load: Callable[..., Any], dataset: str, name: str, value: Any) -> Any:
    """An option's value typed as its default, and at least its declared minimum."""
    typed = _coerce(dataset, name, value, load.options[name])  # type: ignore[attr-defined]
    least = getattr(load, "minimum", {}).get(name)
    if least is not None and typed < least:
        raise ConfigError(f"dataset {dataset!r}: option {name}={typed!r} must be at least {least}")
    return typed


def dataset_options(dataset: str, minimum: dict[str, float] | None = None) -> Callable[[F], F]:
    """Decorate ``load(root, *, opt=default, ...)`` so that unknown option names raise
    :class:`ConfigError` (with a suggestion) instead of ``TypeError``, and option values
    given as strings are converted to the type of the default. ``minimum``: the least value
    of numeric options, checked with the types (before any work, by the run's validation)."""

    def decorate(fn: F) -> F:
        params = {
            p.name: p.default
            for p in inspect.signature(fn).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        }

        @functools.wraps(fn)
        def load(root: str | Path | None = None, **options: Any) -> Any:
            unknown = [k for k in options if k not in params]
            if unknown:
                name = unknown[0]
                accepted = ", ".join(params) if params else "none"
                raise ConfigError(
                    f"dataset {dataset!r} has no option {name!r}.{suggest(name, params)}"
                    f" Accepted options: {accepted}."
                )
            converted = {k: coerce_option(load, dataset, k, v) for k, v in options.items()}
            return fn(None if root is None else Path(root).expanduser(), **converted)

        load.options = dict(params)  # type: ignore[attr-defined]
        load.minimum = dict(minimum or {})  # type: ignore[attr-defined]
        return load  # type: ignore[return-value]

    return decorate


def channel_stats(x: Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std (in [0, 1] units) of uint8 images ``[N, C, H, W]``.

    Exact and fast: counts the 256 pixel values per channel (``bincount``) and takes the
    moments of that histogram in float64, so no float copy of the images is made.
    """
    import torch

    if x.ndim != 4 or x.shape[0] == 0 or x.dtype != torch.uint8:
        raise ValueError(
            f"channel_stats expects non-empty uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}"
        )
    c = x.shape[1]
    hist = torch.zeros(c, 256, dtype=torch.int64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk]
        for k in range(c):
            hist[k] += torch.bincount(part[:, k].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    h = hist.to(torch.float64)
    n = h.sum(dim=1)
    mean = (h * values).sum(dim=1) / n
    var = ((h * values.square()).sum(dim=1) / n - mean.square()).clamp_min(0.0)
    std = var.sqrt().clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
