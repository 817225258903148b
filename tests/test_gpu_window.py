"""benchmarks/gpu_window.sh, the GPU leaderboard's one-call script, end to end at smoke size on
a CPU (digits, a tiny budget, two seeds, synthetic throughput data, no wheels to install), and
its deadline handling."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def window_module():
    spec = importlib.util.spec_from_file_location("gpu_window", ROOT / "benchmarks" / "gpu_window.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIG = """
criteria = ["l1"]
architectures = ["resnet20"]
dataset = "digits"
targets = [0.5]
seeds = [0, 1]
controls = ["random"]
runs_per_gpu = 1
budget = { name = "smoke", baseline_epochs = 1, train_subset = 256, test_subset = 128, latency_repeats = 2, calibration_size = 64 }
"""


def test_the_window_script_end_to_end_at_smoke_size(tmp_path):
    config = tmp_path / "window.toml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OFFLINE_DIR": str(tmp_path / "no-bundle"),
           "PRUNEBENCH_DATA": str(tmp_path / "no-data"),  # the throughput table falls back to synthetic images
           "WINDOW_CONFIG": str(config), "WINDOW_SECONDS": "500", "WINDOW_RESULTS": str(tmp_path / "results"),
           "THROUGHPUT_ARGS": "--arch resnet20 --images 64 --batch-size 32 --repeats 1 --variants engine,plain",
           "THROUGHPUT_SECONDS": "200", "OMP_NUM_THREADS": "1",
           "LATENCY_RUNTIME": "torch"}  # the GPU latency phase, rehearsed with PyTorch on the CPU
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_window.sh"), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.txt", "leaderboard.tar.gz", "records.tar.gz", "summary.md", "sweep.toml",
                     "throughput.md", "window.log"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) and (out / f).is_file() for f in files)  # at most 8 plain files

    table = (out / "throughput.md").read_text()
    assert "| engine (default) |" in table and "| plain DataLoader loop (0 workers) |" in table
    assert "synthetic uint8" in table and "compute-bound limit" in table
    with tarfile.open(out / "records.tar.gz") as tar:
        everything = [(m.name, json.load(tar.extractfile(m))) for m in tar.getmembers() if m.isfile()]
    recs = [r for name, r in everything if not name.startswith("records/latency/")]
    timings = [r for name, r in everything if name.startswith("records/latency/")]
    assert timings and {(t["runtime"], t["batch"]) for t in timings} == {("torch", 1), ("torch", 64)}
    assert sorted({rid for t in timings for rid in t["run_ids"]}) == sorted(r["run_id"] for r in recs)
    assert sorted((r["criterion"], r["seed"]) for r in recs) == [("l1", 0), ("l1", 1), ("random", 0), ("random", 1)]
    assert all(r["status"] == "complete" for r in recs)
    with tarfile.open(out / "leaderboard.tar.gz") as tar:
        assert "leaderboard/digits-resnet20.md" in tar.getnames()
    summary = (out / "summary.md").read_text()
    assert "| seed 0 | seed 1 |" in summary and "| l1 | macs -50% |" in summary

    # seed-major, with the results so far printed after each seed
    text = (out / "window.log").read_text()
    first_done, second_start = text.index("seed 0: done"), text.index("seed 1: starting")
    assert first_done < text.index("| seed 0 |", first_done) < second_start
    assert "| seed 0 | seed 1 |" in text[second_start:]
    assert "finished: 4 complete records" in text


def test_a_stopped_command_takes_its_whole_process_group_with_it(tmp_path):
    window = window_module()
    pidfile = tmp_path / "pid"
    t0 = time.time()
    status = window.run_until(["bash", "-c", f"sleep 60 & echo $! > {pidfile}; wait"], time.time() + 1.0,
                              log=lambda line: None)
    assert status is None and time.time() - t0 < 15
    grandchild = int(pidfile.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's own child outlived the deadline")
    assert window.run_until([sys.executable, "-c", "print('ok')"], time.time() + 60, stdout=tmp_path / "o") == 0
    assert (tmp_path / "o").read_text() == "ok\n"


@pytest.mark.parametrize("left, last, start", [
    (400, None, True), (30, None, False), (200, 300, True), (100, 300, False), (50, 60, True),
])
def test_a_seed_starts_only_when_enough_of_it_can_finish(left, last, start):
    assert window_module().should_start(left, last) is start


def test_unknown_sweep_keys_are_dropped_with_a_warning(tmp_path, capsys):
    config = tmp_path / "s.toml"
    config.write_text(CONFIG + 'not_yet_a_key = "x"\n')
    sweep = window_module().load_config(config, runs_per_gpu=3, results=tmp_path / "r")
    assert sweep.runs_per_gpu == 3 and sweep.seeds == (0, 1)
    assert "does not know the sweep key 'not_yet_a_key'" in capsys.readouterr().out


def test_the_gpu_config_is_valid_where_pretrained_baselines_exist(tmp_path):
    from prunebench.sweep.spec import TOP_KEYS, load_sweep

    config = ROOT / "benchmarks" / "gpu_window.toml"
    if "baseline" not in TOP_KEYS:
        sweep = window_module().load_config(config, runs_per_gpu=None, results=tmp_path)
    else:
        sweep = load_sweep(config, results_dir=tmp_path)
    assert sweep.architectures == ("resnet56",) and sweep.dataset == "cifar10-jpeg" and sweep.budget.name == "fast"
    assert sweep.runs_per_gpu == 11 and [t.ratio for t in sweep.targets] == [0.5, 0.7]
    assert len(sweep.runs()) == 22 * len(sweep.seeds)
    assert {c.name for c in sweep.criteria} | {"random"} >= {"l1", "coring", "qsfm", "hbgs", "hbgts", "ht2", "trp",
                                                              "random"}


def test_every_package_is_in_the_wheel():
    """The window installs the project from its files (not editable): a sub-package missing from
    pyproject's package list would be missing there."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    dirs = {name: Path(path) for name, path in config["package-dir"].items()}
    found = set()
    for name, path in dirs.items():
        for init in (ROOT / path).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / path)
            if "plugin_example" not in rel.parts and "build" not in rel.parts:
                found.add(".".join((name, *rel.parts)))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
