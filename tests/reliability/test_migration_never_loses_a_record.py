"""Promise: `prunebench records migrate` never loses a record.

Whatever other files of a run the records folder holds (a failed attempt, a copy, a file in the
record's place that is no record), migration never replaces a complete record with one that is
not complete, and every record or file it replaces, or does not keep, is first put in the run's
history, ``attempts/<run id>/``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _support import invoke

REPO = Path(__file__).resolve().parents[2]
RUN = "cifar10-jpeg-resnet20-l1-macs50-cpu-s0-ed670af5"  # a committed, complete, current record


def committed() -> dict:
    return json.loads((REPO / "leaderboard" / "records" / f"{RUN}.json").read_text())


def failed_attempt() -> dict:
    """A failed attempt of the same run, as written before records stored their identity."""
    rec = {k: v for k, v in committed().items() if k not in ("identity", "model_file", "baseline", "oneshot",
                                                             "oneshot_bn", "final", "macs", "params", "achieved",
                                                             "latency", "criterion_seconds", "ledger", "widths")}
    return {**rec, "status": "failed", "error": "RuntimeError: out of memory", "finished": "2026-12-01T00:00:00+00:00"}


def history(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((results / "attempts" / RUN).glob("*.json"))]


@pytest.mark.parametrize("name", ["a-failed-attempt.json", "zz-failed-attempt.json"])  # before and after it
def test_a_failed_record_of_the_same_run_never_replaces_the_complete_one(tmp_path, name):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(REPO / "leaderboard" / "records" / f"{RUN}.json", results / f"{RUN}.json")
    before = (results / f"{RUN}.json").read_bytes()
    (results / name).write_text(json.dumps(failed_attempt(), indent=2))
    res = invoke("records", "migrate", results)
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert (results / f"{RUN}.json").read_bytes() == before  # the complete record, byte for byte
    assert not (results / name).exists()
    (kept,) = history(results)  # the failed attempt is in the run's history
    assert kept["status"] == "failed" and kept["error"] == "RuntimeError: out of memory"
    assert f"kept {RUN}.json" in res.output


def test_a_complete_copy_replaces_a_failed_record_which_is_kept_in_the_history(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / f"{RUN}.json").write_text(json.dumps(failed_attempt(), indent=2))
    complete = {k: v for k, v in committed().items() if k != "identity"}
    (results / "copy.json").write_text(json.dumps(complete, indent=2))
    res = invoke("records", "migrate", results)
    assert res.exit_code == 0, (res.output, repr(res.exception))
    rec = json.loads((results / f"{RUN}.json").read_text())
    assert rec["status"] == "complete" and rec["identity"] == committed()["identity"]
    assert [r["status"] for r in history(results)] == ["failed"]
    assert not (results / "copy.json").exists()


def test_a_file_in_the_records_place_that_is_no_record_is_kept_before_migration_replaces_it(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    truncated = (REPO / "leaderboard" / "records" / f"{RUN}.json").read_bytes()[:300]
    (results / f"{RUN}.json").write_bytes(truncated)
    complete = {k: v for k, v in committed().items() if k != "identity"}
    (results / "copy.json").write_text(json.dumps(complete, indent=2))
    res = invoke("records", "migrate", results)
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert json.loads((results / f"{RUN}.json").read_text())["status"] == "complete"
    assert (results / "attempts" / RUN / "unusable-1.json").read_bytes() == truncated
