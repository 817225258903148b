"""Surveying a results directory: every record read safely, implausible values flagged, copies
of one run counted once, and the best file of each run kept."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prunebench.errors import RecordError
from prunebench.results.parsing import UnusableFile, parse_json, read_regular_file, show
from prunebench.results.records import SCHEMA, RecordProblem, read_record

#: how far a stored reduction may be from the one its before/after counts give (it is rounded to 6 decimals)
_ROUNDING = 1e-5


def implausible(rec: Mapping[str, Any], *, non_finite_final: bool = False) -> list[str]:
    """Values of a complete record (:func:`read_record`) that cannot be true: a top-1 that is not
    a finite percentage in [0, 100], MACs or params that are not positive or grow, reductions
    that disagree with the counts they come from, a target ratio outside (0, 1), a negative
    seed, time or speed-up. Empty when the record may be published. With
    ``non_finite_final`` a non-finite final top-1 passes (the leaderboard shows such a seed as
    ``NaN`` in its row instead of dropping it)."""
    if rec.get("status") != "complete":
        return []
    out = []

    def finite(x: Any) -> bool:
        return math.isfinite(float(x))

    for stage in ("baseline", "oneshot", "oneshot_bn", "final"):
        block = rec.get(stage)
        if not isinstance(block, dict):
            continue
        for key in ("top1", "top5"):
            if key not in block or not isinstance(block[key], int | float) or isinstance(block[key], bool):
                continue
            v = float(block[key])
            if stage == "final" and key == "top1" and non_finite_final and not math.isfinite(v):
                continue
            if not (math.isfinite(v) and 0.0 <= v <= 100.0):
                out.append(f"{stage}.{key} is {show(block[key])}, not a percentage in [0, 100]")
    for what in ("macs", "params"):
        before, after = rec[what]["before"], rec[what]["after"]
        if not (finite(before) and finite(after) and before > 0 and after > 0):
            out.append(f"{what} before/after are {show(before)}/{show(after)}, not positive counts")
            continue
        if after > before:
            out.append(f"{what} after compression ({show(after)}) exceed those before ({show(before)})")
        stored = rec["achieved"][f"{what}_reduction"]
        if not finite(stored) or abs(float(stored) - (1 - after / before)) > _ROUNDING:
            out.append(f"achieved.{what}_reduction {show(stored)} disagrees with {what} {show(before)} -> "
                       f"{show(after)} ({1 - after / before:.6f})")
    ratio = rec["target"]["ratio"]
    if not (finite(ratio) and 0.0 < ratio < 1.0):
        out.append(f"target.ratio is {show(ratio)}, not a fraction in (0, 1)")
    if not 0 <= rec["seed"] < 2**64:
        out.append(f"seed is {show(rec['seed'])}, not an integer in [0, 2**64)")
    seconds = rec["criterion_seconds"]
    if not (finite(seconds) and seconds >= 0):
        out.append(f"criterion_seconds is {show(seconds)}, not a time >= 0")
    speedup = (rec.get("latency") or {}).get("speedup_batch1")
    if speedup is not None and not (finite(speedup) and speedup > 0):
        out.append(f"latency.speedup_batch1 is {show(speedup)}, not a positive ratio")
    for key, low, high in (("shot_epochs", 0.0, math.inf), ("max_layer_ratio", 0.0, 1.0)):
        if key in rec and not (finite(rec[key]) and low <= rec[key] <= high):
            out.append(f"{key} is {show(rec[key])}, outside [{low:g}, {high:g}]")
    if "shots" in rec and rec["shots"] < 1:
        out.append(f"shots is {show(rec['shots'])}, expected at least 1")
    return out


def _rank(path: Path, rec: Mapping[str, Any]) -> tuple:
    """Which of several files holding one run stands for it: a complete record first, then the
    one at the run's own path ``<run_id>.json``, then the one finished last."""
    return (rec.get("status") == "complete", path.name == f"{rec['run_id']}.json", str(rec.get("finished", "")),
            path.name)


def survey(directory: Path, *, non_finite_final: bool = False
           ) -> tuple[list[tuple[Path, dict[str, Any]]], list[RecordProblem]]:
    """``(records, problems)`` of the ``*.json`` files of ``directory``, in name order: each
    usable record once per run, and a :class:`RecordProblem` for every other file: one that is
    no usable record, a complete record whose values are :func:`implausible`, or a second file
    holding a run already counted (a copy; the record at the run's own path, or the complete
    one, stands for the run). Never raises or blocks for a bad file."""
    records: list[tuple[Path, dict[str, Any]]] = []
    problems: list[RecordProblem] = []
    for path in sorted(Path(directory).glob("*.json")):
        item = read_record(path)
        if isinstance(item, RecordProblem):
            problems.append(item)
            continue
        wrong = implausible(item, non_finite_final=non_finite_final)
        if wrong:
            problems.append(RecordProblem(path, "implausible: " + "; ".join(wrong), "implausible"))
            continue
        records.append((path, item))
    by_run: dict[str, list[tuple[Path, dict[str, Any]]]] = {}
    for path, rec in records:
        by_run.setdefault(rec["run_id"], []).append((path, rec))
    keep = set()
    for run, group in by_run.items():
        best = max(group, key=lambda pr: _rank(*pr))
        keep.add(best[0])
        for path, _rec in group:
            if path != best[0]:
                problems.append(RecordProblem(
                    path, f"the same run as {best[0].name} (run id {run}): a second copy, not another seed; "
                    "not counted", "duplicate"))
    problems.sort(key=lambda p: p.path.name)
    return [(p, r) for p, r in records if p in keep], problems


def scan_records(directory: Path) -> Iterator[dict[str, Any] | RecordProblem]:
    """Every ``*.json`` file of ``directory`` in name order: the record, or the
    :class:`RecordProblem` that makes it unusable. Never raises for a bad file, so one bad
    file cannot block a page built from the others."""
    for p in sorted(Path(directory).glob("*.json")):
        yield read_record(p)


def load_records(directory: Path) -> Iterator[dict[str, Any]]:
    """The records of ``directory``; JSON files of another schema are skipped. A file that
    cannot be parsed raises :class:`RecordError` naming it (see :func:`scan_records` to skip
    and report such files instead)."""
    for p in sorted(Path(directory).glob("*.json")):
        try:
            rec = parse_json(read_regular_file(p))
        except UnusableFile as exc:
            raise RecordError(f"{p}: not a readable record ({exc})") from None
        if isinstance(rec, dict) and rec.get("schema") == SCHEMA:
            yield rec
