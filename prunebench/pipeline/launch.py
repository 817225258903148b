"""``prunebench run --nproc N``: one run over N local processes, launched as torchrun launches them.

The launching process checks the configuration, holds the run's lock and starts N workers
through torch's elastic launcher (the machinery of ``torchrun --standalone``; rendezvous on a
free local port, no restarts). Each worker joins the process group
(:func:`prunebench.training.distributed.init`) and runs the protocol (:func:`prunebench.pipeline.runner.execute`);
rank 0 writes the record. When any worker fails, the launcher stops the others (SIGTERM: rank
0 then records the run as ``failed``) and makes sure this attempt left a ``failed`` record that
names the rank that failed first, writing one itself when rank 0 could not (killed outright).
The run then resumes like any other: the same command runs it again.

Several machines: start ``torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m prunebench run ...`` on each (docs/performance.md); the workers
find torchrun's environment and rank 0 holds the lock and writes the record.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from prunebench.config.run import run_id
from prunebench.errors import ConfigError, RunFailedError
from prunebench.progress import Reporter
from prunebench.results import store
from prunebench.results.records import is_complete, now, read_record, write_atomic
from prunebench.storage.locks import FileLock
from prunebench.training import distributed


def worker(cfg: Any, quiet: bool, locked: bool) -> None:
    """One rank: join the group torchrun's environment describes, run the protocol, leave.
    An exception is written where the elastic launcher reads it (its error file)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    record(_worker)(cfg, quiet, locked)


def _worker(cfg: Any, quiet: bool, locked: bool) -> None:
    from prunebench.pipeline.data import resolve_device
    from prunebench.pipeline.runner import execute

    world = distributed.init(resolve_device(cfg.device))
    try:
        execute(cfg, Reporter(quiet=quiet or not world.main), locked=locked)
    finally:
        distributed.shutdown()


def _attempt_written(results: Path, rid: str, since: float) -> Path | None:
    """The record this attempt wrote (its record file or a file in ``attempts/``), if any."""
    candidates = [store.record_path(results, rid), *store.attempts_dir(results, rid).glob("*.json")]
    fresh = [p for p in candidates if p.is_file() and p.stat().st_mtime >= since]
    return max(fresh, key=lambda p: p.stat().st_mtime) if fresh else None


def describe_failure(exc: BaseException) -> tuple[int | None, str]:
    """(rank that failed first, one line about it) from the launcher's ChildFailedError."""
    failures = getattr(exc, "failures", None)
    if not failures:
        return None, f"{type(exc).__name__}: {exc}"
    rank, failure = exc.get_first_failure()  # type: ignore[attr-defined]
    how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    others = sorted(r for r in failures if r != rank)
    extra = f" (ranks {others} failed too)" if others else ""
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else str(failure.message or "")
    useful = message.strip() and not message.startswith(("Signal ", "To enable traceback"))
    detail = f": {message.strip().splitlines()[-1]}" if useful else ""
    return rank, f"rank {rank} (pid {failure.pid}) {how}{detail}{extra}"


def launch(cfg: Any, nproc: int, quiet: bool = False) -> tuple[dict[str, Any], Path]:
    """Run ``cfg`` over ``nproc`` local processes; returns (record, path) like
    :func:`prunebench.pipeline.runner.execute`. Raises :class:`RunFailedError` when a rank failed
    (after the ``failed`` record is written)."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from prunebench.config.validation import check_data, check_run
    from prunebench.pipeline.data import resolve_device
    from prunebench.pipeline.record import base_record
    from prunebench.pipeline.runner import _already_complete, check_distributed

    rep = Reporter(quiet=quiet)
    check_run(cfg)
    check_distributed(cfg, nproc)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ConfigError(f"--nproc {nproc} runs one process per GPU, but {torch.cuda.device_count()} "
                          "GPUs are visible")
    check_data(cfg)
    identity = cfg.identity()
    rid = run_id(identity)
    results = Path(cfg.results_dir)
    out_path = store.record_path(results, rid)
    if is_complete(out_path) and not cfg.force:
        return _already_complete(out_path, rep)
    store.check_results_dir(results)
    lock = FileLock(results / f"{rid}.lock")
    if not lock.acquire(blocking=False):
        rep.log(f"another process is running {rid} (it holds {lock.path}); waiting for it to finish")
        lock.acquire()
    try:
        if is_complete(out_path) and not cfg.force:
            return _already_complete(out_path, rep)
        rep.log(f"starting {nproc} processes for run {rid}")
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=rid, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                              start_method="spawn")
        started, started_at = time.time() - 1.0, now()  # file times may be rounded down to the second
        try:
            elastic_launch(config, worker)(cfg, quiet, True)
        except Exception as exc:  # noqa: BLE001 - ChildFailedError, or the launcher's own failure
            rank, what = describe_failure(exc)
            if _attempt_written(results, rid, started) == out_path and is_complete(out_path):
                rep.log(f"the run completed and its record was written, but then {what}")
                return _already_complete(out_path, Reporter(quiet=True))
            path = _record_failure(cfg, rid, identity, results, started, rank, what, nproc,
                                   base_record_fn=base_record, device=device, rep=rep, started_at=started_at)
            raise RunFailedError(f"run {rid} failed: {what}; record: {path}") from None
        written = _attempt_written(results, rid, started)
        if written is None or not is_complete(out_path):
            raise RunFailedError(f"run {rid}: the processes ended without writing a complete record")
        record = read_record(out_path)
        assert isinstance(record, dict)
        return record, out_path
    finally:
        lock.release()


def _record_failure(cfg: Any, rid: str, identity: dict[str, Any], results: Path, started: float,
                    rank: int | None, what: str, nproc: int, *, base_record_fn: Any, device: Any,
                    rep: Reporter, started_at: str | None = None) -> Path:
    """Make sure this attempt has a ``failed`` record naming the rank that failed first."""
    written = _attempt_written(results, rid, started)
    if written is not None:
        record = read_record(written)
        if isinstance(record, dict) and record.get("status") != "complete":
            if rank not in (0, None):  # rank 0 recorded how it was stopped; say why
                record["error"] = f"{what}; rank 0: {record.get('error', '')}"
                write_atomic(written, record)
            return written
    record = base_record_fn(cfg, rid, identity, device)
    record["distributed"] = {"world_size": nproc, "backend": "nccl" if device.type == "cuda" else "gloo",
                             "batch_per_process": cfg.budget.batch_size // nproc, "batchnorm": "per process"}
    record.update(status="failed", error=f"RunFailedError: {what}", started=started_at or record["started"],
                  finished=now(),
                  traceback=f"written by the launcher (pid {os.getpid()}): rank 0 wrote no record")
    return store.commit(results, rid, record, None, rep.log)
