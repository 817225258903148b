"""Promise: a bad file in a records folder never crashes or hangs a command.

`prunebench leaderboard`, `records check` and `records migrate` skip such a file and name it
on one line; `run` and `sweep` treat a bad file at a run's record path as no record. Bad
means: JSON nested too deeply or holding numbers too long to convert, text that is not valid
Unicode, a field of the wrong type, or something that is no regular file (a FIFO, directly or
through a symbolic link), which is never opened.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from _records import put, rec, table_rows
from _support import invoke

from prunebench.results.records import is_complete

# hostile file contents, each of which crashed every command that read it
HOSTILE = {
    "deeply-nested": b"[" * 100_000 + b"]" * 100_000,
    "a-5000-digit-number": b'{"schema": "prunebench-result/1", "seed": ' + b"1" * 5000 + b"}",
    "a-4000-digit-ratio": json.dumps(rec(target={"metric": "macs", "ratio": int("1" * 4000), "tolerance": 0.01}))
    .encode(),
    "a-lone-surrogate": json.dumps(rec(criterion_params={"note": "\ud800"})).encode(),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_record_file_is_skipped_and_named_by_leaderboard_check_and_migrate(tmp_path, kind):
    records = tmp_path / "records"
    put(records, "good", rec(final=80.0))
    (records / "bad.json").write_bytes(HOSTILE[kind])
    res = invoke("leaderboard", "--records", records, "--out", tmp_path / "lb")
    assert res.exit_code == 0, (res.output, repr(res.exception))
    (line,) = [x for x in res.output.splitlines() if "bad.json" in x]
    assert line.startswith(f"skipped {records / 'bad.json'}: ")
    assert [r[2] for r in table_rows((tmp_path / "lb" / "digits-resnet20.md").read_text())] == ["80.00"]
    res = invoke("records", "check", records)
    assert res.exit_code == 1, (res.output, repr(res.exception))
    assert f"bad record: {records / 'bad.json'}: " in res.output
    res = invoke("records", "migrate", records)
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert "skip     bad.json: " in res.output and (records / "bad.json").read_bytes() == HOSTILE[kind]


def _sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text('criteria = ["l1"]\narchitectures = ["resnet20"]\ndataset = "digits"\ntargets = [0.5]\n'
                    'seeds = [0]\nbudget = { name = "smoke" }\n')
    return path


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_file_at_a_runs_record_path_is_no_record_to_run_and_sweep(tmp_path, kind):
    results, config = tmp_path / "results", _sweep_file(tmp_path)
    res = invoke("sweep", config, "--dry-run", "--results-dir", results)
    assert res.exit_code == 0, res.output
    (rid,) = [line.split()[1] for line in res.output.splitlines() if line.startswith("pending ")]
    results.mkdir()
    (results / f"{rid}.json").write_bytes(HOSTILE[kind])
    assert is_complete(results / f"{rid}.json") is False  # what `run` and `sweep` ask before a run
    res = invoke("sweep", config, "--dry-run", "--results-dir", results)
    assert res.exit_code == 0, (res.output, repr(res.exception))
    assert f"pending   {rid}" in res.output


def _within(seconds: float, fn):
    """``fn()``'s result, or a failure if it has not returned after ``seconds`` (it blocked)."""
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("out", fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    return box["out"]


def _release(fifo: Path) -> None:
    """Unblock a reader stuck opening ``fifo`` (so that a failing test leaves no thread behind)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def test_a_fifo_named_json_is_skipped_and_named_never_opened(tmp_path):
    records, fifo = tmp_path / "records", tmp_path / "pipe"
    put(records, "good", rec(final=80.0))
    os.mkfifo(records / "fifo.json")
    os.mkfifo(fifo)
    (records / "link.json").symlink_to(fifo)  # a symbolic link to a FIFO is no record either
    try:
        res = _within(60, lambda: invoke("leaderboard", "--records", records, "--out", tmp_path / "lb"))
        assert res.exit_code == 0, (res.output, repr(res.exception))
        for name in ("fifo.json", "link.json"):
            assert f"skipped {records / name}: not a regular file (a FIFO); not read" in res.output
        assert [r[2] for r in table_rows((tmp_path / "lb" / "digits-resnet20.md").read_text())] == ["80.00"]
        res = _within(60, lambda: invoke("records", "check", records))
        assert res.exit_code == 1 and f"bad record: {records / 'fifo.json'}: not a regular file" in res.output
        res = _within(60, lambda: invoke("records", "migrate", records))
        assert res.exit_code == 0 and "skip     fifo.json: not a regular file (a FIFO)" in res.output
        assert "skip     link.json: a symbolic link" in res.output
    finally:
        _release(records / "fifo.json")
        _release(fifo)


@pytest.mark.parametrize("field,value", [
    ("target", {"metric": "macs", "ratio": "0.5", "tolerance": 0.01}),
    ("target", {"metric": 5, "ratio": 0.5, "tolerance": 0.01}),
    ("seed", "0"),
    ("budget", {"name": "smoke", "baseline_epochs": "3"}),
    ("budget", {"name": 5}),
    ("final", {"top1": "80"}),
    ("baseline", {"top1": [90]}),
    ("achieved", {"macs_reduction": "0.5", "params_reduction": 0.5}),
    ("latency", {"speedup_batch1": "1.5"}),
    ("latency", {"after": ["cpu"]}),
    ("hardware", {"device": 3}),
    ("finished", 20260102),
    ("versions", ["torch"]),
    ("criterion_params", ["a"]),
    ("identity", ["x"]),
    ("baseline_info", "x"),
    ("baseline_info", {"source": "pretrained", "zoo": {"name": "z"}, "adaptation": {"epochs": "3"}}),
    ("shots", "2"),
    ("sharing", {"runs_per_device": "2"}),
    ("criterion", 5),
    ("macs", {"before": "100", "after": 50}),
    ("status", 1),
])
def test_a_field_of_the_wrong_type_is_skipped_and_named_never_a_crash(tmp_path, field, value):
    records = tmp_path / "records"
    put(records, "good", rec(final=80.0))
    put(records, "bad", {**rec(seed=1, final=99.0), field: value})
    res = invoke("leaderboard", "--records", records, "--out", tmp_path / "lb")
    assert res.exit_code == 0, (res.output, repr(res.exception))
    (line,) = [x for x in res.output.splitlines() if "bad.json" in x]
    assert line.startswith(f"skipped {records / 'bad.json'}: malformed field: {field}"), line
    assert [r[2] for r in table_rows((tmp_path / "lb" / "digits-resnet20.md").read_text())] == ["80.00"]
    res = invoke("records", "check", records)
    assert res.exit_code == 1 and f"bad record: {records / 'bad.json'}: malformed field: {field}" in res.output


def test_a_fifo_at_a_runs_record_path_is_moved_aside_never_opened(tmp_path):
    """`run` looks at the file in its record's place before it writes: a FIFO there would block
    a read forever, so it is never opened; the node itself is moved to the run's attempts."""
    from _support import records as read_all
    from _support import run_args

    from prunebench.results.store import attempts_dir

    results = tmp_path / "r"
    res = invoke(*run_args(results))
    assert res.exit_code == 0, res.output
    (rid,) = read_all(results)
    (results / f"{rid}.json").unlink()
    os.mkfifo(results / f"{rid}.json")
    try:
        res = _within(120, lambda: invoke(*run_args(results)))
        assert res.exit_code == 0, (res.output, repr(res.exception))
        assert read_all(results)[rid]["status"] == "complete"
        assert (attempts_dir(results, rid) / "unusable-1.special").exists()
    finally:
        _release(results / f"{rid}.json")
