"""The pages' speed-up columns come from the latency records of `prunebench latency`."""

from __future__ import annotations

import io
import json

import pandas as pd
from _records import put, rec, table_rows

from prunebench.leaderboard import build


def _latency(folder, name, run_ids, runtime, median, lo, hi, digest="d1", unreliable=False, ms=2.0):
    (folder / "latency").mkdir(exist_ok=True)
    doc = {"schema": "prunebench-latency/1", "digest": digest, "run_ids": run_ids, "runtime": runtime, "batch": 1,
           "threads": 1, "speedup": {"median": median, "ci95": [lo, hi]}, "unreliable": unreliable,
           "compressed_ms": {"median": ms}, "baseline_ms": {"median": ms * median}}
    (folder / "latency" / f"{name}.json").write_text(json.dumps(doc))


def _records(tmp_path):
    for seed in (0, 1):
        put(tmp_path, f"l1-{seed}", rec("l1", seed=seed, final=80.0 + seed, run_id=f"l1-s{seed}"))
        put(tmp_path, f"ht2-{seed}", rec("ht2", seed=seed, final=82.0 + seed, run_id=f"ht2-s{seed}",
                                         criterion_kind="transform"))
        put(tmp_path, f"r-{seed}", rec("random", seed=seed, final=70.0 + seed, run_id=f"r-s{seed}"))


def test_measured_speed_ups_replace_the_in_run_indication(tmp_path):
    _records(tmp_path)
    # l1 and random reach one architecture; ht2's seeds reach two, both slower than the baseline
    _latency(tmp_path, "a-torch", ["l1-s0", "l1-s1", "r-s0", "r-s1"], "torch", 1.45, 1.40, 1.52)
    _latency(tmp_path, "a-ort", ["l1-s0", "l1-s1", "r-s0", "r-s1"], "onnxruntime", 1.62, 1.55, 1.70, unreliable=True)
    _latency(tmp_path, "b-torch", ["ht2-s0"], "torch", 0.84, 0.80, 0.88, digest="d2")
    _latency(tmp_path, "c-torch", ["ht2-s1"], "torch", 0.86, 0.82, 0.90, digest="d3")
    # a batch-64 record and a file that is no latency record are not shown
    (tmp_path / "latency" / "junk.json").write_text("[1, 2")
    files = build(tmp_path)
    page = files["digits-resnet20.md"]
    header = next(line for line in page.splitlines() if line.startswith("| rank"))
    cols = [c.strip() for c in header.split("|")[1:-1]]
    assert "speed-up PyTorch" in cols and "speed-up ORT" in cols and "speed-up" not in cols
    rows = {r[1]: r for r in table_rows(page)}
    torch_col, ort_col = cols.index("speed-up PyTorch"), cols.index("speed-up ORT")
    assert rows["l1"][torch_col] == "1.45× (1.40–1.52)"
    assert rows["l1"][ort_col] == "1.62× (1.55–1.70)†"
    assert rows["ht2"][torch_col] == "0.85× (mean of 2 architectures) ▼ slower"
    assert rows["ht2"][ort_col] == "—"
    assert "×*" not in page and "▼ marks a row slower than the baseline" in page
    csv = pd.read_csv(io.StringIO(files["digits-resnet20.csv"]))
    l1 = csv[csv["criterion"] == "l1"].iloc[0]
    assert l1["speedup_torch_b1"] == 1.45 and l1["speedup_torch_b1_low"] == 1.40
    assert l1["speedup_onnxruntime_b1_high"] == 1.70 and bool(l1["latency_onnxruntime_unreliable"])
    assert l1["latency_torch_b1_ms"] == 2.0 and l1["baseline_latency_torch_b1_ms"] == 2.9


def test_without_latency_records_the_in_run_indication_stays(tmp_path):
    _records(tmp_path)
    page = build(tmp_path)["digits-resnet20.md"]
    header = next(line for line in page.splitlines() if line.startswith("| rank"))
    cols = [c.strip() for c in header.split("|")[1:-1]]
    assert "speed-up" in cols and "PyTorch" not in header


def test_the_accuracy_against_latency_plot(tmp_path):
    _records(tmp_path)
    for seed in (0, 1):
        for crit in ("l1", "random"):
            put(tmp_path, f"{crit}7-{seed}", rec(crit, seed=seed, final=60.0 + seed, ratio=0.7,
                                                 run_id=f"{crit}7-s{seed}"))
    _latency(tmp_path, "a-ort", ["l1-s0", "l1-s1", "r-s0", "r-s1"], "onnxruntime", 1.6, 1.5, 1.7)
    _latency(tmp_path, "b-ort", ["l17-s0", "l17-s1", "random7-s0", "random7-s1"], "onnxruntime", 2.2, 2.1, 2.3,
             digest="d9", ms=1.4)
    files = build(tmp_path)
    assert files["digits-resnet20.smoke.latency.png"].startswith(b"\x89PNG")
    assert ("![final top-1 vs measured latency (ONNX Runtime, batch 1), budget smoke]"
            "(digits-resnet20.smoke.latency.png)") in files["digits-resnet20.md"]
    # deterministic bytes: the page can be checked for staleness
    assert build(tmp_path)["digits-resnet20.smoke.latency.png"] == files["digits-resnet20.smoke.latency.png"]
