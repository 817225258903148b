"""Promise: a read-only shared cache that holds a run's baseline serves it.

A cached baseline is written whole and renamed into place, so one that is there is
complete: when its lock file cannot be created (a cache shared read-only between users, or
on a read-only mount), the baseline is read without a lock. A read-only cache that does not
hold the baseline is a one-line error saying to point ``PRUNEBENCH_CACHE`` at a writable
folder.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from _support import invoke, records, run_args

from prunebench.errors import ConfigError


@pytest.fixture
def read_only_cache(complete_run, tmp_path, monkeypatch) -> Path:
    """A cache holding the baselines of the session (the complete run trained one), whose
    ``baselines/`` folder is read-only (mode 0555). Tests run as root, whom modes do not stop,
    so for root ``os.open`` is made to refuse what the kernel refuses a user: creating a file
    in a folder without write permission, or opening a file without write permission to write."""
    from prunebench.datasets import cache_dir

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir() / "baselines", cache / "baselines",
                    ignore=shutil.ignore_patterns("*.lock", "*.tmp"))
    assert list((cache / "baselines").glob("*.pt"))
    monkeypatch.setenv("PRUNEBENCH_CACHE", str(cache))
    (cache / "baselines").chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def as_a_user(path, flags, mode=0o777, *, dir_fd=None):
            p = Path(path)
            writes = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writes and not p.exists() and not p.parent.stat().st_mode & 0o200:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            if writes and p.exists() and not p.stat().st_mode & 0o200:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(path, flags, mode, dir_fd=dir_fd)

        monkeypatch.setattr(os, "open", as_a_user)
    yield cache
    (cache / "baselines").chmod(0o755)


def test_a_read_only_cache_holding_the_baseline_serves_it(read_only_cache, tmp_path):
    before = sorted(p.name for p in (read_only_cache / "baselines").iterdir())
    results = tmp_path / "r"
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    (rec,) = records(results).values()
    assert rec["status"] == "complete" and rec["baseline_info"]["source"] == "cache"
    assert sorted(p.name for p in (read_only_cache / "baselines").iterdir()) == before


def test_a_read_only_cache_without_the_baseline_is_a_one_line_error(read_only_cache, tmp_path):
    res = invoke(*run_args(tmp_path / "r", "--seed", "7"))  # another seed: another baseline, not cached
    assert isinstance(res.exception, ConfigError), repr(res.exception)
    msg = str(res.exception)
    assert "PRUNEBENCH_CACHE" in msg and str(read_only_cache / "baselines") in msg and "\n" not in msg
