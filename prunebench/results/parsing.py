"""Reading a record file without trusting it: a regular file of bounded size, JSON without
huge numbers or deep nesting, and a type check of every field the readers use."""

from __future__ import annotations

import json
import os
import stat
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def show(value: Any) -> str:
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
                where = path if key != "*" else f"{'.'.join(parents)}.{k if k.isidentifier() else show(k)}"
                out.append(f"{where} is {show(value)}, expected {' or '.join(kinds)}")
    if isinstance(rec.get("run_id"), str) and not _safe_name(rec["run_id"]):
        out.append(f"run_id {show(rec['run_id'])} is no file name (a path or control characters)")
    if isinstance(rec.get("target"), dict) and rec["target"].get("metric") not in ("macs", "params"):
        out.append(f"target.metric is {show(rec['target'].get('metric'))}, expected 'macs' or 'params'")
    return out


def _safe_name(name: str) -> bool:
    """Can ``name`` stand for ``<name>.json`` in the records folder (no path, no control characters)?"""
    return (0 < len(name) <= 200 and not name.startswith(".") and "/" not in name and "\\" not in name
            and not any(unicodedata.category(c)[0] in "CZ" and c != " " for c in name))
