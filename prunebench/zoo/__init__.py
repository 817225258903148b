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
from prunebench.zoo.keys import load_into, map_keys, state_dict_of

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
    """Load the entry's checkpoint into ``model``; returns what the record stores about it."""
    import torch

    if num_classes is not None and num_classes != entry.num_classes:
        raise ConfigError(f"pretrained baseline {entry.name} has {entry.num_classes} classes; "
                          f"the dataset has {num_classes}")
    found = resolve(entry, data_dir)
    try:
        payload = torch.load(found.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a verified file that still fails to load
        raise ConfigError(f"cannot load pretrained checkpoint {found.path}: {type(exc).__name__}: {exc}") from exc
    state = map_keys(state_dict_of(payload, str(found.path)), entry.key_map)
    load_into(model, state, f"pretrained checkpoint {found.path}")
    info: dict[str, Any] = {"file": found.path.name, "found_in": found.origin, "sha256": found.sha256,
                            "verified": found.verified}
    if isinstance(payload, dict) and "best_prec1" in payload:
        info["stored_best_prec1"] = float(payload["best_prec1"])
    return info
