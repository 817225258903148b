"""CPU threads chosen by measurement, not by core count.

PyTorch takes every core for its threads by default. Two runs started together then
oversubscribe the CPU and OpenMP collapses (measured on 2 cores: two demos took 6.5× longer
with the default threads than with one thread each). So, on a CPU, each training stage that
is long enough times a few steps of a copy of the model at each candidate thread count (1 to
the CPUs this process may use, less the cores that other processes are running on at that
moment) and keeps the fastest; the measurement itself also sees busy cores. During the stage, a fall of the step rate below half of the
measured one (another run started, say) measures again.

An evaluation of the test split (:func:`evaluation_plan`) measures its own way the same way,
among those that compute the very logits the current count computes (checked on its first
batches): each thread count, and the batches shared among workers of one intra-op thread each
(:func:`in_workers`), which keeps every core busy on the small convolutions of CIFAR networks
where intra-op threads do not. Inference splits no sum across threads on the CPUs measured, so a
training stage's count need not slow the evaluations that follow it, and the numbers do not move.

``--threads N`` or ``PRUNEBENCH_THREADS=N`` fixes the count (no measurement); so does a
sweep's per-process split. What each stage used is kept in :data:`history` for the record
(not part of the run id).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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


def others_running(samples: int = 10, interval: float = 0.01) -> int:
    """Threads of other processes that are running or runnable now: the kernel's count in
    ``/proc/loadavg`` less this process's own running threads (an OpenMP pool still spinning
    after a parallel region counts there too), the least of a few samples a few milliseconds
    apart (a process that computes shows in each; a short-lived one does not); 0 where it
    cannot be read."""
    seen = []
    for i in range(samples):
        if i:
            time.sleep(interval)
        running = runnable()
        if running is None:
            return 0
        seen.append(max(0, running - own_running()))
    return min(seen)


def runnable() -> int | None:
    """The kernel's count of running or runnable threads (``/proc/loadavg``), None unreadable."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def own_running() -> int:
    """This process's threads that are running or runnable (state ``R`` in ``/proc/self/task``);
    at least 1, the caller's."""
    count = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="ascii", errors="replace") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]  # the name in parentheses may hold spaces
        except (OSError, IndexError):
            continue
        count += state == "R"
    return max(1, count)


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



def free_workers(items: int) -> int:
    """Workers for ``items`` independent pieces of inference (:func:`in_workers`, one intra-op
    thread each): the cores free now (:func:`thread_counts`), at most ``items``; 1 with a fixed
    count (a sweep's split, ``--threads``) or one CPU, which keep their single thread."""
    if fixed() is not None or cpus() <= 1:
        return 1
    return max(1, min(items, max(thread_counts())))


@dataclass(frozen=True)
class EvaluationPlan:
    """How an evaluation on a CPU computes: ``threads`` intra-op threads, and its batches shared
    among ``workers`` Python threads (each computing one batch at a time; 1: the caller's)."""

    threads: int
    workers: int = 1


def in_workers(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> list[Any]:
    """``[fn(item) for item in items]``, computed by ``workers`` threads at once (in order).

    PyTorch releases the GIL inside its kernels, so with one intra-op thread each worker
    computes on its own core; the batches of an evaluation never share a sum, so every output
    is the one a single thread computes. The workers compute with one intra-op thread (the
    caller's count is restored afterwards) and in the caller's grad mode."""
    if workers <= 1:
        return [fn(item) for item in items]
    grad = torch.is_grad_enabled()  # a thread-local mode: each worker takes the caller's

    def call(item: Any) -> Any:
        with torch.set_grad_enabled(grad):
            return fn(item)

    current = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prunebench-eval") as pool:
            return list(pool.map(call, items))
    finally:
        torch.set_num_threads(current)


def evaluation_plan(forward: Callable[[Tensor], Tensor], head: Tensor, reference: Tensor, batch: int, images: int,
                    clock: Callable[[], float] = time.perf_counter) -> EvaluationPlan | None:
    """The fastest way to evaluate in batches of ``batch`` that returns ``reference`` (``head``,
    an evaluation's first images, as evaluated so far) bit for bit; its thread count is set.
    None, with the current count kept, when no way does.

    The candidates are each thread count (:func:`thread_counts`; at each, the first batch warms
    the threads up and the others are timed) and, with more than one free core, the batches
    shared among that many workers of one intra-op thread each (:func:`in_workers`; timed over
    all of ``head``, after the one-thread count warmed up). Only the current count is tried
    with a fixed count, one CPU, or fewer than :data:`MIN_EVAL_IMAGES` images."""
    current = torch.get_num_threads()
    measure = fixed() is None and cpus() > 1 and images >= MIN_EVAL_IMAGES
    counts = thread_counts() if measure else [current]
    candidates = [EvaluationPlan(n) for n in counts]
    if measure and max(counts) > 1 and head.shape[0] >= 2 * batch:
        candidates.append(EvaluationPlan(1, workers=max(counts)))
    batches = [head[i : i + batch] for i in range(0, head.shape[0], batch)]
    best: tuple[EvaluationPlan, float] | None = None
    for plan in candidates:
        torch.set_num_threads(plan.threads)
        if plan.workers > 1:
            timed = batches
            t0 = clock()
            outs = in_workers(forward, batches, plan.workers)
        else:
            timed = batches[1:]
            outs = [forward(batches[0])]
            t0 = clock()
            outs += [forward(b) for b in timed]
        rate = sum(b.shape[0] for b in timed) / max(clock() - t0, 1e-9)
        if torch.equal(torch.cat(outs), reference) and (best is None or rate > best[1]):
            best = (plan, rate)
    torch.set_num_threads(best[0].threads if best else current)
    if measure:
        entry: dict[str, Any] = {"stage": "evaluation", "threads": best[0].threads if best else current}
        if best and best[0].workers > 1:
            entry["workers"] = best[0].workers
        entry["how"] = (f"measured (same logits as at {current})" if best else
                        f"kept (no other evaluation gives the same logits as at {current})")
        if best:
            entry["img_per_s"] = round(best[1], 1)
        history.append(entry)
    return best[0] if best else None
