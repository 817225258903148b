"""The model zoo: pretrained baselines (``--baseline pretrained``).

An entry (:class:`ZooEntry`) names an architecture, the data it was trained on, the run
datasets it serves, its file (URL, sha256, licence), its preprocessing and its reported
accuracy. :func:`lookup` picks the entry for a run; :func:`load_pretrained` finds the file
(:mod:`prunebench.zoo.files`), verifies it, maps its keys (:mod:`prunebench.zoo.keys`) and
loads it into a model with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from prunebench.errors import ConfigError
from prunebench.zoo.entries import BUILTIN, IMAGENET_MEAN, IMAGENET_STD, ZooEntry
from prunebench.zoo.files import Resolved, resolve
from prunebench.zoo.keys import map_keys

__all__ = [
    "ENTRIES", "IMAGENET_MEAN", "IMAGENET_STD", "Resolved", "ZooEntry", "available", "load_pretrained", "lookup",
    "map_keys",
]

#: every known entry by name (tests and plug-ins may add their own)
ENTRIES: dict[str, ZooEntry] = {e.name: e for e in BUILTIN}


def available() -> str:
    """'arch on dataset, dataset; ...' for every entry, for error messages."""
    return "; ".join(f"{e.arch} on {', '.join(e.datasets + e.adapt_to)}" for e in ENTRIES.values())


def lookup(arch: str, dataset: str) -> ZooEntry:
    """The entry that serves ``arch`` on ``dataset``; a one-line :class:`ConfigError` listing
    what exists otherwise."""
    for entry in ENTRIES.values():
        if entry.arch == arch and entry.serves(dataset):
            return entry
    raise ConfigError(f"no pretrained baseline for {arch} on {dataset}. Available: {available()}")


def load_pretrained(entry: ZooEntry, model: nn.Module, data_dir: str | Path | None = None,
                    num_classes: int | None = None) -> dict[str, Any]:
    """Load the entry's checkpoint into ``model`` (weights-only, checked: finite tensors that fit
    the model, else a one-line :class:`CheckpointError`); returns what the record stores about it."""
    from prunebench.storage import checkpoints

    if num_classes is not None and num_classes != entry.num_classes:
        raise ConfigError(f"pretrained baseline {entry.name} has {entry.num_classes} classes; "
                          f"the dataset has {num_classes}")
    found = resolve(entry, data_dir)
    what = f"pretrained checkpoint ({entry.name})"
    payload = checkpoints.read(found.path, what)
    state = map_keys(checkpoints.state_dict(payload, found.path, what), entry.key_map)
    checkpoints.check_finite(state, found.path, what)
    checkpoints.check_fits(model, state, found.path, what)
    model.load_state_dict(state)
    info: dict[str, Any] = {"file": found.path.name, "found_in": found.origin, "sha256": found.sha256,
                            "verified": found.verified}
    if isinstance(payload, dict) and checkpoints.finite_number(payload.get("best_prec1")):
        info["stored_best_prec1"] = float(payload["best_prec1"])
    return info
