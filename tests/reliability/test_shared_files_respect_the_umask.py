"""Promise: files prunebench writes can be shared the way the user's umask says.

Records, compressed models, cached baselines and dataset caches get the mode a plain
``open()`` would give them, not the 0600 of a bare temporary file, so a results directory
or cache on shared storage works for everyone the umask admits.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch
from _support import records

from prunebench.datasets import cache_dir
from prunebench.results.records import write_atomic
from prunebench.storage.checkpoints import atomic_torch_save


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    def set_(value: int) -> None:
        os.umask(value)

    old = os.umask(0o022)
    yield set_
    os.umask(old)


def test_a_run_writes_its_record_model_and_baseline_with_the_umask_mode(complete_run):
    # complete_run was written under the default umask of the test process (022)
    (rec,) = records(complete_run).values()
    assert mode(complete_run / f"{rec['run_id']}.json") == 0o644
    assert mode(complete_run / rec["model_file"]) == 0o644
    assert mode(cache_dir() / "baselines" / f"{rec['baseline_info']['key']}.pt") == 0o644


@pytest.mark.parametrize("mask, expected", [(0o002, 0o664), (0o077, 0o600), (0o022, 0o644)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    write_atomic(tmp_path / "r.json", {"a": 1})
    atomic_torch_save({"w": torch.ones(1)}, tmp_path / "m.pt")
    assert mode(tmp_path / "r.json") == expected and mode(tmp_path / "m.pt") == expected
