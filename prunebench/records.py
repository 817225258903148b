"""Result records: one JSON document per run, written atomically (temp file + rename).

The run id is derived from the run's configuration, so re-running the same configuration
finds its record; a crashed run leaves no partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = "prunebench-result/1"

REQUIRED = (
    "schema", "run_id", "status", "criterion", "criterion_params", "arch", "dataset", "budget",
    "target", "seed", "started", "finished", "versions", "hardware",
)
COMPLETE_REQUIRED = (
    "baseline", "oneshot", "final", "macs", "params", "achieved", "latency",
    "criterion_seconds", "ledger", "widths",
)


def run_id(config: Mapping[str, Any]) -> str:
    """Readable, deterministic id: dataset-arch-criterion-target-budget-seed-<hash of the rest>."""
    blob = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
    t = config["target"]
    return (
        f"{config['dataset']}-{config['arch']}-{config['criterion']}-"
        f"{t['metric']}{round(t['ratio'] * 100)}-{config['budget']['name']}-s{config['seed']}-{digest}"
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
        "torch_pruning": getattr(torch_pruning, "__version__", None),
        "tensorly": tensorly.__version__,
        "prunebench": prunebench.__version__,
        "git_sha": git_sha(),
    }


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

    from prunebench.metrics import cpu_name

    info = {"device": str(device), "cpu": cpu_name(), "cpu_threads": torch.get_num_threads(), "os": sys.platform}
    if getattr(device, "type", "") == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_atomic(path: Path, record: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=True, default=_jsonable)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def load_records(directory: Path) -> Iterator[dict[str, Any]]:
    for p in sorted(Path(directory).glob("*.json")):
        with open(p) as f:
            rec = json.load(f)
        if rec.get("schema") == SCHEMA:
            yield rec


def is_complete(path: Path) -> bool:
    try:
        with open(path) as f:
            return json.load(f).get("status") == "complete"
    except (OSError, json.JSONDecodeError):
        return False
