"""MACs reduction against measured speed-up, per criterion and runtime, from latency records.

    python benchmarks/latency_table.py leaderboard/records [--arch resnet56] [--budget cpu-pretrained]

Reads the accuracy records of a folder and the latency records in its ``latency/`` folder
(written by ``prunebench latency``) and prints one markdown row per (criterion with its options,
scope, round_to, target): the mean MACs reduction of the row's runs and, per runtime and
setting, the mean over the row's distinct architectures of the median speed-up (with the range
of the 95 % intervals when it is one architecture), and how many of the row's runs were measured.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from prunebench.results.survey import survey

SETTINGS = (("torch", 1, 1), ("onnxruntime", 1, 1), ("openvino", 1, 1), ("torch", 64, None), ("onnxruntime", 64, None),
            ("openvino", 64, None))


def row_label(rec: dict) -> str:
    params = ",".join(f"{k}={v}" for k, v in sorted((rec.get("criterion_params") or {}).items())
                      if rec["criterion"] in ("coring", "qsfm", "hbgts") and k in ("distance", "compensation", "lazy"))
    label = rec["criterion"] + (f"({params})" if params else "")
    if rec.get("scope") and rec["scope"] != "inner":
        label += f" · scope {rec['scope']}"
    if rec.get("layer_ratios"):
        label += " · profile"
    if rec.get("round_to"):
        label += f" · round_to {rec['round_to']}"
    return label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--budget", default="cpu-pretrained")
    args = ap.parse_args()
    records, _problems = survey(args.records)
    runs = [r for _path, r in records if r.get("status") == "complete" and r["arch"] == args.arch
            and r["budget"]["name"] == args.budget and r["criterion"] != "dense"]
    latency: dict[str, list[dict]] = defaultdict(list)
    for path in sorted((args.records / "latency").glob("*.json")):
        rec = json.loads(path.read_text())
        for rid in rec["run_ids"]:
            latency[rid].append(rec)
    rows: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for r in runs:
        rows[(row_label(r), r["target"]["ratio"])].append(r)
    head = ["target", "criterion", "MACs ↓"] + [f"{rt} b{b}" + (f" t{t}" if t else " all threads")
                                                 for rt, b, t in SETTINGS] + ["runs measured"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (label, target), group in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for runtime, batch, threads in SETTINGS:
            found = {}
            for r in group:
                for rec in latency.get(r["run_id"], []):
                    if rec["runtime"] == runtime and rec["batch"] == batch and (threads is None or rec["threads"] == threads):
                        found[rec["digest"]] = rec
            if not found:
                cells.append("—")
                continue
            medians = [rec["speedup"]["median"] for rec in found.values()]
            mean = sum(medians) / len(medians)
            unreliable = "†" if any(rec.get("unreliable") for rec in found.values()) else ""
            if len(found) == 1:
                lo, hi = next(iter(found.values()))["speedup"]["ci95"]
                cells.append(f"{mean:.2f}× ({lo:.2f}–{hi:.2f}){unreliable}")
            else:
                cells.append(f"{mean:.2f}× ({len(found)} archs, {min(medians):.2f}–{max(medians):.2f}){unreliable}")
        measured = sum(any(rec["runtime"] == "onnxruntime" for rec in latency.get(r["run_id"], [])) for r in group)
        macs = sum(r["achieved"]["macs_reduction"] for r in group) / len(group)
        print(f"| {target:.0%} | {label} | {macs:.1%} | " + " | ".join(cells) + f" | {measured}/{len(group)} |")


if __name__ == "__main__":
    main()
