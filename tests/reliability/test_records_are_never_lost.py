"""Promise: no good record is lost.

A complete record is never replaced by an attempt that did not complete, its model file is
never orphaned, replaced records are kept in a history, an unusable results directory is
found before any work, and a record that cannot be written where it belongs is saved
elsewhere with a message saying where.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _support import TINY, copy_results, invoke, records, run_args

import prunebench.pipeline.runner as runner_mod
from prunebench.errors import ConfigError


def snapshot(results: Path) -> dict[str, bytes]:
    return {str(p.relative_to(results)): p.read_bytes() for p in results.rglob("*") if p.is_file()}


def attempts(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "attempts").rglob("*.json"))]


def test_a_failed_forced_rerun_keeps_the_complete_record_and_its_model(complete_run, profile_file, tmp_path,
                                                                       monkeypatch):
    results = copy_results(complete_run, tmp_path / "r")
    before = snapshot(results)
    (rid,) = records(results)

    def broken(*args, **kwargs):
        raise RuntimeError("the machine fell over while measuring latency")

    monkeypatch.setattr(runner_mod, "latency_block", broken)  # late: after fine-tuning
    res = invoke(*run_args(results, "--layer-ratios", profile_file, "--force"))
    assert isinstance(res.exception, RuntimeError)
    after = snapshot(results)
    assert after[f"{rid}.json"] == before[f"{rid}.json"]  # the complete record, byte for byte
    assert after[f"models/{rid}.pt"] == before[f"models/{rid}.pt"]  # and the model it names
    (failed,) = attempts(results)
    assert failed["status"] == "failed" and "fell over" in failed["error"] and failed["run_id"] == rid


def test_a_forced_rerun_interrupted_during_fine_tuning_keeps_the_complete_record(complete_run, profile_file,
                                                                                 tmp_path, monkeypatch):
    results = copy_results(complete_run, tmp_path / "r")
    before = snapshot(results)
    (rid,) = records(results)
    real_train = runner_mod.train

    def interrupted(model, data, recipe, seed, **kwargs):
        if kwargs.get("description") == "finetune":
            raise KeyboardInterrupt  # what Ctrl-C raises in the training loop
        return real_train(model, data, recipe, seed, **kwargs)

    monkeypatch.setattr(runner_mod, "train", interrupted)
    res = invoke(*run_args(results, "--layer-ratios", profile_file, "--force"))
    assert res.exit_code != 0
    after = snapshot(results)
    assert after[f"{rid}.json"] == before[f"{rid}.json"] and after[f"models/{rid}.pt"] == before[f"models/{rid}.pt"]
    (interrupted_attempt,) = attempts(results)
    assert interrupted_attempt["status"] == "failed" and "KeyboardInterrupt" in interrupted_attempt["error"]


def test_ctrl_c_on_a_forced_rerun_keeps_the_complete_record(complete_run, profile_file, tmp_path):
    """A real SIGINT to `prunebench run --force`, delivered while the run waits for its baseline
    (whose lock this test holds, so the moment is certain)."""
    import torch

    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig
    from prunebench.datasets import cache_dir
    from prunebench.pipeline.baseline import baseline_key
    from prunebench.pipeline.data import load_data
    from prunebench.storage.locks import FileLock

    results = copy_results(complete_run, tmp_path / "r")
    before = snapshot(results)
    (rid,) = records(results)
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY))
    splits, _ = load_data(cfg, torch.device("cpu"))
    lock = FileLock(cache_dir() / "baselines" / f"{baseline_key(cfg, splits)}.pt.lock")
    assert lock.acquire(blocking=False)
    try:
        args = [a for a in run_args(results, "--layer-ratios", profile_file, "--force") if a != "-q"]
        proc = subprocess.Popen([sys.executable, "-m", "prunebench", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for line in proc.stderr:  # stage rules go to stderr
                if "baseline" in line:
                    time.sleep(1.0)  # now waiting for the lock
                    proc.send_signal(signal.SIGINT)
                    break
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        lock.release()
    assert proc.returncode != 0
    after = snapshot(results)
    assert after[f"{rid}.json"] == before[f"{rid}.json"] and after[f"models/{rid}.pt"] == before[f"models/{rid}.pt"]
    (interrupted,) = attempts(results)
    assert interrupted["status"] == "failed" and "KeyboardInterrupt" in interrupted["error"]
    assert not [p for p in results.rglob("*") if p.name.endswith((".tmp", ".lock"))]


def test_a_completed_forced_rerun_replaces_the_record_and_keeps_the_old_one_in_the_history(
        complete_run, profile_file, tmp_path):
    results = copy_results(complete_run, tmp_path / "r")
    (rid,) = records(results)
    old = records(results)[rid]
    res = invoke(*run_args(results, "--layer-ratios", profile_file, "--force"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    new = records(results)[rid]
    assert new["status"] == "complete" and new["started"] >= old["started"]
    (superseded,) = attempts(results)
    assert superseded["status"] == "complete" and superseded["final"] == old["final"]
    assert superseded["model_file"] is None and "superseded" in superseded["archived"]


def test_a_failed_record_is_kept_in_the_history_when_a_later_attempt_replaces_it(tmp_path, monkeypatch):
    results = tmp_path / "r"
    def flaky(*args, **kwargs):
        raise OSError("flaky network filesystem")

    monkeypatch.setattr(runner_mod, "compress", flaky)
    assert isinstance(invoke(*run_args(results)).exception, OSError)
    (failed,) = records(results).values()
    assert failed["status"] == "failed"
    monkeypatch.undo()
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    (complete,) = records(results).values()
    assert complete["status"] == "complete"
    assert [a["status"] for a in attempts(results)] == ["failed"]


@pytest.mark.parametrize("garbage", [b'{"schema": "prunebench-result/1", "status": "compl', b"[1, 2]", b"\xff\xfe"])
def test_a_file_in_the_records_place_that_is_no_record_is_kept_before_a_run_replaces_it(tmp_path, garbage):
    results = tmp_path / "r"
    assert invoke(*run_args(results)).exit_code == 0
    (path,) = results.glob("*.json")
    path.write_bytes(garbage)  # truncated, or no record at all
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    (complete,) = records(results).values()
    assert complete["status"] == "complete"
    assert (results / "attempts" / path.stem / "unusable-1.json").read_bytes() == garbage


@pytest.mark.parametrize("where", ["a file", "inside a file"])
def test_an_unusable_results_dir_is_reported_before_any_work(tmp_path, monkeypatch, where):
    (tmp_path / "taken").write_text("not a directory\n")
    results = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "results"
    monkeypatch.setattr(runner_mod, "load_data", lambda *a, **k: pytest.fail("work started"))
    res = invoke(*run_args(results))
    assert isinstance(res.exception, ConfigError), repr(res.exception)
    assert "results directory" in str(res.exception) and str(tmp_path / "taken") in str(res.exception)


def test_a_record_that_cannot_be_written_is_saved_elsewhere_and_the_error_says_where(tmp_path, monkeypatch):
    """A full disk at the very end: the finished run is not lost."""
    results = tmp_path / "r"
    real_fsync = os.fsync

    def full_disk(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(results)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    res = invoke(*run_args(results))
    msg = str(res.exception)
    assert res.exit_code != 0 and "No space left on device" in msg and "saved to" in msg, repr(res.exception)
    saved = Path(msg.split("saved to ")[1].split(" instead")[0])
    (rec,) = records(saved).values()
    assert rec["status"] == "complete" and (saved / rec["model_file"]).is_file()
    assert not list(results.glob("*.json")) and not list(results.rglob("*.tmp"))


def test_a_killed_run_leaves_no_partial_record(tmp_path, monkeypatch):
    """Whatever stops a run, a record file is complete JSON or absent (atomic writes)."""
    from prunebench.results.records import write_atomic

    path = tmp_path / "r.json"
    write_atomic(path, {"status": "complete"})

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, {"status": "failed"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "complete"}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _run_id_of_run_args() -> str:
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig, run_id

    return run_id(RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY)).identity())


@pytest.mark.parametrize("fails", ["in the results directory", "everywhere"])
def test_a_full_disk_while_the_model_is_written_keeps_the_record(tmp_path, monkeypatch, fails):
    """torch reports a full disk as a RuntimeError, not an OSError: the record is still written."""
    import torch

    from prunebench.results import store

    results = tmp_path / "r"
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if name.startswith(str(results)) or (fails == "everywhere" and "unsaved" in name):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(store.torch, "save", full_disk)
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    rid = _run_id_of_run_args()
    rec = records(results)[rid]
    assert rec["status"] == "complete" and rec["model_file"] is None
    assert "RuntimeError" in rec["model_not_saved"]["error"]
    assert not (results / "models" / f"{rid}.pt").exists() and not list(results.rglob("*.tmp"))
    (warning,) = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert str(results / f"{rid}.json") in warning and "Traceback" not in res.output
    if fails == "everywhere":
        assert rec["model_not_saved"]["saved_to"] is None and "could not be saved anywhere" in warning
    else:
        saved = Path(rec["model_not_saved"]["saved_to"])
        assert saved.is_file() and str(saved) in warning
        assert json.loads(torch.load(saved, weights_only=False)["meta"])["run_id"] == rid


def test_a_file_size_limit_keeps_the_record(tmp_path, monkeypatch):
    """A real RLIMIT_FSIZE (SIGXFSZ ignored, so writes past it fail with EFBIG) while the run
    stores its result: the small record is written, the model is not, and the record says so."""
    import resource

    from prunebench.results import store

    results = tmp_path / "r"
    real_commit = store.commit
    limit = 64 * 1024  # a record is a few kB; the model of resnet20 is several times this

    def limited(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return real_commit(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    monkeypatch.setattr(store, "commit", limited)
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    rid = _run_id_of_run_args()
    rec = records(results)[rid]
    assert rec["status"] == "complete" and rec["model_file"] is None and rec["final"]["top1"] >= 0
    assert rec["model_not_saved"]["saved_to"] is None  # the limit holds in the cache too
    assert not (results / "models" / f"{rid}.pt").exists() and not list(results.rglob("*.tmp"))
    assert "model could not be written" in res.output


def test_sigterm_records_the_attempt(tmp_path):
    """A real SIGTERM to `prunebench run` (as a scheduler sends at the end of a job), delivered
    while the run waits for its baseline: the attempt is recorded as failed, as Ctrl-C is."""
    import torch

    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig
    from prunebench.datasets import cache_dir
    from prunebench.pipeline.baseline import baseline_key
    from prunebench.pipeline.data import load_data
    from prunebench.storage.locks import FileLock

    results = tmp_path / "r"
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY))
    splits, _ = load_data(cfg, torch.device("cpu"))
    lock = FileLock(cache_dir() / "baselines" / f"{baseline_key(cfg, splits)}.pt.lock")
    assert lock.acquire(blocking=False)
    try:
        args = [a for a in run_args(results) if a != "-q"]
        proc = subprocess.Popen([sys.executable, "-m", "prunebench", *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            for line in proc.stderr:
                if "baseline" in line:
                    time.sleep(1.0)  # now waiting for the lock
                    proc.send_signal(signal.SIGTERM)
                    break
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    finally:
        lock.release()
    assert proc.returncode != 0
    (rec,) = records(results).values()
    assert rec["status"] == "failed" and "SIGTERM" in rec["error"], rec.get("error")
    assert not [p for p in results.rglob("*") if p.name.endswith((".tmp", ".lock"))]


def test_a_forced_rerun_whose_model_cannot_be_written_keeps_the_previous_model_with_its_record(
        complete_run, profile_file, tmp_path, monkeypatch):
    """models/<run_id>.pt never holds a model that the record beside it does not name."""
    import torch

    from prunebench.results import store

    results = copy_results(complete_run, tmp_path / "r")
    (rid,) = records(results)
    old_model = (results / "models" / f"{rid}.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if str(getattr(f, "name", f)).startswith(str(results)):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(store.torch, "save", full_disk)
    res = invoke(*run_args(results, "--layer-ratios", profile_file, "--force"))
    assert res.exit_code == 0, res.output + repr(res.exception)
    new = records(results)[rid]
    assert new["status"] == "complete" and new["model_file"] is None
    assert not (results / "models" / f"{rid}.pt").exists()
    (superseded,) = attempts(results)
    assert superseded["status"] == "complete" and "superseded" in superseded["archived"]
    (archived_model,) = (results / "attempts" / rid).glob("*.pt")
    assert superseded["model_file"] == archived_model.name and archived_model.read_bytes() == old_model
