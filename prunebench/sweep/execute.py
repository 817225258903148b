"""Executing one run of a sweep: skipped when complete, held under its lock, its outcome.

Every run of the grid is an ordinary :func:`prunebench.pipeline.runner.execute` call, so each
writes one atomic record whose id is derived from its configuration. While a run executes, its
process holds ``<results>/<run_id>.lock``; a run locked by another process is ``busy`` and is
come back to at the end. Each distinct baseline is prepared once before the grid fans out.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prunebench import registry
from prunebench.config.run import RunConfig, cfg_run_id
from prunebench.errors import DivergedError
from prunebench.results.records import is_complete
from prunebench.storage.locks import FileLock
from prunebench.sweep.spec import record_path


@dataclass
class Outcome:
    """What happened to one run in this sweep."""

    run_id: str
    status: str  # complete | failed | diverged | skipped | busy (locked by another process; retried at the end)
    seconds: float = 0.0
    error: str | None = None
    note: str = ""


def plan(runs: Iterable[RunConfig]) -> list[tuple[str, str]]:
    """(run id, "complete" | "pending") for every run."""
    return [(cfg_run_id(cfg), "complete" if is_complete(record_path(cfg)) else "pending") for cfg in runs]


def run_one(cfg: RunConfig, blocking: bool = False, verbose: bool = False) -> Outcome:
    """Execute one run unless it is complete. Holds ``<results>/<run_id>.lock`` meanwhile; when
    another process holds it, returns ``busy`` at once (or, with ``blocking``, waits for it)."""
    from prunebench.pipeline.runner import execute
    from prunebench.progress import Reporter

    rid = cfg_run_id(cfg)
    results = Path(cfg.results_dir)
    lock = FileLock(results / f"{rid}.lock")
    if not lock.acquire(blocking=blocking):
        return Outcome(rid, "busy", note="running in another process")
    try:
        if is_complete(results / f"{rid}.json"):  # checked under the lock: it may have just finished
            return Outcome(rid, "skipped", note="already complete")
        t0 = time.perf_counter()
        try:
            record, _ = execute(cfg, Reporter(quiet=not verbose), locked=True)
        except Exception as exc:  # noqa: BLE001 - the runner has written a failed record
            status = "diverged" if isinstance(exc, DivergedError) else "failed"
            return Outcome(rid, status, time.perf_counter() - t0, f"{type(exc).__name__}: {exc}")
        return Outcome(rid, record["status"], time.perf_counter() - t0)
    finally:
        lock.release()


def prepare_baseline(cfg: RunConfig) -> str:
    """Train (or load from the cache) the baseline that ``cfg`` needs; returns what happened."""
    import torch

    from prunebench.pipeline.baseline import get_baseline
    from prunebench.pipeline.data import load_data, resolve_device
    from prunebench.progress import Reporter

    try:
        torch.manual_seed(cfg.seed)  # as the runner does: the same seed gives the same baseline
        device = resolve_device(cfg.device)
        splits, data = load_data(cfg, device)
        arch = registry.architectures.get(cfg.arch)
        model = arch.build(num_classes=splits.num_classes, in_channels=splits.in_channels).to(device)
        info = get_baseline(cfg, model, splits, data, Reporter(quiet=True))
    except Exception as exc:  # noqa: BLE001 - the runs that need it will fail and say why
        return f"failed: {type(exc).__name__}: {exc}"
    if info["source"] == "trained":
        return f"trained in {info['trained_seconds']:.1f}s"
    if info["source"] == "pretrained":
        adapted = info["adaptation"]
        if adapted is None:
            return f"pretrained {info['zoo']['name']}"
        how = "loaded from the cache" if adapted["cached"] else f"in {adapted['seconds']:.1f}s"
        return (f"pretrained {info['zoo']['name']}, adapted ({how}): top-1 {adapted['top1_before']:.2f}% → "
                f"{adapted['top1_after']:.2f}%")
    return "loaded from the cache"


def baseline_groups(runs: Iterable[RunConfig]) -> list[RunConfig]:
    """One representative run per distinct baseline (runs with a given ``baseline`` file need none;
    pretrained baselines are adapted with one seed for all run seeds)."""
    seen: dict[str, RunConfig] = {}
    for cfg in runs:
        if cfg.baseline is not None and not cfg.pretrained:
            continue
        seed = None if cfg.pretrained else cfg.seed
        key = json.dumps([cfg.arch, cfg.dataset, dict(cfg.dataset_options), cfg.budget.resolved(), seed,
                          str(cfg.data_dir), cfg.pretrained, cfg.resolved_precision()], sort_keys=True, default=str)
        seen.setdefault(key, cfg)
    return list(seen.values())
