"""Shared test set-up: a per-session cache (baselines, decoded datasets) and small threads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
# A run's numbers depend on its thread count (docs/performance.md): tests that compare two runs
# need the same count in both, so the session fixes it instead of letting each command measure
# (tests of the measurement itself unset it).
os.environ.setdefault("PRUNEBENCH_THREADS", str(torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep baselines and dataset caches of the test run out of the user's home folder."""
    cache = tmp_path_factory.mktemp("prunebench-cache")
    old = os.environ.get("PRUNEBENCH_CACHE")
    os.environ["PRUNEBENCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("PRUNEBENCH_CACHE", None)
    else:
        os.environ["PRUNEBENCH_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny tensor ops: extra intra-op threads only add waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def real_data_root() -> Path:
    """The folder holding cifar10-jpeg.tar.gz, from $PRUNEBENCH_DATA; skips when absent."""
    root = os.environ.get("PRUNEBENCH_DATA")
    if not root or not (Path(root) / "cifar10-jpeg.tar.gz").exists():
        pytest.skip("set PRUNEBENCH_DATA to a folder holding cifar10-jpeg.tar.gz")
    return Path(root)


_deselected: list[pytest.Item] = []


def pytest_deselected(items: list[pytest.Item]) -> None:
    _deselected.extend(items)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Say how many tests were left out and how to run them (-ra lists skips with their reasons)."""
    marked = [item for item in _deselected if item.get_closest_marker("slow") or item.get_closest_marker("data")]
    if marked:
        terminalreporter.write_line(
            f"{len(marked)} tests marked slow or data not selected (-m {config.option.markexpr!r}); "
            "`nox -s slow` runs them"
        )


# tests/plugin_example is a separate package with its own test; test_plugin_package.py
# installs it and runs that test in a subprocess.
collect_ignore = ["plugin_example"]
