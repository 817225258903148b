"""Resume after a kill while a record is being written.

Records are written to a temporary file and renamed; a process killed in between leaves the
temporary file and no record, and a writer without an atomic rename leaves a truncated
record. Either way the next `prunebench sweep` or `prunebench run` must run that run again,
remove the temporary files, and end with exactly one complete record.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunebench.cli import app
from prunebench.results.records import validate

runner = CliRunner()

# a tiny smoke budget: a run takes about a second
TINY = {"baseline_epochs": 1, "train_subset": 256, "test_subset": 128, "latency_repeats": 2, "calibration_size": 64}
BUDGET = "{ name = \"smoke\", " + ", ".join(f"{k} = {v}" for k, v in TINY.items()) + " }"
CONFIG = f"""criteria = ["l1"]
architectures = ["resnet20"]
dataset = "digits"
targets = [0.5]
seeds = [0]
controls = []
budget = {BUDGET}
"""
RUN = ["run", "-c", "l1", "-a", "resnet20", "--dataset", "digits", "--budget", "smoke", "--target-macs", "0.5",
       *(f"--set={k}={v}" for k, v in TINY.items()), "-q"]

# Runs the command line in a process that kills itself (SIGKILL: no clean-up code runs) at the
# moment a record in the results folder would be renamed into place: the record's temporary
# file is on disk, the record is not.
KILLED_AT_THE_RECORD_RENAME = """
import os, signal, sys
from pathlib import Path

results = Path(sys.argv[1]).resolve()
rename = os.replace

def replace(src, dst, *args, **kwargs):
    dst = Path(dst).resolve()
    if dst.parent == results and dst.suffix == ".json":
        os.kill(os.getpid(), signal.SIGKILL)
    return rename(src, dst, *args, **kwargs)

os.replace = replace
sys.argv = ["prunebench", *sys.argv[2:]]
from prunebench.cli import main
main()
"""


@pytest.fixture(scope="module", autouse=True)
def own_cache(tmp_path_factory):
    """A baseline cache of this module's own, so that other modules still train theirs."""
    old = os.environ["PRUNEBENCH_CACHE"]
    os.environ["PRUNEBENCH_CACHE"] = str(tmp_path_factory.mktemp("resume-cache"))
    yield
    os.environ["PRUNEBENCH_CACHE"] = old


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=True)


def top_records(results: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in results.glob("*.json")}


def temp_files(results: Path) -> list[str]:
    return sorted(str(p.relative_to(results)) for p in results.rglob("*.tmp"))


def assert_one_complete_record(results: Path) -> dict:
    (raw,) = top_records(results).values()
    record = json.loads(raw)
    assert record["status"] == "complete" and validate(record) == []
    assert (results / record["model_file"]).is_file()
    assert temp_files(results) == []
    return record


def killed_at_the_record_rename(results: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # PRUNEBENCH_CACHE: this module's
    proc = subprocess.run([sys.executable, "-c", KILLED_AT_THE_RECORD_RENAME, str(results), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert top_records(results) == {}
    left = temp_files(results)
    assert any(name.endswith(".tmp") and ".json." in name for name in left), left  # the record's temp file
    (tmp,) = [p for p in results.glob(".*.json.*.tmp")]
    assert json.loads(tmp.read_text())["status"] == "complete"  # written in full, never renamed


def truncate_the_record(results: Path) -> str:
    """Cut the complete record in half and leave a half-written temp file beside it."""
    ((name, raw),) = top_records(results).items()
    (results / name).write_bytes(raw[: len(raw) // 2])
    (results / f".{name}.k1ll3d.tmp").write_bytes(raw[: len(raw) // 3])
    (results / "models" / f".{Path(name).stem}.pt.k1ll3d.tmp").write_bytes(b"PK\x03\x04")
    return name


def test_a_kill_during_the_record_write_is_resumed_by_the_sweep(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG)
    results = tmp_path / "results"
    killed_at_the_record_rename(results, "sweep", config, "--results-dir", results)

    res = invoke("sweep", config, "--dry-run", "--results-dir", results)
    assert "0 complete, 1 pending" in res.stdout, res.output
    res = invoke("sweep", config, "--results-dir", results)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "1 complete, 0 failed, 0 skipped (1 runs)" in res.stdout
    assert_one_complete_record(results)


def test_a_truncated_record_is_run_again_by_the_sweep(tmp_path):
    config = tmp_path / "sweep.toml"
    config.write_text(CONFIG)
    results = tmp_path / "results"
    assert invoke("sweep", config, "--results-dir", results).exit_code == 0
    name = truncate_the_record(results)

    res = invoke("sweep", config, "--dry-run", "--results-dir", results)
    assert "0 complete, 1 pending" in res.stdout, res.output
    res = invoke("sweep", config, "--results-dir", results)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert "1 complete, 0 failed, 0 skipped (1 runs)" in res.stdout
    assert assert_one_complete_record(results)["run_id"] == Path(name).stem


def test_a_kill_during_the_record_write_is_resumed_by_run(tmp_path):
    results = tmp_path / "results"
    killed_at_the_record_rename(results, *RUN, "--results-dir", results)
    res = invoke(*RUN, "--results-dir", results)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert_one_complete_record(results)


def test_run_removes_the_temporary_files_of_a_killed_run(tmp_path):
    results = tmp_path / "results"
    assert invoke(*RUN, "--results-dir", results).exit_code == 0
    truncate_the_record(results)
    assert invoke(*RUN, "--results-dir", results).exit_code == 0
    assert temp_files(results) == []


def test_a_truncated_record_is_run_again_by_run(tmp_path):
    results = tmp_path / "results"
    assert invoke(*RUN, "--results-dir", results).exit_code == 0
    name = truncate_the_record(results)
    res = invoke(*RUN, "--results-dir", results)
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert assert_one_complete_record(results)["run_id"] == Path(name).stem


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_a_complete_record_is_not_run_again(tmp_path, command):
    """The counterpart: a complete record (and only that) makes the run count as done."""
    results = tmp_path / "results"
    if command == "sweep":
        (tmp_path / "sweep.toml").write_text(CONFIG)
        args = ["sweep", tmp_path / "sweep.toml"]
    else:
        args = RUN
    assert invoke(*args, "--results-dir", results).exit_code == 0
    before = top_records(results)
    assert invoke(*args, "--results-dir", results).exit_code == 0
    assert top_records(results) == before  # not even its timestamps changed
