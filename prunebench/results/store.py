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
* A complete run's record and model are written in full to temporary files first, the
  record first (it is small, and it is the result); only then are they moved into place,
  model first, record last, with Ctrl-C held back between the two renames.
* No write failure of any kind (a full disk, a file-size limit, a permission, any exception
  torch raises) loses a finished run. A record that cannot be written changes nothing in the
  results directory; it is saved (with its model, where that can be) under
  ``<cache>/unsaved/`` and the error says where (:class:`~prunebench.errors.RecordError`). A
  model that cannot be written is left out: the record is stored with ``model_file: null``
  and ``model_not_saved`` (the error, and where the model was saved instead, if anywhere).
* A symbolic link in a record's place is never read or written through; the link itself is
  moved aside to ``attempts/<run_id>/``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from prunebench.errors import ConfigError, RecordError
from prunebench.results.parsing import UnusableFile, read_regular_file
from prunebench.results.records import dumps, read_record, write_atomic
from prunebench.storage.files import signals_deferred, staged, temp_path


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
    while os.path.lexists(path) or os.path.lexists(path.with_suffix(".pt")):
        path, n = folder / f"{base}-{n}.json", n + 1
    return write_atomic(path, {**record, **({"archived": note} if note else {})})


def _previous(results: Path, rid: str, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """The run's current record; a file there that is no usable record (truncated, edited,
    another schema) is first copied, byte for byte, to ``attempts/<run_id>/`` as
    ``unusable-<n>.json``, so that replacing it loses nothing. A symbolic link there is never
    read through (it may point anywhere): the link itself is moved to
    ``attempts/<run_id>/unusable-<n>.symlink``."""
    path = record_path(results, rid)
    if path.is_symlink():
        folder = attempts_dir(results, rid)
        folder.mkdir(parents=True, exist_ok=True)
        aside = folder / f"unusable-{_free_number(folder)}.symlink"
        os.replace(path, aside)  # renames the link, not what it points to
        log(f"{path} was a symbolic link, not a record; the link was moved to {aside}")
        return None
    if not path.exists():
        return None
    rec = read_record(path)
    if isinstance(rec, dict):
        return rec
    try:
        raw = read_regular_file(path)  # a FIFO, socket or device there is never opened
    except UnusableFile as exc:
        folder = attempts_dir(results, rid)
        folder.mkdir(parents=True, exist_ok=True)
        aside = folder / f"unusable-{_free_number(folder)}.special"
        os.replace(path, aside)  # moves the node itself
        log(f"{path} was no record file ({exc}); it was moved to {aside}")
        return None
    folder = attempts_dir(results, rid)
    folder.mkdir(parents=True, exist_ok=True)
    n = _free_number(folder)
    os.replace(staged(folder / f"unusable-{n}.json", lambda f: f.write(raw)), folder / f"unusable-{n}.json")
    return None


def _free_number(folder: Path) -> int:
    n = 1
    while any(os.path.lexists(folder / f"unusable-{n}{suffix}") for suffix in (".json", ".symlink", ".special")):
        n += 1
    return n


def commit(results: Path, rid: str, record: dict[str, Any], model: Mapping[str, Any] | None,
           log: Callable[[str], None] = print) -> Path:
    """Store a finished attempt by the rules above; returns where its record went.

    ``model`` is the compressed-model payload of a complete run (None otherwise). When the
    model cannot be written but the record can, ``record`` is changed in place to say so
    (``model_file: null`` and ``model_not_saved``) and stored.
    """
    results = Path(results)
    out = record_path(results, rid)
    previous = _previous(results, rid, log)
    if record.get("status") != "complete":
        if previous is not None and previous.get("status") == "complete":
            path = archive(results, rid, record)
            log(f"the complete record {out} is kept; this {record.get('status')} attempt is recorded in {path}")
            return path
        if previous is not None:
            archive(results, rid, previous, note="replaced by a later attempt")
        return write_atomic(out, record)
    return _commit_complete(results, rid, record, model, previous, log)


def _reason(exc: BaseException) -> str:
    """One line saying why a write failed, whatever raised it (OSError, torch's RuntimeError, ...)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _save_model(path: Path, model: Mapping[str, Any]) -> Path:
    """The model staged beside ``path`` (a temporary file, to be moved into place)."""
    return staged(path, lambda f: torch.save(dict(model), f))


def _commit_complete(results: Path, rid: str, record: dict[str, Any], model: Mapping[str, Any] | None,
                     previous: dict[str, Any] | None, log: Callable[[str], None]) -> Path:
    """The record is written first (it is small, and it is the result); the model second. A
    record that cannot be written goes to ``<cache>/unsaved/`` (:class:`RecordError` says
    where); a model that cannot be written is left out, and the record says so."""
    out, mpath = record_path(results, rid), model_path(results, rid)
    staged_model: Path | None = None
    staged_record: Path | None = None
    try:
        staged_record = staged(out, lambda f: f.write(dumps(record)))
        if model is not None:
            try:
                staged_model = _save_model(mpath, model)
            except Exception as exc:  # noqa: BLE001 - any failure (torch raises RuntimeError on a full disk)
                _model_not_saved(rid, record, model, exc)
                staged_record.unlink(missing_ok=True)
                staged_record = None
                staged_record = staged(out, lambda f: f.write(dumps(record)))
        old_model: Path | None = None
        archived: Path | None = None
        if previous is not None:
            note = "superseded by a later complete run" if previous.get("status") == "complete" else \
                "replaced by a later attempt"
            old = {**previous}
            if previous.get("status") == "complete":
                old["model_file"] = None  # models/<run_id>.pt now holds the later run's model (or is moved aside)
                if staged_model is None and os.path.isfile(mpath) and not os.path.islink(mpath):
                    old_model = mpath
            archived = archive(results, rid, old, note=note)
            old["archived"] = note
        with signals_deferred():
            if staged_model is not None:
                os.replace(staged_model, mpath)
                staged_model = None
            os.replace(staged_record, out)
            staged_record = None
    except Exception as exc:  # noqa: BLE001 - no write failure of any kind loses the finished run
        for p in (staged_model, staged_record):
            if p is not None:
                p.unlink(missing_ok=True)
        where = save_elsewhere(rid, record, model)
        raise RecordError(f"could not write the record of this complete run to {results} "
                          f"({_reason(exc)}); it was saved to {where} instead: move it into {results}"
                          ) from None
    if old_model is not None and archived is not None:
        _keep_old_model(old_model, archived, old, log)
    return out


def _keep_old_model(model: Path, archived: Path, content: Mapping[str, Any], log: Callable[[str], None]) -> None:
    """The previous complete run's model, when the later run's could not be saved: moved beside
    its archived record (which then names it), so that ``models/<run_id>.pt`` never holds a
    model that the record does not name."""
    dest = archived.with_suffix(".pt")
    try:
        os.replace(model, dest)
        write_atomic(archived, {**content, "model_file": dest.name})
    except Exception as exc:  # noqa: BLE001 - the record is written; this is housekeeping
        log(f"the previous model {model} could not be moved to {dest} ({_reason(exc)})")


def _model_not_saved(rid: str, record: dict[str, Any], model: Mapping[str, Any], exc: BaseException) -> None:
    """Mark ``record`` as having no model file: the model goes to ``<cache>/unsaved/`` if it can."""
    where = None
    try:
        from prunebench.datasets import cache_dir

        mpath = cache_dir() / "unsaved" / rid / "models" / f"{rid}.pt"
        os.replace(_save_model(mpath, model), mpath)
        where = str(mpath)
    except Exception:  # noqa: BLE001 - then the model is lost, and the record says so
        pass
    record["model_file"] = None
    record["model_not_saved"] = {"error": _reason(exc), "saved_to": where}


def model_warning(record: Mapping[str, Any], path: Path) -> str | None:
    """The line telling the user that a complete run's model was not saved (None when it was)."""
    info = record.get("model_not_saved")
    if not isinstance(info, Mapping):
        return None
    where = f"it was saved to {info['saved_to']} instead" if info.get("saved_to") else "it could not be saved anywhere"
    return f"the record was written to {path}, but the model could not be written ({info.get('error')}); {where}"


def save_elsewhere(rid: str, record: Mapping[str, Any], model: Mapping[str, Any] | None) -> str:
    """Save a record (and model) that could not be written to its results directory under
    ``<cache>/unsaved/<run_id>/``, record first; returns that folder (or says why even that
    failed, or that only the record is there)."""
    folder: Path | str = "<cache>/unsaved"
    try:
        from prunebench.datasets import cache_dir

        folder = cache_dir() / "unsaved" / rid
        write_atomic(folder / f"{rid}.json", record)
    except Exception as exc:  # noqa: BLE001 - any kind of failure
        return f"nowhere: {folder} failed too ({_reason(exc)})"
    if model is None or record.get("model_file") is None:
        return str(folder)
    mpath = folder / "models" / f"{rid}.pt"
    try:
        os.replace(_save_model(mpath, model), mpath)
    except Exception as exc:  # noqa: BLE001
        try:
            write_atomic(folder / f"{rid}.json",
                         {**record, "model_file": None, "model_not_saved": {"error": _reason(exc), "saved_to": None}})
        except Exception:  # noqa: BLE001 - the record above still names the model; it is kept as it is
            pass
        return f"{folder} (the record only; the model could not be saved: {_reason(exc)})"
    return str(folder)
