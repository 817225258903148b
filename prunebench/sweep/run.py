"""Running a sweep: every pending run of the grid, baselines first, busy runs retried at the end.

A complete record is skipped and anything else is (re-)run, which is what makes a sweep safe to
interrupt and to re-start; two sweeps on the same results directory never execute the same run
at once. The file format is in docs/sweeps.md, the grid in :mod:`prunebench.sweep.spec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from prunebench.config.run import cfg_run_id
from prunebench.errors import ConfigError, suggest
from prunebench.results.records import is_complete
from prunebench.results.store import check_results_dir
from prunebench.sweep.engines import _local_engine, _RayEngine
from prunebench.sweep.execute import Outcome, baseline_groups
from prunebench.sweep.spec import Sweep, record_path

EXECUTORS = ("local", "ray")


def run_sweep(
    sweep: Sweep, executor: str = "local", address: str | None = None, max_parallel: int | None = None,
    log: Callable[[str], None] = print, verbose: bool = False,
) -> list[Outcome]:
    """Run every pending run of the sweep; returns one outcome per run (in grid order).

    The local executor runs ``sweep.runs_per_gpu`` runs per GPU at once (per CPU-only
    machine), in worker processes when that is more than one, capped by ``max_parallel``;
    the Ray executor gives each task ``1 / runs_per_gpu`` of a GPU.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}.{suggest(executor, EXECUTORS)} "
                          f"Available: {', '.join(EXECUTORS)}")
    if max_parallel is not None and max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1, got {max_parallel}")
    runs = sweep.runs()
    ids = [cfg_run_id(cfg) for cfg in runs]
    check_results_dir(sweep.results_dir)
    outcomes: dict[str, Outcome] = {}
    pending = []
    for rid, cfg in zip(ids, runs, strict=True):
        if is_complete(record_path(cfg)):
            outcomes[rid] = Outcome(rid, "skipped", note="already complete")
        else:
            pending.append(cfg)
    log(f"sweep: {len(runs)} runs, {len(runs) - len(pending)} already complete, {len(pending)} to run "
        f"({executor} executor)")
    if pending:
        engine = _local_engine(sweep, max_parallel, verbose) if executor == "local" else \
            _RayEngine(address, max_parallel, verbose, sweep.runs_per_gpu)
        pending = [dataclasses.replace(cfg, sharing=engine.sharing) for cfg in pending]
        log(f"runs at once: {engine.sharing.runs_per_device} per device")
        try:
            baselines = baseline_groups(pending)
            for cfg, what in zip(baselines, engine.baselines(baselines), strict=True):
                seed = "" if cfg.pretrained else f"/seed {cfg.seed}"
                log(f"baseline {cfg.arch}/{cfg.dataset}/{cfg.budget.name}{seed}: {what}")
            done = 0
            for outcome in engine.runs(pending, blocking=False):
                outcomes[outcome.run_id] = outcome
                if outcome.status != "busy":
                    done += 1
                log(_progress_line(outcome, done, len(pending)))
            busy = [cfg for cfg in pending if outcomes[cfg_run_id(cfg)].status == "busy"]
            if busy:  # another process had them: wait for it, then run whatever it did not finish
                log(f"waiting for {len(busy)} runs held by another process")
                for outcome in engine.runs(busy, blocking=True):
                    if outcome.status == "skipped":
                        outcome.note = "completed by another process"
                    outcomes[outcome.run_id] = outcome
                    done += 1
                    log(_progress_line(outcome, done, len(pending)))
        finally:
            engine.close()
    return [outcomes[rid] for rid in ids]


def _progress_line(o: Outcome, done: int, total: int) -> str:
    detail = f" ({o.seconds:.1f}s)" if o.seconds else ""
    if o.error:
        detail += f": {o.error}"
    elif o.note:
        detail += f": {o.note}"
    return f"[{done}/{total}] {o.status:<8} {o.run_id}{detail}"


def summary(outcomes: Sequence[Outcome]) -> str:
    """A plain-text table of the sweep's runs and the counts per status."""
    from tabulate import tabulate

    rows = [[o.run_id, o.status, f"{o.seconds:.1f}" if o.seconds else "", o.error or o.note] for o in outcomes]
    counts = {s: sum(o.status == s for o in outcomes) for s in ("complete", "failed", "skipped")}
    diverged = sum(o.status == "diverged" for o in outcomes)
    if diverged:
        counts = {"complete": counts["complete"], "failed": counts["failed"], "diverged": diverged,
                  "skipped": counts["skipped"]}
    table = tabulate(rows, headers=["run", "status", "seconds", "note"], tablefmt="simple", disable_numparse=True)
    return table + "\n" + ", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({len(outcomes)} runs)"
