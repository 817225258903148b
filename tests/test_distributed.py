"""One run over several processes (gloo on a CPU): one record, failures recorded, resumable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunebench.errors import ConfigError, RunFailedError
from tests._folders import make_folder

# a tv_ architecture at 32 px on a generated ImageNet-layout folder, a tiny budget
TINY = [
    "-c", "l1", "-a", "tv_resnet18", "-d", "imagenet", "-b", "smoke", "--device", "cpu", "--precision", "fp32",
    "--workers", "1", "--set", "baseline_epochs=1", "--set", "finetune_epochs=2", "--set", "train_subset=64",
    "--set", "test_subset=40", "--set", "calibration_size=16", "--set", "latency_repeats=1",
    "--set", "batch_size=16", "--dataset-option", "train_size=32", "--dataset-option", "eval_resize=36",
    "--dataset-option", "eval_crop=32", "-q",
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_folder(root / "imagenet", classes=4, train=20, test=10, size=(40, 48))
    return root


def _env(data_root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PRUNEBENCH_DATA=str(data_root), OMP_NUM_THREADS="1")
    return env


def _run(data_root: Path, results: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunebench", "run", *TINY, "--results-dir", str(results), *extra],
                          env=_env(data_root), capture_output=True, text=True, timeout=600)


def _records(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def _keys(record: dict) -> dict[str, object]:
    """The record's structure: its keys, and the keys of its nested blocks."""
    return {k: sorted(v) if isinstance(v, dict) else type(v).__name__ for k, v in record.items()}


@pytest.mark.slow
def test_a_two_process_run_writes_one_record_shaped_like_a_one_process_run(data_root, tmp_path):
    two = _run(data_root, tmp_path / "two", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    one = _run(data_root, tmp_path / "one")  # reuses the baseline the two processes trained and cached
    assert one.returncode == 0, one.stderr[-3000:]
    [r2], [r1] = _records(tmp_path / "two"), _records(tmp_path / "one")
    assert not (tmp_path / "two" / "attempts").exists()  # exactly one record was written
    assert r1["status"] == r2["status"] == "complete" and r1["run_id"] == r2["run_id"]
    assert r2["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_process": 8,
                                 "batchnorm": "per process"}
    s1, s2 = _keys(r1), _keys(r2)
    # baseline_info differs as trained and cached baselines do: the two processes trained it
    assert r2["baseline_info"]["source"] == "trained" and r1["baseline_info"]["source"] == "cache"
    assert r2["baseline_info"]["key"] == r1["baseline_info"]["key"]
    del s1["baseline_info"], s2["baseline_info"]
    assert set(s2) - set(s1) == {"distributed"} and {k: s2[k] for k in s1} == s1
    # the ledger counts global epochs: the same budget, the same steps as one process
    assert r2["ledger"] == r1["ledger"] and r2["data"] == r1["data"]
    # the same weights give the same accuracies, evaluated in shards and summed
    assert r2["baseline"] == r1["baseline"]
    # every rank ran the criterion on the same calibration images: the same plan as one process
    assert r2["widths"] == r1["widths"] and r2["macs"] == r1["macs"] and r2["oneshot"] == r1["oneshot"]
    assert (tmp_path / "two" / "models" / f"{r2['run_id']}.pt").is_file()


def _ranks(launcher: int) -> dict[int, int]:
    """{rank: pid} of the launcher's worker processes. A worker learns its rank after it starts,
    so the rank is read from the environment of its DataLoader worker, forked from it later."""
    parent, env, cmd = {}, {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env[int(d.name)] = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
            cmd[int(d.name)] = (d / "cmdline").read_text()
        except (OSError, ValueError, IndexError):
            continue
    ranks = {}
    for pid, ppid in parent.items():
        if ppid == launcher and "spawn_main" in cmd.get(pid, ""):
            seen = {env[c]["RANK"] for c, pc in parent.items() if pc == pid and "RANK" in env.get(c, {})}
            if len(seen) == 1:
                ranks[int(seen.pop())] = pid
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killing_a_worker_fails_the_run_with_a_record_and_a_rerun_completes(data_root, tmp_path, victim):
    """Rank 1 killed: rank 0 records the failure, the launcher names rank 1 in it. Rank 0
    killed: the launcher writes the record itself."""
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "prunebench", "run", *[a for a in TINY if a != "-q"], "--results-dir",
           str(results), "--nproc", "2", "--set", "finetune_epochs=30"]
    proc = subprocess.Popen(cmd, env=_env(data_root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed, lines, ranks = None, [], {}
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if killed is None and "fine-tune" in line:
                time.sleep(1.0)  # well inside the fine-tune
                ranks = _ranks(proc.pid)
                assert set(ranks) == {0, 1}, ranks
                os.kill(ranks[victim], signal.SIGKILL)
                killed = ranks[victim]
        assert proc.wait(timeout=300) == 2, "".join(lines)[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert killed is not None, "".join(lines)[-3000:]
    [record] = _records(results)
    assert record["status"] == "failed", record.get("error")
    assert f"rank {victim} (pid {killed}) was killed by SIGKILL" in record["error"]
    assert record["distributed"]["world_size"] == 2
    assert "error: run" in "".join(lines) and f"failed: rank {victim}" in "".join(lines)
    time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())  # no process of the run is left
    if victim == 0:
        return
    # the run resumes like any other: the same command runs it again, to completion
    again = subprocess.run(cmd, env=_env(data_root), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    [done] = _records(results)
    assert done["status"] == "complete" and done["run_id"] == record["run_id"]
    [archived] = (results / "attempts" / record["run_id"]).glob("*.json")
    assert json.loads(archived.read_text())["status"] == "failed"


def test_several_processes_need_a_streamed_dataset_and_an_even_batch(tmp_path):
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig
    from prunebench.pipeline.launch import launch

    cfg = RunConfig(criterion="l1", arch="resnet20", dataset="digits", budget=get_budget("smoke"),
                    results_dir=tmp_path)
    with pytest.raises(ConfigError, match="digits.*streamed dataset.*imagenet"):
        launch(cfg, 2, quiet=True)
    cfg = RunConfig(criterion="l1", arch="tv_resnet18", dataset="imagenet", budget=get_budget("smoke"),
                    results_dir=tmp_path, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        launch(cfg, 3, quiet=True)
    assert not list(tmp_path.glob("*.json"))


def test_the_launcher_records_a_failure_rank_0_could_not_write(tmp_path):
    """Rank 0 killed outright writes nothing: the launcher writes the failed record, naming the rank."""
    from prunebench.config.budgets import get_budget
    from prunebench.config.run import RunConfig, run_id
    from prunebench.pipeline.data import resolve_device
    from prunebench.pipeline.launch import _record_failure
    from prunebench.pipeline.record import base_record
    from prunebench.results.records import read_record

    cfg = RunConfig(criterion="l1", arch="tv_resnet18", dataset="imagenet", budget=get_budget("smoke"),
                    results_dir=tmp_path)
    identity = cfg.identity()
    rid = run_id(identity)
    path = _record_failure(cfg, rid, identity, tmp_path, time.time() - 1, 0, "rank 0 (pid 7) was killed by SIGKILL",
                           2, base_record_fn=base_record, device=resolve_device("cpu"),
                           rep=__import__("prunebench.progress", fromlist=["Reporter"]).Reporter(quiet=True))
    record = read_record(path)
    assert isinstance(record, dict), record  # a valid failed record
    assert record["status"] == "failed" and "rank 0 (pid 7) was killed by SIGKILL" in record["error"]
    assert record["distributed"]["world_size"] == 2
    assert issubclass(RunFailedError, Exception)


@pytest.mark.slow
@pytest.mark.data
def test_two_processes_on_cifar10_jpeg_streamed_as_an_image_folder(real_data_root, tmp_path):
    """The real 32x32 JPEGs, decompressed once into the cache as a plain tar and streamed (cifar10-folder)."""
    args = TINY[: TINY.index("--dataset-option")] + TINY[-1:]
    args[args.index("imagenet")] = "cifar10-folder"  # its input size is 32 by default
    result = subprocess.run([sys.executable, "-m", "prunebench", "run", *args, "--results-dir", str(tmp_path),
                             "--nproc", "2"], env=_env(real_data_root), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = _records(tmp_path)
    assert record["status"] == "complete" and record["dataset"] == "cifar10-folder"
    assert record["data"] == {"train_images": 64, "test_images": 40, "input_shape": [3, 32, 32], "num_classes": 10}
    assert record["distributed"]["world_size"] == 2 and record["ledger"]["total_epochs"] == 2
