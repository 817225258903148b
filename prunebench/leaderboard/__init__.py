"""Leaderboard pages built from result records (PROTOCOL.md, Leaderboard).

``build(records_dir)`` returns ``{file name: content}``:

* ``README.md``: an index of the pages (and the record files that could not be used);
* ``<dataset>-<arch>.md``: the page's provenance (hardware, budgets, baselines, dates,
  versions), then per (budget, target) a ranked table — final top-1 mean ± std over seeds,
  Δ vs baseline, one-shot and one-shot +BN top-1, whether the row beats ``random`` (Welch's
  t-test), MACs ↓, params ↓, measured speed-up, criterion time, seeds — and, in a separate
  table, the numbers the papers published for that architecture;
* ``<dataset>-<arch>.csv`` and ``results.csv``: the rows as CSV;
* ``<dataset>-<arch>.<budget>.png``: final top-1 vs MACs reduction when there are ≥ 2 targets.

Output is deterministic (sorted rows, fixed precision, dates taken from the records, PNGs
without metadata), so ``check_stale`` can compare committed files byte for byte.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from prunebench.leaderboard.latency import read_latency
from prunebench.leaderboard.output import obsolete, read_records, write
from prunebench.leaderboard.output import stale as _stale
from prunebench.leaderboard.pages import CSV_COLUMNS, MARKER, _labels, index, page, page_stem, slug
from prunebench.leaderboard.plots import latency_png, tradeoff_png
from prunebench.leaderboard.rows import budget_label, frame

__all__ = ["MARKER", "budget_label", "build", "check_stale", "obsolete", "problems", "write"]


def _csv(rows: list[dict]) -> str:
    """The rows as CSV, text as it is in the records. A field holding a line break is quoted
    (Python's writer quotes ``\\n`` but not a lone ``\\r`` under a ``\\n`` line terminator, so such
    rows are written with ``\\r\\n`` as the terminator and their last terminator set back)."""
    if not rows:
        return ""
    df = pd.DataFrame(rows, columns=CSV_COLUMNS)
    if not any(isinstance(v, str) and "\r" in v for row in rows for v in row.values()):
        return df.to_csv(index=False, lineterminator="\n")
    lines = [df.iloc[:0].to_csv(index=False, lineterminator="\n")]
    for i in range(len(df)):
        lines.append(df.iloc[i:i + 1].to_csv(index=False, header=False, lineterminator="\r\n")[:-2] + "\n")
    return "".join(lines)


def build(records_dir: Path) -> dict[str, str | bytes]:
    """Return {file name: content} for the leaderboard directory."""
    records, bad = read_records(records_dir)
    latency = read_latency(records_dir)
    df = frame(records)
    files: dict[str, str | bytes] = {"README.md": index(df, bad)}
    all_rows: list[dict] = []
    if not df.empty:
        for (dataset, arch), p in sorted(df.groupby(["dataset", "arch"]), key=lambda kv: kv[0]):
            stem = page_stem(dataset, arch)
            plots = {}
            for budget in sorted(p["budget"].unique()):
                b = p[p["budget"] == budget]
                labels = _labels(b[b["name"] != "dense"])[0]
                png = tradeoff_png(dataset, arch, budget, b, labels)
                if png is not None:
                    name = f"{stem}.{slug(budget)}.png"
                    files[name] = png
                    plots.setdefault(budget, []).append(name)
                png = latency_png(dataset, arch, budget, b, labels, latency)
                if png is not None:
                    name = f"{stem}.{slug(budget)}.latency.png"
                    files[name] = png
                    plots.setdefault(budget, []).append(name)
            md, rows = page(dataset, arch, p, stem, plots, latency)
            files[f"{stem}.md"] = md
            files[f"{stem}.csv"] = _csv(rows)
            all_rows += rows
    files["results.csv"] = _csv(all_rows)
    return files


def problems(records_dir: Path) -> list[tuple[str, str]]:
    """``(file name, reason)`` for every record file the leaderboard skips."""
    return read_records(records_dir)[1]


def check_stale(records_dir: Path, out_dir: Path) -> list[str]:
    """Names of generated files that differ from (or are missing in, or are left over in) ``out_dir``."""
    return _stale(build(records_dir), out_dir)
