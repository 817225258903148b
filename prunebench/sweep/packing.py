"""Several runs at once on one machine: the local executor's pool of worker processes.

One small model leaves most of a large GPU idle, so a sweep can run ``runs_per_gpu`` runs on
each GPU at once (on a CPU-only machine: that many runs sharing its cores, each with its
share of the threads). Each run still goes through :func:`prunebench.sweep.execute.run_one` in its
worker, so it holds its own ``<run_id>.lock`` and writes its own atomic record: the lock,
resume and crash guarantees of a sequential sweep hold unchanged. A worker exits when the
sweep process that started it dies (even on ``kill -9``), so killing a sweep never leaves
runs going on behind it; the next sweep resumes as after any crash.

With several GPUs, workers are spread over them round-robin (each sees one GPU through
``CUDA_VISIBLE_DEVICES``), so ``runs_per_gpu`` runs share each GPU.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

from prunebench.config.run import RunConfig, Sharing

#: seconds between a worker's checks that the sweep process is still alive
PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class Slots:
    """How many runs the local executor runs at once, and on which devices."""

    total: int  # worker processes
    gpus: tuple[str, ...]  # visible GPU ids to spread workers over; () on a CPU (or one GPU: left alone)
    per_device: int  # runs sharing one device at most
    threads: int  # intra-op threads per worker

    @property
    def shared(self) -> bool:
        return self.per_device > 1


def plan_slots(runs_per_gpu: int, device_type: str, max_parallel: int | None = None) -> Slots:
    """Workers for ``runs_per_gpu`` runs per device: per visible GPU on CUDA, on the whole CPU
    otherwise; ``max_parallel`` caps the total."""
    if device_type == "cuda":
        n_gpus = max(1, _cuda_device_count())
        total = runs_per_gpu * n_gpus
    else:
        n_gpus, total = 1, runs_per_gpu
    if max_parallel is not None:
        total = min(total, max_parallel)
    gpus = tuple(_visible_gpus(n_gpus)) if n_gpus > 1 else ()
    per_device = math.ceil(total / n_gpus)
    return Slots(total=total, gpus=gpus, per_device=per_device, threads=max(1, _cpu_count() // total))


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _visible_gpus(n: int) -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return ids[:n] if len(ids) >= n else [str(i) for i in range(n)]


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _init_worker(parent: int, threads: int, gpus: tuple[str, ...], counter: Any) -> None:
    """In each worker, before any CUDA call: its GPU, its threads, and a watch on the parent."""
    if gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = next_gpu(counter, gpus)
    import torch

    torch.set_num_threads(threads)
    os.environ["PRUNEBENCH_THREADS"] = str(threads)  # the sweep's split: the stages do not measure
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def next_gpu(counter: Any, gpus: Sequence[str]) -> str:
    """Round-robin: the GPU for the next worker that starts (``counter``: a shared integer)."""
    with counter.get_lock():
        index = counter.value
        counter.value += 1
    return gpus[index % len(gpus)]


def _exit_with_parent(parent: int) -> None:
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:  # re-parented: the sweep that started us is gone
            os._exit(1)


def _ready() -> int:
    import prunebench.sweep.execute  # noqa: F401 - the import a run needs first (torch and all)

    return os.getpid()


def _run(cfg: RunConfig, blocking: bool, verbose: bool):  # -> Outcome (in the worker)
    from prunebench.sweep.execute import run_one

    return run_one(cfg, blocking=blocking, verbose=verbose)


def _baseline(cfg: RunConfig) -> str:
    from prunebench.sweep.execute import prepare_baseline

    return prepare_baseline(cfg)


class PackedEngine:
    """The local executor with ``slots.total`` worker processes (spawned: safe with CUDA).
    A worker that dies (e.g. killed for memory) fails only the runs then in flight, which
    leave no record and are retried by the next sweep; the pool is restarted for the rest."""

    def __init__(self, slots: Slots, verbose: bool) -> None:
        self.slots = slots
        self.verbose = verbose
        self.sharing = Sharing(slots.per_device, "local")
        self._ctx = multiprocessing.get_context("spawn")
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.slots.total, mp_context=self._ctx, initializer=_init_worker,
                initargs=(os.getpid(), self.slots.threads, self.slots.gpus, self._ctx.Value("i", 0)),
            )
            # a spawning pool starts workers on demand; start them all now (one per task
            # submitted while none is idle), so that the first runs go side by side
            wait([self._pool.submit(_ready) for _ in range(self.slots.total)])
        return self._pool

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _map(self, items: Sequence[Any], submit: Callable[[ProcessPoolExecutor, Any], Future],
             lost: Callable[[Any, BaseException], Any]) -> Iterator[tuple[int, Any]]:
        """(index, result) as they finish, at most ``slots.total`` in flight."""
        queue = list(enumerate(items))
        in_flight: dict[Future, tuple[int, Any]] = {}
        while queue or in_flight:
            while queue and len(in_flight) < self.slots.total:
                i, item = queue.pop(0)
                in_flight[submit(self._executor(), item)] = (i, item)
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                i, item = in_flight.pop(fut)
                try:
                    yield i, fut.result()
                except BrokenProcessPool as exc:
                    broken = True
                    yield i, lost(item, exc)
                except Exception as exc:  # noqa: BLE001 - e.g. a result that could not be sent back
                    yield i, lost(item, exc)
            if broken:  # every run still in flight died with the pool
                for fut, (i, item) in list(in_flight.items()):
                    in_flight.pop(fut)
                    yield i, lost(item, BrokenProcessPool("a worker process died"))
                self._restart()

    def baselines(self, cfgs: Sequence[RunConfig]) -> list[str]:
        out = [""] * len(cfgs)
        for i, what in self._map(cfgs, lambda pool, cfg: pool.submit(_baseline, cfg),
                                 lambda cfg, exc: f"failed: {type(exc).__name__}: {exc}"):
            out[i] = what
        return out

    def runs(self, cfgs: Sequence[RunConfig], blocking: bool):
        from prunebench.config.run import cfg_run_id
        from prunebench.sweep.execute import Outcome

        def lost(cfg: RunConfig, exc: BaseException) -> Outcome:
            return Outcome(cfg_run_id(cfg), "failed", error=f"{type(exc).__name__}: {exc} (no record written)")

        for _, outcome in self._map(cfgs, lambda pool, cfg: pool.submit(_run, cfg, blocking, self.verbose), lost):
            yield outcome

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
