"""Per-layer ratio profiles for ``--allocation profile``: a JSON file or a packaged named profile.

A profile maps layer names to the fraction of channels each should lose; the harness scales
all ratios by one factor so that the run meets its target. ``--layer-ratios`` takes either
a path to a JSON file ``{layer: ratio}`` or the name of a profile shipped with prunebench
(``prunebench/layer_ratios/NAME.json``; list them with :func:`named_profiles`), both read by
:func:`prunebench.config.validation.load_profile`. The shipped profiles are the per-layer lists of
the papers' scripts, mapped onto prunebench's layer names; each file records its source.
See docs/protocol.md.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from prunebench.errors import ConfigError, suggest

__all__ = ["name_of", "named_profile", "named_profiles"]


def named_profiles() -> list[str]:
    """Names of the packaged profiles."""
    root = resources.files("prunebench") / "layer_ratios"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def named_profile(name: str) -> dict[str, Any]:
    """The packaged profile ``name``: ``{"name", "arch", "list", "source", "notes", "ratios"}``."""
    names = named_profiles()
    if name not in names:
        raise ConfigError(f"no named layer-ratio profile {name!r}.{suggest(name, names)} Named profiles: {', '.join(names)}")
    doc = json.loads((resources.files("prunebench") / "layer_ratios" / f"{name}.json").read_text())
    return doc


def name_of(ratios: Any) -> str | None:
    """The name of the packaged profile whose ratios are exactly ``ratios`` (as a run records
    them), else None: how a record written without the name still shows it."""
    if not isinstance(ratios, dict) or not ratios:
        return None
    return next((name for name, packaged in _packaged_ratios() if packaged == ratios), None)


@functools.cache
def _packaged_ratios() -> tuple[tuple[str, dict[str, float]], ...]:
    """(name, ratios) of every packaged profile, read once per process."""
    return tuple((name, {str(k): float(v) for k, v in named_profile(name)["ratios"].items()})
                 for name in named_profiles())
