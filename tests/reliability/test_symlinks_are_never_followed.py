"""Promise: prunebench never follows a symbolic link out of its results or cache directory
when it writes or copies.

A link in the place of a run's lock file is refused with a one-line error naming it (the
file it points to is never opened, so it is not overwritten with a PID); a link in the place
of a run's record is never read through: the link itself is moved aside to
``attempts/<run_id>/`` and the run writes its record as a plain file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _support import TINY, invoke, records, run_args

from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.errors import ConfigError

PRECIOUS = b"a file of the user's that prunebench must never touch\n"


def the_run_id() -> str:
    return run_id(RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY)).identity())


def baseline_lock() -> Path:
    import torch

    from prunebench.datasets import cache_dir
    from prunebench.pipeline.baseline import baseline_key
    from prunebench.pipeline.data import load_data

    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY))
    splits, _ = load_data(cfg, torch.device("cpu"))
    return cache_dir() / "baselines" / f"{baseline_key(cfg, splits)}.pt.lock"


@pytest.mark.parametrize("which", ["the run's lock", "the baseline's lock"])
def test_a_lock_path_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path, which):
    results = tmp_path / "r"
    outside = tmp_path / "outside.txt"
    outside.write_bytes(PRECIOUS)
    lock = results / f"{the_run_id()}.lock" if which == "the run's lock" else baseline_lock()
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.symlink_to(outside)
    try:
        res = invoke(*run_args(results))
    finally:
        if which == "the baseline's lock":
            lock.unlink(missing_ok=True)  # the session's cache is shared by other tests
    assert isinstance(res.exception, ConfigError), repr(res.exception)
    assert str(lock) in str(res.exception) and "symbolic link" in str(res.exception)
    assert "\n" not in str(res.exception)
    assert outside.read_bytes() == PRECIOUS


@pytest.mark.parametrize("pointing_at", ["a file of the user's", "a complete record elsewhere"])
def test_a_record_path_that_is_a_symlink_is_never_read_through(complete_run, tmp_path, pointing_at):
    results = tmp_path / "r"
    results.mkdir()
    rid = the_run_id()
    outside = tmp_path / "outside.json"
    if pointing_at == "a file of the user's":
        outside.write_bytes(PRECIOUS)
    else:  # a complete record of another configuration, renamed: not this run's result
        (other,) = complete_run.glob("*.json")
        outside.write_bytes(other.read_bytes())
    content = outside.read_bytes()
    (results / f"{rid}.json").symlink_to(outside)
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert outside.read_bytes() == content  # neither changed ...
    record = results / f"{rid}.json"
    assert not record.is_symlink() and json.loads(record.read_text())["status"] == "complete"
    moved = results / "attempts" / rid / "unusable-1.symlink"
    assert moved.is_symlink() and Path(os.readlink(moved)) == outside  # ... nor copied: the link moved aside
    assert not [p for p in results.rglob("*") if p.is_file() and not p.is_symlink() and p.read_bytes() == content]
    assert list(records(results)) == [rid]
