"""What a sweep cost: per config file, the run time summed over its complete records.

    python benchmarks/sweep_cost.py leaderboard/records examples/leaderboard-resnet56/*.toml

For each sweep config, the runs of its grid whose record in the folder is complete: how many,
their time summed (``finished - started`` per record: the run's wall time, which is its
CPU time when it ran on one thread), the median and range per run, the share of it spent in
the criterion (``criterion_seconds``), and the first start and last finish. A run listed by
several configs counts in each. Records made with several threads (the record's ``threads``)
are counted as they are: their wall time, not threads × wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
from datetime import datetime
from pathlib import Path

from prunebench.sweep.spec import cfg_run_id, load_sweep


def seconds(rec: dict) -> float:
    return (datetime.fromisoformat(rec["finished"]) - datetime.fromisoformat(rec["started"])).total_seconds()


def cost(records: Path, config: Path) -> dict:
    runs = load_sweep(config, results_dir=records).runs()
    done = []
    for cfg in runs:
        path = records / f"{cfg_run_id(cfg)}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            if rec.get("status") == "complete":
                done.append(rec)
    times = [seconds(r) for r in done]
    return {
        "config": config.name, "runs": len(runs), "complete": len(done), "hours": sum(times) / 3600,
        "median": statistics.median(times) if times else None, "min": min(times, default=None),
        "max": max(times, default=None),
        "criterion": sum(r.get("criterion_seconds") or 0.0 for r in done) / max(sum(times), 1e-9),
        "first": min((r["started"] for r in done), default=""), "last": max((r["finished"] for r in done), default=""),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("records", type=Path)
    ap.add_argument("configs", type=Path, nargs="+")
    args = ap.parse_args()
    rows = [cost(args.records, c) for c in args.configs]
    print("| config | complete / runs | run-hours | per run (median, range) | criterion share | first start – last finish |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per = f"{r['median']:.0f} s ({r['min']:.0f}–{r['max']:.0f})" if r["complete"] else "—"
        span = f"{r['first'][:16]} – {r['last'][:16]}" if r["complete"] else "—"
        print(f"| {r['config']} | {r['complete']} / {r['runs']} | {r['hours']:.2f} | {per} | {r['criterion']:.0%} | {span} |")
    total = sum(r["hours"] for r in rows)
    print(f"\nsummed over the configs: {total:.2f} run-hours (a run listed by two configs counts twice)")


if __name__ == "__main__":
    main()
