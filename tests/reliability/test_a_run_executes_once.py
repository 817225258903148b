"""Promise: a run is executed by one process at a time.

``prunebench run`` honours the same per-run lock (``<results>/<run_id>.lock``) as sweeps: it
waits while another process executes the run, then skips it when that process completed it.
"""

from __future__ import annotations

import threading
import time

from _support import TINY, records

from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.pipeline.runner import execute
from prunebench.progress import Reporter
from prunebench.storage.locks import FileLock


def test_prunebench_run_waits_for_the_process_holding_the_run_lock(tmp_path):
    results = tmp_path / "r"
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY), results_dir=results)
    rid = run_id(cfg.identity())
    held = FileLock(results / f"{rid}.lock")  # another process (a sweep) is executing this run
    assert held.acquire(blocking=False)
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(result=execute(cfg, Reporter(quiet=True))))
    try:
        worker.start()
        time.sleep(3.0)
        assert worker.is_alive() and not list(results.glob("*.json"))  # waiting, not running
    finally:
        held.release()
    worker.join(timeout=300)
    assert not worker.is_alive()
    record, path = outcome["result"]
    assert record["status"] == "complete" and path.stem == rid


def test_prunebench_run_skips_a_run_another_process_completed_while_it_waited(tmp_path):
    results = tmp_path / "r"
    cfg = RunConfig(criterion="random", arch="resnet20", budget=get_budget("smoke", TINY), results_dir=results)
    rid = run_id(cfg.identity())
    held = FileLock(results / f"{rid}.lock")
    assert held.acquire(blocking=False)
    outcome: dict = {}
    waiting = threading.Thread(target=lambda: outcome.update(result=execute(cfg, Reporter(quiet=True))))
    try:
        waiting.start()
        time.sleep(1.0)
        # meanwhile "the other process" completes the run (it holds the lock, so it passes locked=True)
        execute(cfg, Reporter(quiet=True), locked=True)
        done = (results / f"{rid}.json").read_bytes()
    finally:
        held.release()
    waiting.join(timeout=300)
    assert outcome["result"][0]["status"] == "complete"
    assert (results / f"{rid}.json").read_bytes() == done  # skipped, not executed a second time
    assert list(records(results)) == [rid] and not (results / "attempts").exists()
