"""Result records: one JSON document per run, written atomically (temp file + rename).

The run id is derived from the run's configuration, so re-running the same configuration
finds its record; a crashed run leaves no partial file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import stat
import subprocess
import sys
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prunebench.errors import RecordError
from prunebench.storage.files import replace_atomically

SCHEMA = "prunebench-result/1"

REQUIRED = (
    "schema", "run_id", "status", "criterion", "criterion_params", "arch", "dataset", "budget",
    "target", "seed", "started", "finished", "versions", "hardware",
)
COMPLETE_REQUIRED = (
    "baseline", "oneshot", "final", "macs", "params", "achieved", "latency",
    "criterion_seconds", "ledger", "widths",
)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    import tensorly
    import torch
    import torch_pruning

    import prunebench

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        # the installed distribution's version: torch_pruning.__version__ lags behind it (1.6.0 in 1.6.1)
        "torch_pruning": installed_version("torch-pruning") or getattr(torch_pruning, "__version__", None),
        "tensorly": tensorly.__version__,
        "prunebench": prunebench.__version__,
        "git_sha": git_sha(),
    }


def installed_version(distribution: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: Any) -> dict[str, Any]:
    import torch


    info = {"device": str(device), "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(), "os": sys.platform}
    if getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_atomic(path: Path, record: Mapping[str, Any]) -> Path:
    """Write ``record`` atomically, with the mode the umask gives new files."""
    data = dumps(record)
    return replace_atomically(Path(path), lambda f: f.write(data))


def dumps(record: Mapping[str, Any]) -> bytes:
    """The bytes of a record file: sorted keys, indented, final newline. Always valid JSON:
    a non-finite number (NaN, infinity) is written as null, never as a bare ``NaN``."""
    return (json.dumps(finite_json(record), indent=2, sort_keys=True, default=_jsonable, allow_nan=False)
            + "\n").encode()


def finite_json(obj: Any) -> Any:
    """``obj`` as plain JSON data, with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):
        return finite_json(obj.tolist())
    return obj


def non_finite_field(obj: Any, where: str = "") -> str | None:
    """The dotted path of the first non-finite float in ``obj`` (a record), or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "(the value)"
    if isinstance(obj, Mapping):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return None
    for key, value in items:
        found = non_finite_field(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def validate(record: Mapping[str, Any]) -> list[str]:
    """Names of required fields missing from a record (empty when valid)."""
    need = REQUIRED + (COMPLETE_REQUIRED if record.get("status") == "complete" else ("error",))
    return [k for k in need if k not in record]


@dataclass(frozen=True)
class RecordProblem:
    """A file in a records directory that is not a usable record, and why. ``kind`` is
    ``unusable`` (cannot be read as a record), ``implausible`` (a complete record whose numbers
    cannot be true) or ``duplicate`` (another file holds the same run)."""

    path: Path
    reason: str
    kind: str = "unusable"

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


#: a record is a few kilobytes; a file far larger than this is not one (and is not read whole)
MAX_RECORD_BYTES = 16 * 2**20
#: records nest a few levels deep; deeper JSON is refused before anything walks it recursively
MAX_DEPTH = 32


class UnusableFile(Exception):
    """Why a file is no usable record (the message is the reason)."""


def _kind_of_file(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def read_regular_file(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file (a symlink is followed only to one) of a
    record's size. A FIFO, socket or device is never opened: opening a FIFO blocks, and
    reading a device may never end."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UnusableFile(f"unreadable ({type(exc).__name__}: {exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UnusableFile(f"not a regular file ({_kind_of_file(st.st_mode)}); not read")
    if st.st_size > MAX_RECORD_BYTES:
        raise UnusableFile(f"too large to be a record ({st.st_size} bytes); not read")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UnusableFile(f"unreadable ({type(exc).__name__}: {exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)  # the file opened, which may have been swapped since the check above
        if not stat.S_ISREG(st.st_mode):
            raise UnusableFile(f"not a regular file ({_kind_of_file(st.st_mode)}); not read")
        chunks, size = [], 0
        while size <= MAX_RECORD_BYTES:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UnusableFile(f"unreadable ({type(exc).__name__}: {exc.strerror or exc})") from None
    finally:
        os.close(fd)
    if size > MAX_RECORD_BYTES:
        raise UnusableFile(f"too large to be a record (over {MAX_RECORD_BYTES} bytes); not read")
    return b"".join(chunks)


def parse_json(data: bytes) -> Any:
    """JSON text as Python data, or :class:`UnusableFile` saying why not: not UTF-8, not valid
    JSON, nested too deeply, numbers too long to convert, text that is not valid Unicode."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnusableFile(f"unreadable (not UTF-8 text: {exc.reason} at byte {exc.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnusableFile(f"not valid JSON, perhaps truncated ({exc})") from None
    except RecursionError:
        raise UnusableFile(f"not a record (JSON nested too deeply to read; records nest at most {MAX_DEPTH} levels)"
                        ) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise UnusableFile(f"not a record (a value that cannot be read: {str(exc).split(';')[0]})") from None
    _check_nesting(obj)
    return obj


def _check_nesting(obj: Any) -> None:
    """Refuse JSON nested deeper than :data:`MAX_DEPTH` or holding text that is not valid Unicode
    (lone surrogates from ``\\ud800`` escapes cannot be written to a page or a terminal)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise UnusableFile(f"not a record (JSON nested more than {MAX_DEPTH} levels deep)")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise UnusableFile("not a record (text that is not valid Unicode: a lone surrogate escape)") from None


# -- the types of the fields prunebench reads from a record -------------------------------------------------------

_NUM, _INT, _STR, _BOOL, _DICT, _LIST, _NULL = "a number", "an integer", "text", "true/false", "an object", \
    "a list", "null"
_ANY = "anything"

#: path -> (allowed kinds, required). A path's fields are checked only when its parent is an object.
_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "run_id": ((_STR,), True), "status": ((_STR,), True), "criterion": ((_STR,), True),
    "criterion_params": ((_DICT,), True), "arch": ((_STR,), True), "dataset": ((_STR,), True),
    "budget": ((_DICT,), True), "budget.name": ((_STR,), True),
    **{f"budget.{k}": ((_NUM, _NULL), False) for k in (
        "baseline_epochs", "finetune_epochs", "lr", "finetune_lr", "momentum", "weight_decay", "label_smoothing",
        "adapt_epochs", "adapt_lr")},
    **{f"budget.{k}": ((_INT, _NULL), False) for k in (
        "batch_size", "train_subset", "test_subset", "calibration_size", "latency_repeats")},
    "budget.schedule": ((_STR, _NULL), False), "budget.milestones": ((_LIST, _NULL), False),
    "target": ((_DICT,), True), "target.metric": ((_STR,), True), "target.ratio": ((_NUM,), True),
    "target.tolerance": ((_NUM,), False),
    "seed": ((_INT,), True), "started": ((_STR,), True), "finished": ((_STR,), True),
    "versions": ((_DICT,), True), "versions.*": ((_STR, _NULL), False),
    "hardware": ((_DICT,), True), "hardware.device": ((_STR,), False),
    "identity": ((_DICT, _NULL), False), "criterion_kind": ((_STR, _NULL), False),
    # a dense control prunes nothing: no allocation, no scope
    "allocation": ((_STR, _NULL), False), "architecture_from": ((_STR,), False), "scope": ((_STR, _NULL), False),
    "dense": ((_STR,), False),
    "shots": ((_INT,), False), "shot_epochs": ((_NUM,), False), "max_layer_ratio": ((_NUM,), False),
    "layer_ratios": ((_DICT, _NULL), False), "layer_ratios.*": ((_NUM,), False),
    "layer_ratios_name": ((_STR, _NULL), False), "precision": ((_STR, _NULL), False),
    "dataset_options": ((_DICT, _NULL), False), "model_file": ((_STR, _NULL), False),
    "migrated_from": ((_STR,), False), "error": ((_STR,), False),
    "baseline_info": ((_DICT, _NULL), False), "baseline_info.source": ((_STR, _NULL), False),
    "baseline_info.zoo": ((_DICT, _NULL), False), "baseline_info.zoo.name": ((_STR, _NULL), False),
    "baseline_info.zoo.file": ((_STR, _NULL), False), "baseline_info.adaptation": ((_DICT, _NULL), False),
    "baseline_info.adaptation.epochs": ((_NUM,), False),
    "baseline_info.adaptation.top1_before": ((_NUM, _NULL), False),
    "baseline_info.adaptation.top1_after": ((_NUM, _NULL), False),
    "sharing": ((_DICT, _NULL), False), "sharing.runs_per_device": ((_INT, _NULL), False),
}
#: the results a complete record holds
_COMPLETE_FIELDS: dict[str, tuple[tuple[str, ...], bool]] = {
    "baseline": ((_DICT,), True), "baseline.top1": ((_NUM,), True),
    "oneshot": ((_DICT, _NULL), True), "oneshot.top1": ((_NUM,), True),
    "oneshot_bn": ((_DICT, _NULL), False), "oneshot_bn.top1": ((_NUM,), True),
    "final": ((_DICT,), True), "final.top1": ((_NUM,), True),
    "macs": ((_DICT,), True), "macs.before": ((_NUM,), True), "macs.after": ((_NUM,), True),
    "params": ((_DICT,), True), "params.before": ((_NUM,), True), "params.after": ((_NUM,), True),
    "achieved": ((_DICT,), True), "achieved.macs_reduction": ((_NUM,), True),
    "achieved.params_reduction": ((_NUM,), True),
    "latency": ((_DICT, _NULL), True), "latency.speedup_batch1": ((_NUM,), False),
    "latency.shared": ((_BOOL, _NULL), False), "latency.after": ((_DICT, _NULL), False),
    "latency.after.device": ((_STR, _NULL), False),
    "criterion_seconds": ((_NUM,), True), "ledger": ((_DICT,), True), "widths": ((_DICT,), True),
    "widths.*": ((_INT,), False),
}


def _kind(value: Any) -> str:
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return _BOOL
    if isinstance(value, int):
        return _INT
    if isinstance(value, float):
        return _NUM
    if isinstance(value, str):
        return _STR
    return _LIST if isinstance(value, list) else _DICT


def _fits(value: Any, kinds: tuple[str, ...]) -> bool:
    kind = _kind(value)
    if kind == _INT and _NUM in kinds:  # an integer is a number if a float can hold it
        try:
            float(value)
        except OverflowError:
            return False
        return True
    return kind in kinds


def _show(value: Any) -> str:
    """A short, one-line rendering of a field's value for a message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"an integer of {len(str(abs(value)))} digits"
    text = repr(value) if not isinstance(value, dict | list) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def type_problems(rec: Mapping[str, Any]) -> list[str]:
    """Fields a record holds with the wrong type (each as ``path is X, expected Y``); empty
    when every field prunebench reads has the type it reads it as."""
    spec = {**_FIELDS, **(_COMPLETE_FIELDS if rec.get("status") == "complete" else {})}
    out = []
    for path, (kinds, required) in spec.items():
        *parents, key = path.split(".")
        holder: Any = rec
        for part in parents:
            holder = holder.get(part) if isinstance(holder, dict) else None
        if not isinstance(holder, dict):
            continue
        items = holder.items() if key == "*" else [(key, holder[key])] if key in holder else []
        if not items and required and key != "*":
            out.append(f"{path} is missing")
        for k, value in items:
            if not _fits(value, kinds):
                where = path if key != "*" else f"{'.'.join(parents)}.{k if k.isidentifier() else _show(k)}"
                out.append(f"{where} is {_show(value)}, expected {' or '.join(kinds)}")
    if isinstance(rec.get("run_id"), str) and not _safe_name(rec["run_id"]):
        out.append(f"run_id {_show(rec['run_id'])} is no file name (a path or control characters)")
    if isinstance(rec.get("target"), dict) and rec["target"].get("metric") not in ("macs", "params"):
        out.append(f"target.metric is {_show(rec['target'].get('metric'))}, expected 'macs' or 'params'")
    return out


def _safe_name(name: str) -> bool:
    """Can ``name`` stand for ``<name>.json`` in the records folder (no path, no control characters)?"""
    return (0 < len(name) <= 200 and not name.startswith(".") and "/" not in name and "\\" not in name
            and not any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name))


def read_record(path: Path) -> dict[str, Any] | RecordProblem:
    """The record in ``path``, or a :class:`RecordProblem` saying why it cannot be used:
    not a regular file (a FIFO, socket or device is never opened), unreadable, too large,
    truncated or invalid JSON (nested too deeply, numbers too long), not a JSON object, another
    schema, missing fields (those every record has; for a complete record also its results),
    or fields of the wrong type (:func:`type_problems`). Never raises for a bad file."""
    path = Path(path)
    try:
        rec = parse_json(read_regular_file(path))
    except UnusableFile as exc:
        return RecordProblem(path, str(exc))
    if not isinstance(rec, dict):
        return RecordProblem(path, f"not a result record (a JSON {type(rec).__name__}, not an object)")
    if rec.get("schema") != SCHEMA:
        return RecordProblem(path, f"not a result record (schema {_show(rec.get('schema'))}, expected {SCHEMA!r})")
    need = REQUIRED + (COMPLETE_REQUIRED if rec.get("status") == "complete" else ())
    missing = [k for k in need if k not in rec]
    if missing:
        status = rec.get("status", "unknown")
        status = status if isinstance(status, str) and status.isidentifier() else _show(status)
        return RecordProblem(path, f"{status} record lacks {', '.join(missing)}")
    wrong = type_problems(rec)
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        return RecordProblem(path, f"malformed field: {'; '.join(wrong[:3])}{more}")
    return rec


# -- plausibility: what a complete record may publish ---------------------------------------------------------------

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
                out.append(f"{stage}.{key} is {_show(block[key])}, not a percentage in [0, 100]")
    for what in ("macs", "params"):
        before, after = rec[what]["before"], rec[what]["after"]
        if not (finite(before) and finite(after) and before > 0 and after > 0):
            out.append(f"{what} before/after are {_show(before)}/{_show(after)}, not positive counts")
            continue
        if after > before:
            out.append(f"{what} after compression ({_show(after)}) exceed those before ({_show(before)})")
        stored = rec["achieved"][f"{what}_reduction"]
        if not finite(stored) or abs(float(stored) - (1 - after / before)) > _ROUNDING:
            out.append(f"achieved.{what}_reduction {_show(stored)} disagrees with {what} {_show(before)} -> "
                       f"{_show(after)} ({1 - after / before:.6f})")
    ratio = rec["target"]["ratio"]
    if not (finite(ratio) and 0.0 < ratio < 1.0):
        out.append(f"target.ratio is {_show(ratio)}, not a fraction in (0, 1)")
    if not 0 <= rec["seed"] < 2**64:
        out.append(f"seed is {_show(rec['seed'])}, not an integer in [0, 2**64)")
    seconds = rec["criterion_seconds"]
    if not (finite(seconds) and seconds >= 0):
        out.append(f"criterion_seconds is {_show(seconds)}, not a time >= 0")
    speedup = (rec.get("latency") or {}).get("speedup_batch1")
    if speedup is not None and not (finite(speedup) and speedup > 0):
        out.append(f"latency.speedup_batch1 is {_show(speedup)}, not a positive ratio")
    for key, low, high in (("shot_epochs", 0.0, math.inf), ("max_layer_ratio", 0.0, 1.0)):
        if key in rec and not (finite(rec[key]) and low <= rec[key] <= high):
            out.append(f"{key} is {_show(rec[key])}, outside [{low:g}, {high:g}]")
    if "shots" in rec and rec["shots"] < 1:
        out.append(f"shots is {_show(rec['shots'])}, expected at least 1")
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


def is_complete(path: Path) -> bool:
    """Does ``path`` hold a complete record? (False for anything unreadable or no record, and
    for a symbolic link, which is never read through: it may point outside the results.)"""
    if Path(path).is_symlink():
        return False
    rec = read_record(path)
    return isinstance(rec, dict) and rec.get("status") == "complete"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()
