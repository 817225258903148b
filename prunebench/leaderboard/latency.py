"""Measured speed-ups on the pages: the latency records of ``prunebench latency``.

Latency records (:mod:`prunebench.latency.protocol`) sit in ``<records>/latency/`` beside the accuracy
records and name the runs whose models they measured. A page shows, per runtime, the
speed-up at batch 1 on one thread — the median over the interleaved repeats with its 95 %
bootstrap interval — for each row; when the seeds of a row reached different architectures
the cell is the mean of their medians and says so. A record measured on a noisy machine
(``unreliable``) is shown only with a mark. Without latency records, the run's own in-run
measurement is shown, marked as an indication.
"""

from __future__ import annotations

import json
import math
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

#: (column key, runtime, batch, threads, heading) of the speed-up columns
COLUMNS = (("torch", "torch", 1, 1, "speed-up PyTorch"), ("onnxruntime", "onnxruntime", 1, 1, "speed-up ORT"),
           ("openvino", "openvino", 1, 1, "speed-up OpenVINO"))


def read_latency(records_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """``{run_id: {column key: record}}`` for the batch-1, one-thread records of each runtime
    (other settings stay in the latency records and the CSV of ``prunebench latency``).
    Files that are not regular latency records are skipped."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    folder = Path(records_dir) / "latency"
    if not folder.is_dir():
        return out
    wanted = {(runtime, batch, threads): key for key, runtime, batch, threads, _ in COLUMNS}
    for path in sorted(folder.glob("*.json")):
        try:
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            rec = json.loads(path.read_text(encoding="utf-8"))
            key = wanted.get((rec["runtime"], int(rec["batch"]), int(rec["threads"])))
            s = rec["speedup"]
            numbers = [float(s["median"]), float(s["ci95"][0]), float(s["ci95"][1]),
                       float(rec["compressed_ms"]["median"]), float(rec["baseline_ms"]["median"])]
            if key is None or not all(math.isfinite(x) for x in numbers):
                continue
            run_ids = [str(r) for r in rec["run_ids"]]
        except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError):
            continue
        for rid in run_ids:
            out.setdefault(rid, {})[key] = rec
    return out


def columns_present(latency: Mapping[str, Mapping[str, Any]], run_ids: Iterable[str]) -> list[tuple[str, str]]:
    """(key, heading) of the runtimes measured for any of ``run_ids``."""
    ids = set(run_ids)
    keys = {k for rid, recs in latency.items() if rid in ids for k in recs}
    return [(key, heading) for key, _r, _b, _t, heading in COLUMNS if key in keys]


def cell(recs: list[dict[str, Any] | None]) -> tuple[str, dict[str, Any]]:
    """The cell of one row and runtime from its seeds' latency records (None: not measured),
    and the numbers for the CSV."""
    have = [r for r in recs if r is not None]
    if not have:
        return "—", {}
    digests = {r["digest"] for r in have}
    medians = [float(r["speedup"]["median"]) for r in have]
    unreliable = any(r.get("unreliable") for r in have)
    mark = "†" if unreliable else ""
    if len(digests) == 1:
        r = have[0]
        lo, hi = (float(x) for x in r["speedup"]["ci95"])
        text = f"{medians[0]:.2f}× ({lo:.2f}–{hi:.2f}){mark}"
        slower = hi < 1.0
        numbers = {"median": medians[0], "low": lo, "high": hi, "compressed_ms": float(r["compressed_ms"]["median"]),
                   "baseline_ms": float(r["baseline_ms"]["median"])}
    else:
        mean = sum(medians) / len(medians)
        text = f"{mean:.2f}× (mean of {len(digests)} architectures){mark}"
        slower = all(float(r["speedup"]["ci95"][1]) < 1.0 for r in have)
        numbers = {"median": mean, "low": None, "high": None,
                   "compressed_ms": sum(float(r["compressed_ms"]["median"]) for r in have) / len(have),
                   "baseline_ms": sum(float(r["baseline_ms"]["median"]) for r in have) / len(have)}
    if len(have) < len(recs):
        text += f" [{len(have)}/{len(recs)} seeds]"
    if slower:
        text += " ▼ slower"
    return text, {**numbers, "unreliable": unreliable, "slower": slower}
