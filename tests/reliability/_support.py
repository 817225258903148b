"""Helpers of the reliability promises: a tiny budget on digits, the CLI in process and as a
subprocess, and the shape of a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from prunebench.cli import app

# the smoke budget, smaller still: a run takes a few seconds (small batches also keep the
# latency measurement, at batch 1 and at the batch size, short)
TINY = {"baseline_epochs": 1, "finetune_epochs": 1, "train_subset": 128, "test_subset": 64, "batch_size": 16,
        "latency_repeats": 1, "calibration_size": 32}
TINY_SETS = [f"--set={k}={v}" for k, v in TINY.items()]
# a run of l1 on resnet20 with a layer-ratio profile (stored in its record)
PROFILE = {"layer1.0.conv1": 0.2, "layer2.0.conv1": 0.5, "layer3.0.conv1": 1.0}


def invoke(*args):
    """``prunebench ARGS`` in this process; exceptions are kept in ``result.exception``."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)


def prunebench(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``prunebench ARGS`` as a user runs it: a new process, its real stderr and exit code."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "prunebench", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def run_args(results: Path, *extra) -> list:
    return ["run", "-c", "l1", "-a", "resnet20", "-d", "digits", "--budget", "smoke", *TINY_SETS,
            "--results-dir", results, "-q", *extra]


def records(results: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in Path(results).glob("*.json")}


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The error a user sees: exit code 2, one ``error:`` line, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def copy_results(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest
