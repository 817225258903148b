"""Counting and measuring: MACs, parameters, accuracy, latency, peak memory.

MACs follow the protocol: multiply-accumulates of convolution and linear layers per image,
bias adds included; BatchNorm, activations and element-wise ops are not MACs. Counted with
forward hooks on every ``nn.Conv2d``/``nn.Linear`` (subclasses included), so factorised
layers built from them are counted too.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from prunebench.results.records import cpu_name
from prunebench.training import threads


def layer_macs(model: nn.Module, example_inputs: Tensor) -> dict[str, tuple[int, int]]:
    """``{layer: (weight MACs, bias adds)}`` of every conv and linear layer, for one image."""
    found: dict[str, tuple[int, int]] = {}
    handles = []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue

        def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor, name: str = name) -> None:
            n_out = out[0].numel()  # one image
            if isinstance(mod, nn.Conv2d):
                per_out = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                per_out = mod.in_features
            w, b = found.get(name, (0, 0))  # a module called twice counts twice
            found[name] = (w + n_out * per_out, b + (n_out if mod.bias is not None else 0))

        handles.append(m.register_forward_hook(hook))
    forward_once(model, example_inputs, handles)
    return found


def forward_once(model: nn.Module, example_inputs: Tensor, handles: list[Any]) -> None:
    """One image through ``model`` in eval mode without gradients, for the hooks behind
    ``handles`` to see; then the hooks are removed and the model's mode restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def count_macs(model: nn.Module, example_inputs: Tensor) -> int:
    """Conv + linear multiply-accumulates (bias adds included) for one image."""
    return int(sum(w + b for w, b in layer_macs(model, example_inputs).values()))


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def topk_hits(logits: Tensor, labels: Tensor, topk: tuple[int, ...] = (1,)) -> dict[int, int]:
    """How many rows of ``logits`` have their label among their k largest, for each k."""
    kmax = min(max(topk), logits.shape[1])
    hit = logits.float().topk(kmax, dim=1).indices.eq(labels[:, None])
    return {k: int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in topk}


@torch.no_grad()
def accuracy(
    model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 512, topk: tuple[int, ...] = (1,),
    start: int = 0, counted: dict[int, int] | None = None, workers: int = 1,
) -> dict[int, float]:
    """Top-k accuracy in percent over already-normalised ``images``; with ``counted``, the hits
    of ``images[:start]``, counted already; with ``workers`` > 1, the batches are shared among that
    many threads of one intra-op thread each (``threads.in_workers``)."""
    was_training = model.training
    model.eval()
    correct = dict(counted) if counted is not None else {k: 0 for k in topk}

    def hits(first: int) -> dict[int, int]:
        return topk_hits(model(images[first : first + batch_size]), labels[first : first + batch_size], topk)

    for found in threads.in_workers(hits, range(start, images.shape[0], batch_size), workers):
        for k in topk:
            correct[k] += found[k]
    model.train(was_training)
    n = max(images.shape[0], 1)
    return {k: 100.0 * c / n for k, c in correct.items()}


@dataclass(frozen=True)
class Latency:
    device: str
    batch_size: int
    median_ms: float
    repeats: int


def _timed_forward(model: nn.Module, x: Tensor) -> float:
    """Milliseconds for one forward pass (CUDA events on GPU, wall clock on CPU)."""
    if x.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(x)
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    model(x)
    return (time.perf_counter() - t0) * 1000.0


def _device_name(x: Tensor) -> str:
    return torch.cuda.get_device_name(x.device) if x.device.type == "cuda" else cpu_name()


@torch.no_grad()
def measure_latency_pair(
    first: nn.Module, second: nn.Module, example: Tensor, batch_size: int = 1, repeats: int = 20, warmup: int = 5
) -> tuple[Latency, Latency]:
    """Latency of two models measured interleaved (A, B, A, B, ...), so that load from other
    processes or clock changes hit both alike and their ratio stays meaningful."""
    models = (first, second)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    x = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
    for _ in range(warmup):
        for m in models:
            m(x)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for m, t in zip(models, times, strict=True):
            t.append(_timed_forward(m, x))
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)
    name = _device_name(x)
    return Latency(name, batch_size, statistics.median(times[0]), repeats), \
        Latency(name, batch_size, statistics.median(times[1]), repeats)


def measure_latency(
    model: nn.Module, example: Tensor, batch_size: int = 1, repeats: int = 20, warmup: int = 5
) -> Latency:
    """Median time of ``repeats`` forward passes of one model after ``warmup``."""
    with torch.no_grad():
        was_training = model.training
        model.eval()
        x = example[:1].expand(batch_size, *example.shape[1:]).contiguous()
        for _ in range(warmup):
            model(x)
        times = [_timed_forward(model, x) for _ in range(repeats)]
        model.train(was_training)
    return Latency(_device_name(x), batch_size, statistics.median(times), repeats)


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak allocated memory on a CUDA device, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    except (ImportError, OSError):
        return None
