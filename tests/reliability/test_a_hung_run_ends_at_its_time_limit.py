"""Promise: a run that hangs ends at its time limit, as a failed run with a record.

``prunebench run --timeout SECONDS`` (and ``timeout = SECONDS`` in a sweep file, or
``prunebench sweep --timeout``) stops a run that goes on longer, records it as ``failed``
with an error naming the limit, and reports it in one line. The limit is part of neither the
run id nor the record's identity: it decides whether there is a result, not what it is.
"""

from __future__ import annotations

import threading
import time

import pytest
from _support import TINY, invoke, records, run_args

import prunebench.pipeline.runner as runner_mod
from prunebench.config.budgets import get_budget
from prunebench.config.run import RunConfig, run_id
from prunebench.errors import ConfigError, RunTimedOut
from prunebench.pipeline.runner import execute
from prunebench.progress import Reporter
from prunebench.sweep.spec import parse_sweep


def test_a_hung_criterion_ends_at_the_time_limit_as_a_failed_run(tmp_path, monkeypatch):
    results = tmp_path / "r"

    def hangs(*args, **kwargs):
        time.sleep(600)  # a criterion that never returns

    monkeypatch.setattr(runner_mod, "compress", hangs)
    t0 = time.monotonic()
    res = invoke(*run_args(results, "--timeout", "3"))
    assert time.monotonic() - t0 < 60
    assert isinstance(res.exception, RunTimedOut), repr(res.exception)
    assert "time limit of 3 s" in str(res.exception) and "\n" not in str(res.exception)
    (rec,) = records(results).values()
    assert rec["status"] == "failed" and "RunTimedOut" in rec["error"] and "time limit" in rec["error"]
    assert "timeout" not in rec["identity"]


def test_the_time_limit_also_holds_in_a_run_started_from_another_thread(tmp_path, monkeypatch):
    results = tmp_path / "r"

    def spins(*args, **kwargs):
        while True:  # busy, in Python
            time.sleep(0.05)

    monkeypatch.setattr(runner_mod, "compress", spins)
    cfg = RunConfig(criterion="l1", arch="resnet20", budget=get_budget("smoke", TINY), results_dir=results,
                    timeout=3)
    outcome: dict = {}

    def work() -> None:
        try:
            execute(cfg, Reporter(quiet=True))
        except BaseException as exc:  # noqa: BLE001 - what the thread ended with is the result
            outcome["exception"] = exc

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and isinstance(outcome.get("exception"), RunTimedOut), outcome
    (rec,) = records(results).values()
    assert rec["status"] == "failed" and "time limit" in rec["error"]


def test_the_time_limit_is_not_part_of_the_run_id_and_sweeps_pass_it_to_every_run(tmp_path):
    budget = get_budget("smoke", TINY)
    plain = RunConfig(criterion="l1", arch="resnet20", budget=budget)
    limited = RunConfig(criterion="l1", arch="resnet20", budget=budget, timeout=30)
    assert run_id(plain.identity()) == run_id(limited.identity())
    doc = {"criteria": ["l1", "random"], "architectures": ["resnet20"], "budget": "smoke", "timeout": 30}
    runs = parse_sweep(doc, base=tmp_path).runs()
    assert [cfg.timeout for cfg in runs] == [30.0, 30.0]
    without = parse_sweep({k: v for k, v in doc.items() if k != "timeout"}, base=tmp_path).runs()
    assert [run_id(c.identity()) for c in runs] == [run_id(c.identity()) for c in without]


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_time_limit_that_is_no_positive_number_is_refused_before_any_work(tmp_path, monkeypatch, value):
    monkeypatch.setattr(runner_mod, "load_data", lambda *a, **k: pytest.fail("work started"))
    res = invoke(*run_args(tmp_path / "r", "--timeout", value))
    assert isinstance(res.exception, ConfigError) and "--timeout" in str(res.exception), repr(res.exception)
    with pytest.raises(ConfigError, match="'timeout'"):
        parse_sweep({"criteria": ["l1"], "architectures": ["resnet20"], "timeout": float(value)}, base=tmp_path)


def test_the_time_limit_waits_for_an_import_in_progress(monkeypatch):
    """An exception raised inside an import would leave the module half-initialised for the
    rest of the process: the limit fires only once no import is in progress."""
    import time

    from prunebench.errors import RunTimedOut
    from prunebench.pipeline import limits

    start = time.monotonic()
    monkeypatch.setattr(limits, "_importing", lambda: time.monotonic() - start < 1.5)
    with pytest.raises(RunTimedOut):
        with limits.time_limit(0.2):
            while time.monotonic() - start < 10:
                time.sleep(0.01)
    assert 1.5 <= time.monotonic() - start < 4.0
