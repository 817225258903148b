"""Accuracy of bf16 against fp32 training: the same runs in both precisions, per seed.

Reads the complete records in a results folder (made by the two sweeps in
``benchmarks/parity-*.toml``), pairs runs that differ only in precision, and prints for each
configuration and stage (baseline, one-shot, final top-1): the mean over seeds in each
precision, their difference, the spread between seeds (sample standard deviation, pooled over
both precisions) and the difference seed by seed.

    python benchmarks/parity_report.py results-parity
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

STAGES = ("baseline", "oneshot", "final")


def load(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("status") == "complete":
            out.append(rec)
    return out


def key(rec: dict) -> tuple:
    t = rec["target"]
    return rec["dataset"], rec["arch"], rec["budget"]["name"], rec["criterion"], f"{t['metric']}{round(t['ratio'] * 100)}"


def report(records: list[dict]) -> str:
    groups: dict[tuple, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for rec in records:
        groups[key(rec)][rec.get("precision", "fp32")][rec["seed"]] = rec
    lines = ["| dataset | arch | budget | criterion | target | stage | fp32 mean | bf16 mean | bf16 − fp32 | "
             "seed spread (std) | per-seed bf16 − fp32 |", "|" + "---|" * 11]
    for k, by_precision in sorted(groups.items()):
        fp32, bf16 = by_precision.get("fp32", {}), by_precision.get("bf16", {})
        seeds = sorted(set(fp32) & set(bf16))
        if not seeds:
            continue
        for stage in STAGES:
            a = [fp32[s][stage]["top1"] for s in seeds if fp32[s].get(stage)]
            b = [bf16[s][stage]["top1"] for s in seeds if bf16[s].get(stage)]
            if len(a) != len(seeds) or len(b) != len(seeds):
                continue
            spread = _pooled_std(a, b)
            per_seed = ", ".join(f"s{s}: {y - x:+.2f}" for s, x, y in zip(seeds, a, b, strict=True))
            lines.append(f"| {' | '.join(k)} | {stage} | {statistics.mean(a):.2f} | {statistics.mean(b):.2f} | "
                         f"{statistics.mean(b) - statistics.mean(a):+.2f} | {spread:.2f} | {per_seed} |")
    return "\n".join(lines)


def _pooled_std(a: list[float], b: list[float]) -> float:
    """Pooled sample standard deviation over seeds of the two precisions."""
    if len(a) < 2:
        return float("nan")
    return ((statistics.variance(a) + statistics.variance(b)) / 2) ** 0.5


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path)
    print(report(load(p.parse_args().results)))


if __name__ == "__main__":
    main()
