import json

import pytest

from prunebench.config.run import run_id
from prunebench.leaderboard import build, check_stale, write
from prunebench.results.records import validate, write_atomic


def fake_record(criterion, seed, final, **over):
    rec = {
        "schema": "prunebench-result/1", "run_id": f"{criterion}-{seed}", "status": "complete",
        "criterion": criterion, "criterion_kind": "score", "criterion_params": {}, "arch": "resnet20",
        "dataset": "digits", "budget": {"name": "smoke"}, "target": {"metric": "macs", "ratio": 0.5, "tolerance": 0.01},
        "seed": seed, "allocation": "uniform", "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-02T00:00:00+00:00", "versions": {"torch": "2", "prunebench": "0.1.0"},
        "hardware": {"device": "cpu"}, "baseline": {"top1": 90.0}, "oneshot": {"top1": 50.0},
        "final": {"top1": final}, "macs": {"before": 100, "after": 50}, "params": {"before": 10, "after": 5},
        "achieved": {"macs_reduction": 0.5, "params_reduction": 0.5},
        "latency": {"speedup_batch1": 1.5, "after": {"device": "test-cpu"}}, "criterion_seconds": 0.1,
        "ledger": {}, "widths": {},
    }
    rec.update(over)
    return rec


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "r.json"
    write_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}  # old content intact
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temp file left


def test_run_id_is_deterministic_and_readable():
    cfg = {"dataset": "digits", "arch": "resnet20", "criterion": "l1", "target": {"metric": "macs", "ratio": 0.5},
           "budget": {"name": "smoke"}, "seed": 2}
    assert run_id(cfg) == run_id(dict(cfg))
    assert run_id(cfg).startswith("digits-resnet20-l1-macs50-smoke-s2-")
    assert run_id(cfg) != run_id({**cfg, "seed": 3})


def test_validate_names_missing_fields():
    rec = fake_record("l1", 0, 80.0)
    assert validate(rec) == []
    del rec["final"]
    assert validate(rec) == ["final"]


def test_leaderboard_aggregates_seeds_ranks_and_is_deterministic(tmp_path):
    recs = tmp_path / "records"
    for crit, seed, final in [("l1", 0, 80.0), ("l1", 1, 82.0), ("random", 0, 70.0), ("random", 1, 71.0)]:
        write_atomic(recs / f"{crit}-{seed}.json", fake_record(crit, seed, final))
    write_atomic(recs / "failed.json", {**fake_record("l1", 9, 0.0), "status": "failed"})
    files = build(recs)
    md = files["digits-resnet20.md"]  # one page per (dataset, arch); README.md is the index
    assert "(digits-resnet20.md)" in files["README.md"]
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert "| 1      | l1" in lines[1] and "81.00 ± 1.41" in lines[1] and "-9.00" in lines[1]
    assert "| 2      | random" in lines[2]
    assert "test-cpu" in md and "smoke" in md
    assert build(recs) == files  # deterministic
    out = tmp_path / "lb"
    write(files, out)
    assert check_stale(recs, out) == []
    write_atomic(recs / "l1-2.json", fake_record("l1", 2, 90.0))
    assert check_stale(recs, out) == ["README.md", "digits-resnet20.csv", "digits-resnet20.md", "results.csv"]
