"""Timing two models interleaved (baseline, compressed, ...) with pinned threads on each runtime,
and a seeded bootstrap interval of the speed-up over the paired repeats."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from prunebench.latency.export import openvino_compiled, ort_session

BOOTSTRAP_RESAMPLES = 2000


BOOTSTRAP_SEED = 0


def interleaved(first: Callable[[], Any], second: Callable[[], Any], repeats: int, warmup: int,
                clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """Seconds per call of ``first`` and ``second``, timed alternately (first, second, first,
    ...) after ``warmup`` untimed calls of each, also alternated."""
    for _ in range(warmup):
        first()
        second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return a, b


def speedup_interval(baseline: Sequence[float], compressed: Sequence[float], level: float = 0.95,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Speed-up = median(baseline) / median(compressed), and its ``level`` interval by a seeded
    percentile bootstrap over the *paired* repeats (repeat i of both resampled together)."""
    base = np.asarray(baseline, dtype=float)
    comp = np.asarray(compressed, dtype=float)
    if base.shape != comp.shape or base.size == 0:
        raise ValueError("paired repeats: both lists must have the same, non-zero length")
    point = float(np.median(base) / np.median(comp))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, base.size, size=(resamples, base.size))
    ratios = np.median(base[idx], axis=1) / np.median(comp[idx], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return {"median": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "method": "percentile bootstrap over paired repeats", "resamples": resamples, "seed": seed}


@dataclass
class Runner:
    """One forward pass of a model on a fixed batch in one runtime, threads pinned while it runs."""

    call: Callable[[], Any]
    threads: int


def torch_runner(model: nn.Module, x: torch.Tensor, threads: int, device: str = "cpu") -> Runner:
    """PyTorch eager on ``device``; on a CUDA device a call ends when the device has finished it."""
    model = model.eval().to(device)
    x = x.to(device)
    cuda = torch.device(device).type == "cuda"

    def call() -> None:
        with torch.inference_mode():
            model(x)
        if cuda:
            torch.cuda.synchronize()

    return Runner(call, threads)


def ort_runner(graph: bytes, x: torch.Tensor, threads: int) -> Runner:
    session = ort_session(graph, threads)
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return Runner(lambda: session.run(None, feeds), threads)


def openvino_runner(graph: bytes, x: torch.Tensor, threads: int) -> Runner:
    compiled = openvino_compiled(graph, x.shape, threads)
    request = compiled.create_infer_request()
    feeds = {0: x.numpy()}
    return Runner(lambda: request.infer(feeds), threads)


def _pinned(threads: int):
    class _Pin:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(threads)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Pin()
