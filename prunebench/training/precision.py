"""Training precision: ``auto`` | ``bf16`` | ``fp32``, resolved per device.

``bf16`` trains under ``torch.autocast(dtype=torch.bfloat16)`` (weights, optimiser state and
the loss stay fp32; convolutions and matrix products run in bfloat16) with channels_last
activations. ``auto`` picks ``bf16`` where the hardware computes it natively — a CUDA device
that supports it, or a CPU with AVX512-BF16 or AMX — and ``fp32`` elsewhere. The resolved
value changes the numbers, so it is part of a run's identity and of its record.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from prunebench.errors import ConfigError, suggest

PRECISIONS = ("auto", "bf16", "fp32")
#: /proc/cpuinfo flags of x86 CPUs with native bfloat16 dot products
CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def check_precision(name: str) -> str:
    """``name`` if it is a known precision, else a :class:`ConfigError` with suggestions."""
    if name not in PRECISIONS:
        raise ConfigError(f"unknown precision {name!r}.{suggest(str(name), PRECISIONS)} "
                          f"Available: {', '.join(PRECISIONS)}")
    return name


def device_type(device: str | torch.device) -> str:
    """The device type a device name will resolve to (``auto``: cuda when available), without
    raising for a CUDA name on a machine without CUDA (the run reports that itself)."""
    if isinstance(device, torch.device):
        return device.type
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(device).type if device else "cpu"
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``bf16`` or ``fp32``: what ``precision`` means on ``device``."""
    check_precision(precision)
    if precision != "auto":
        return precision
    kind = device_type(device)
    if kind == "cuda":
        return "bf16" if cuda_supports_bf16() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def cuda_supports_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


@functools.cache
def cpu_supports_bf16() -> bool:
    """Does this CPU compute bfloat16 natively (AVX512-BF16 or AMX) through oneDNN? Checked
    once per process: torch's own CPU capability probes where it has them, else the flags in
    /proc/cpuinfo. Without native support, bf16 autocast on a CPU is emulated and slower
    than fp32, so ``auto`` keeps fp32 there."""
    if not torch.backends.mkldnn.is_available():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [p for p in probes if callable(p)]
    if probes:
        try:
            return any(bool(p()) for p in probes)
        except RuntimeError:
            pass
    return bool(_cpuinfo_flags() & CPU_BF16_FLAGS)


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
