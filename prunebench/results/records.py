"""Result records: one JSON document per run, written atomically (temp file + rename).

The run id is derived from the run's configuration, so re-running the same configuration
finds its record; a crashed run leaves no partial file.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prunebench.results.parsing import UnusableFile, parse_json, read_regular_file, show, type_problems
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
        return RecordProblem(path, f"not a result record (schema {show(rec.get('schema'))}, expected {SCHEMA!r})")
    need = REQUIRED + (COMPLETE_REQUIRED if rec.get("status") == "complete" else ())
    missing = [k for k in need if k not in rec]
    if missing:
        status = rec.get("status", "unknown")
        status = status if isinstance(status, str) and status.isidentifier() else show(status)
        return RecordProblem(path, f"{status} record lacks {', '.join(missing)}")
    wrong = type_problems(rec)
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        return RecordProblem(path, f"malformed field: {'; '.join(wrong[:3])}{more}")
    return rec


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
