"""CPU threads chosen by measurement, not by core count.

PyTorch takes every core for its threads by default. Two runs started together then
oversubscribe the CPU and OpenMP collapses (measured on 2 cores: two demos took 6.5× longer
with the default threads than with one thread each). So, on a CPU, each training stage that
is long enough times a few steps of a copy of the model at each candidate thread count (1 to
the CPUs this process may use, less the cores that other processes are running on at that
moment) and keeps the fastest; the measurement itself also sees busy cores. During the stage, a fall of the step rate below half of the
measured one (another run started, say) measures again.

An evaluation of the test split (:func:`evaluation_count`) measures its own count the same
way, among the counts that compute the very logits the current count computes (checked on its
first batches): inference splits no sum across threads on the CPUs measured, so a training
stage's count need not slow the evaluations that follow it, and the numbers do not move.

``--threads N`` or ``PRUNEBENCH_THREADS=N`` fixes the count (no measurement); so does a
sweep's per-process split. What each stage used is kept in :data:`history` for the record
(not part of the run id).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunebench.errors import ConfigError

#: environment variable that fixes the thread count (set by --threads and by sweep workers)
ENV = "PRUNEBENCH_THREADS"
#: stages shorter than this (in steps) keep the current thread count: measuring would cost more
MIN_STEPS = 100
#: timed steps per candidate (after one warm-up step)
PROBE_STEPS = 2
#: steps between checks of the step rate during a stage
CHECK_EVERY = 25
#: evaluations of fewer images keep the current thread count
MIN_EVAL_IMAGES = 2048
#: what each training stage of this process used: {"stage", "threads", "img_per_s", "how"}
history: list[dict[str, Any]] = []


def check_threads(value: Any, where: str = "--threads") -> int:
    """A thread count given by a user: a whole number of at least 1 (ConfigError otherwise)."""
    try:
        n = int(str(value).strip())
        ok = str(value).strip().lstrip("+").isdigit()
    except ValueError:
        n, ok = 0, False
    if not ok or n < 1:
        raise ConfigError(f"{where} must be a whole number of threads of at least 1, got {value!r}")
    return n


def fixed() -> int | None:
    """The thread count fixed by ``PRUNEBENCH_THREADS`` (validated), else None (measure)."""
    value = os.environ.get(ENV)
    return None if value is None or value == "" else check_threads(value, ENV)


def apply_fixed() -> None:
    """Use the fixed count, if any, from now on in this process; else measure a starting count
    with :func:`probe_kernel` (the stages before the first long training use it)."""
    n = fixed()
    if n is not None:
        torch.set_num_threads(n)
    elif cpus() > 1:
        choose(probe_kernel())


def probe_kernel() -> Callable[[], None]:
    """A fixed convolution, forward and backward, of the size of a CIFAR ResNet's layer: a few
    milliseconds, enough to see whether more threads help or fight other processes."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 16, 32, 32, generator=g)
    w = torch.randn(16, 16, 3, 3, generator=g, requires_grad=True)

    def step() -> None:
        F.conv2d(x, w, padding=1).square().mean().backward()
        w.grad = None

    return step


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def others_running() -> int:
    """Processes (threads) of others that are running or runnable right now, from the kernel's
    count in ``/proc/loadavg`` less this one; 0 where it cannot be read."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    return max(0, running - 1)


def thread_counts() -> list[int]:
    """1 to the CPUs this process may use, less the cores others are running on now (at least 1)."""
    return list(range(1, max(1, cpus() - others_running()) + 1))


def take_history() -> list[dict[str, Any]]:
    out = list(history)
    history.clear()
    return out


def probe_step(model: nn.Module, x: Tensor, y: Tensor, autocast: Any) -> Callable[[], None]:
    """One forward and backward pass of a copy of ``model`` on a fixed batch: the work a
    training step does, with no effect on the model being trained."""
    clone = copy.deepcopy(model)
    clone.train()

    def step() -> None:
        with autocast:
            loss = F.cross_entropy(clone(x).float(), y)
        loss.backward()
        clone.zero_grad(set_to_none=True)

    return step


def choose(step: Callable[[], None], candidates: list[int] | None = None,
           clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """Time ``step`` at each thread count (one warm-up, then :data:`PROBE_STEPS`) and set the
    fastest. Returns (threads, seconds per step at that count)."""
    best: tuple[int, float] | None = None
    for n in candidates or thread_counts():
        torch.set_num_threads(n)
        step()
        t0 = clock()
        for _ in range(PROBE_STEPS):
            step()
        per_step = (clock() - t0) / PROBE_STEPS
        if best is None or per_step < best[1]:
            best = (n, per_step)
    assert best is not None
    torch.set_num_threads(best[0])
    return best


class StageThreads:
    """The thread policy of one training stage on a CPU (see the module docstring)."""

    def __init__(self, description: str, total: int, batch: int, make_step: Callable[[], Callable[[], None]],
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.description, self.batch, self.clock = description, batch, clock
        self.make_step = make_step
        self.entry: dict[str, Any] = {"stage": description, "threads": torch.get_num_threads()}
        self.rate = 0.0  # steps per second measured when the count was chosen
        n = fixed()
        if n is not None:
            torch.set_num_threads(n)
            self.entry.update(threads=n, how="fixed")
            self.measure = False
        elif total < MIN_STEPS:
            self.entry.update(how="kept (short stage)")  # the process's current count: measured before
            self.measure = False
        else:
            self.measure = True
            self._choose("measured")
        history.append(self.entry)
        self._mark = (clock(), 0)

    def _choose(self, how: str) -> None:
        n, per_step = choose(self.make_step(), clock=self.clock)
        self.rate = 1.0 / max(per_step, 1e-9)
        self.entry.update(threads=n, img_per_s=round(self.rate * self.batch, 1), how=how)

    def after(self, step: int) -> None:
        """Called after each step: every :data:`CHECK_EVERY` steps, measure again when the step
        rate fell below half of the measured one."""
        if not self.measure or step - self._mark[1] < CHECK_EVERY:
            return
        now = self.clock()
        rate = (step - self._mark[1]) / max(now - self._mark[0], 1e-9)
        if rate < 0.5 * self.rate:
            self._choose(f"measured again at step {step} (rate fell to {rate * self.batch:.0f} img/s)")
        self._mark = (self.clock(), step)



def evaluation_count(forward: Callable[[Tensor], Tensor], head: Tensor, reference: Tensor, batch: int, images: int,
                     clock: Callable[[], float] = time.perf_counter) -> int | None:
    """The thread count at which ``forward`` over ``head`` (an evaluation's first images, in
    batches of ``batch``) returns ``reference`` (``head`` as evaluated so far) bit for bit
    fastest, set; None, with the current count kept, when no count does. At each count the
    first batch warms the threads up and the others are timed. Only the current count is
    tried with a fixed count, one CPU, or fewer than :data:`MIN_EVAL_IMAGES` images."""
    current = torch.get_num_threads()
    measure = fixed() is None and cpus() > 1 and images >= MIN_EVAL_IMAGES
    best: tuple[int, float] | None = None
    for n in thread_counts() if measure else [current]:
        torch.set_num_threads(n)
        outs = [forward(head[:batch])]
        t0 = clock()
        outs += [forward(head[i : i + batch]) for i in range(batch, head.shape[0], batch)]
        seconds = clock() - t0
        if torch.equal(torch.cat(outs), reference) and (best is None or seconds < best[1]):
            best = (n, seconds)
    torch.set_num_threads(best[0] if best else current)
    if measure:
        timed = head.shape[0] - min(batch, head.shape[0])
        history.append({"stage": "evaluation", "threads": best[0] if best else current,
                        "how": f"measured (same logits as at {current})" if best else
                               f"kept (no other evaluation gives the same logits as at {current})",
                        **({"img_per_s": round(timed / max(best[1], 1e-9), 1)} if best else {})})
    return best[0] if best else None
