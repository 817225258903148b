"""A third-party package with its own entry point is found and run through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parent / "plugin_example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(EXAMPLE)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]))
    return env


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "prunebench", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_third_party_criterion_is_listed(installed):
    proc = cli(installed, "list", "criteria")
    assert proc.returncode == 0, proc.stderr
    assert "l2norm" in proc.stdout and "prunebench-example" in proc.stdout


def test_third_party_criterion_runs_end_to_end(installed, tmp_path):
    proc = cli(installed, "run", "--criterion", "l2norm", "--param", "power=1", "--arch", "resnet20",
               "--budget", "smoke", "--target-macs", "0.4", "--results-dir", str(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    rec = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert rec["status"] == "complete" and rec["criterion"] == "l2norm"
    assert rec["criterion_params"] == {"power": 1.0}
    assert rec["plugins"]["criterion:l2norm"] == "prunebench-example 0.1.0"


def test_plugin_own_test_passes(installed):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(EXAMPLE / "test_l2norm.py")], capture_output=True, text=True, env=installed,
                          timeout=300, cwd=EXAMPLE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
