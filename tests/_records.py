"""Fabricated result records for leaderboard tests (no training involved)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from prunebench.config.budgets import ADAPTATION_FIELDS, BUDGETS

# the budget as a run from a trained baseline records it (no adaptation fields)
SMOKE = {k: v for k, v in BUDGETS["smoke"].resolved().items() if k not in ADAPTATION_FIELDS}


# every fabricated record is another run (a copy of one is made by writing the same dict twice)
_IDS = itertools.count()


def rec(criterion="l1", seed=0, final=80.0, ratio=0.5, **over):
    r = {
        "schema": "prunebench-result/1", "run_id": f"{criterion}-{seed}-{final}-{next(_IDS)}", "status": "complete",
        "criterion": criterion, "criterion_kind": "score", "criterion_params": {}, "arch": "resnet20",
        "dataset": "digits", "budget": SMOKE, "target": {"metric": "macs", "ratio": ratio, "tolerance": 0.01},
        "seed": seed, "allocation": "uniform", "started": "2026-01-01T00:00:00+00:00",
        "finished": "2026-01-02T00:00:00+00:00", "versions": {"torch": "2", "prunebench": "0.1.0"},
        "hardware": {"device": "cpu"}, "baseline": {"top1": 90.0}, "oneshot": {"top1": 50.0},
        "final": {"top1": final}, "macs": {"before": 100, "after": 100 * (1 - ratio)},
        "params": {"before": 10, "after": 10 * (1 - ratio)},
        "achieved": {"macs_reduction": ratio, "params_reduction": ratio},
        "latency": {"speedup_batch1": 1.5, "after": {"device": "test-cpu"}}, "criterion_seconds": 0.1,
        "ledger": {}, "widths": {},
    }
    r.update(over)
    return r


def put(folder: Path, name: str, record: dict) -> None:
    """Write ``record`` as a file in ``folder``, as it is: a non-finite number stays a bare
    ``NaN``/``Infinity`` token, as in files that prunebench did not write (prunebench writes null)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def table_rows(page: str) -> list[list[str]]:
    """The rows of the page's tables (header lines and the folded pairwise matrices left out)."""
    import re

    page = re.sub(r"<details>.*?</details>", "", page, flags=re.S)
    return [[c.strip() for c in line.split("|")[1:-1]] for line in page.splitlines() if line.startswith("| ")][1:]
