"""Fixtures of the reliability promises: one complete run that tests copy before they touch it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support import PROFILE, invoke, run_args


@pytest.fixture(scope="session")
def profile_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "ratios.json"
    path.write_text(json.dumps(PROFILE))
    return path


@pytest.fixture(scope="session")
def complete_run(tmp_path_factory, profile_file) -> Path:
    """A results directory holding one complete run (l1 with a layer-ratio profile). Copy it
    with :func:`copy_results` before changing anything."""
    results = tmp_path_factory.mktemp("complete") / "results"
    res = invoke(*run_args(results, "--layer-ratios", profile_file))
    assert res.exit_code == 0, res.output + repr(res.exception)
    return results
