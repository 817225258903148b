"""Where a run's record and model go, so that no good record is lost and no bad one kept.

A results directory holds ``<run_id>.json`` (the record), ``models/<run_id>.pt`` (the
compressed model of a complete run) and ``attempts/<run_id>/`` (the history). The rules:

* The directory is checked before any work (:func:`check_results_dir`): it must be a
  directory (or creatable) in which files can be written, so an unwritable results
  directory is found in a second, not after hours of training.
* A complete record is never replaced by an attempt that did not complete. A failed,
  diverged or interrupted attempt whose run already has a complete record is written to
  ``attempts/<run_id>/`` instead, and the complete record and its model stay as they were
  (:func:`commit`).
* A record that is replaced (by a newer complete run, or a failed one by a newer attempt)
  is first copied to ``attempts/<run_id>/``, so the history of a run is never lost; so is a
  file in the record's place that is no usable record (``unusable-<n>.json``).
* A complete run's model and record are written in full to temporary files first; only
  then are they moved into place, model first, record last, with Ctrl-C held back between
  the two renames. A full disk or a failing write therefore changes nothing in the results
  directory; the record and model are then saved under ``<cache>/unsaved/`` and the error
  says where (:class:`~prunebench.errors.RecordError`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from prunebench.errors import ConfigError, RecordError
from prunebench.files import signals_deferred, staged, temp_path
from prunebench.records import dumps, read_record, write_atomic


def record_path(results: Path, rid: str) -> Path:
    return Path(results) / f"{rid}.json"


def model_path(results: Path, rid: str) -> Path:
    return Path(results) / "models" / f"{rid}.pt"


def attempts_dir(results: Path, rid: str) -> Path:
    return Path(results) / "attempts" / rid


def check_results_dir(results: Path) -> None:
    """The results directory (and its ``models/``) exists or can be created, is a directory,
    and accepts new files; raises ConfigError naming the problem otherwise."""
    results = Path(results)
    for folder in (results, results / "models"):
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"results directory {folder} is a file, not a directory; choose another --results-dir")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            temp_path(folder / "write-probe").unlink()
        except OSError as exc:
            raise ConfigError(f"cannot write to the results directory {folder} ({exc.strerror or exc}); "
                              "choose another --results-dir") from None


def remove_partial_files(results: Path, rid: str) -> None:
    """Temporary files of this run left by a killed process. Only call while holding the
    run's lock: another process's temporary files would be removed otherwise."""
    for pattern in (f".{rid}.json.*.tmp", f"models/.{rid}.pt.*.tmp"):
        for p in Path(results).glob(pattern):
            p.unlink(missing_ok=True)


def archive(results: Path, rid: str, record: Mapping[str, Any], note: str | None = None) -> Path:
    """Write ``record`` to ``attempts/<run_id>/<started>-<status>.json`` (never overwriting)."""
    folder = attempts_dir(results, rid)
    stamp = re.sub(r"[^0-9A-Za-z]", "", str(record.get("started", "")))[:15] or "unknown"
    base = f"{stamp}-{record.get('status', 'unknown')}"
    path = folder / f"{base}.json"
    n = 2
    while path.exists():
        path, n = folder / f"{base}-{n}.json", n + 1
    return write_atomic(path, {**record, **({"archived": note} if note else {})})


def _previous(results: Path, rid: str) -> dict[str, Any] | None:
    """The run's current record; a file there that is no usable record (truncated, edited,
    another schema) is first copied, byte for byte, to ``attempts/<run_id>/`` as
    ``unusable-<n>.json``, so that replacing it loses nothing."""
    path = record_path(results, rid)
    if not path.exists():
        return None
    rec = read_record(path)
    if isinstance(rec, dict):
        return rec
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    folder = attempts_dir(results, rid)
    folder.mkdir(parents=True, exist_ok=True)
    n = 1
    while (folder / f"unusable-{n}.json").exists():
        n += 1
    os.replace(staged(folder / f"unusable-{n}.json", lambda f: f.write(raw)), folder / f"unusable-{n}.json")
    return None


def commit(results: Path, rid: str, record: dict[str, Any], model: Mapping[str, Any] | None,
           log: Callable[[str], None] = print) -> Path:
    """Store a finished attempt by the rules above; returns where its record went.

    ``model`` is the compressed-model payload of a complete run (None otherwise).
    """
    results = Path(results)
    out = record_path(results, rid)
    previous = _previous(results, rid)
    if record.get("status") != "complete":
        if previous is not None and previous.get("status") == "complete":
            path = archive(results, rid, record)
            log(f"the complete record {out} is kept; this {record.get('status')} attempt is recorded in {path}")
            return path
        if previous is not None:
            archive(results, rid, previous, note="replaced by a later attempt")
        return write_atomic(out, record)
    return _commit_complete(results, rid, record, model, previous, log)


def _commit_complete(results: Path, rid: str, record: dict[str, Any], model: Mapping[str, Any] | None,
                     previous: dict[str, Any] | None, log: Callable[[str], None]) -> Path:
    out, mpath = record_path(results, rid), model_path(results, rid)
    staged_model: Path | None = None
    staged_record: Path | None = None
    try:
        if model is not None:
            staged_model = staged(mpath, lambda f: torch.save(dict(model), f))
        data = dumps(record)
        staged_record = staged(out, lambda f: f.write(data))
        if previous is not None:
            note = "superseded by a later complete run" if previous.get("status") == "complete" else \
                "replaced by a later attempt"
            old = {**previous}
            if previous.get("status") == "complete":
                old["model_file"] = None  # models/<run_id>.pt now holds the later run's model
            archive(results, rid, old, note=note)
        with signals_deferred():
            if staged_model is not None:
                os.replace(staged_model, mpath)
                staged_model = None
            os.replace(staged_record, out)
            staged_record = None
    except OSError as exc:
        for p in (staged_model, staged_record):
            if p is not None:
                p.unlink(missing_ok=True)
        where = save_elsewhere(rid, record, model)
        raise RecordError(f"could not write the record of this complete run to {results} "
                          f"({exc.strerror or exc}); it was saved to {where} instead: move it into {results}"
                          ) from None
    return out


def save_elsewhere(rid: str, record: Mapping[str, Any], model: Mapping[str, Any] | None) -> str:
    """Save a record (and model) that could not be written to its results directory under
    ``<cache>/unsaved/<run_id>/``; returns that folder (or says why even that failed)."""
    from prunebench.datasets import cache_dir

    folder = cache_dir() / "unsaved" / rid
    try:
        if model is not None:
            mpath = folder / "models" / f"{rid}.pt"
            staged_model = staged(mpath, lambda f: torch.save(dict(model), f))
            os.replace(staged_model, mpath)
        write_atomic(folder / f"{rid}.json", record)
    except OSError as exc:
        return f"nowhere: {folder} failed too ({exc.strerror or exc})"
    return str(folder)
