"""From result records to leaderboard rows: one row per run, labelled by its configuration.

A leaderboard row is one *configuration* — everything that determines a run except its seed —
so runs that differ in anything but the seed are never averaged together. The configuration
is the record's ``identity`` (the exact dict hashed into its run id) when the record has one;
older records get an equivalent one rebuilt from their fields.

Labels stay short: a row is named by its criterion and the hyper-parameters that differ from
the criterion's defaults; options that vary *within a table* (K-shot, scope, profile, baseline,
precision, ...) are appended to every row of that table, and options shared by the whole table
are stated once in its caption (see :mod:`prunebench.leaderboard.pages`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

import pandas as pd

#: identity keys a leaderboard page or table already groups by (or that never separate rows)
_GROUPED = ("seed", "dataset", "arch", "budget", "target")


def _digest(obj: Any, n: int = 6) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def budget_label(budget: Mapping[str, Any]) -> str:
    """The budget's name, plus a short digest when the record's numbers differ from the preset
    of that name (records of differently overridden budgets are never averaged together)."""
    from prunebench.config.budgets import BUDGETS

    name = budget["name"]
    preset = BUDGETS[name].resolved() if name in BUDGETS else {}
    changed = {k: v for k, v in budget.items() if k != "name" and _norm(preset.get(k)) != _norm(v)}
    if not changed:
        return name
    return f"{name}~{_digest(changed)}"


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple | list) else value


def budget_summary(budget: Mapping[str, Any]) -> str:
    """One line with the budget's resolved numbers, as the page header shows them."""

    def get(key: str, fmt: str = "{}") -> str:
        return fmt.format(budget[key]) if budget.get(key) is not None else "?"

    if len(budget) <= 1:
        return "(resolved numbers not recorded)"
    subset = f"{budget.get('train_subset') or 'full'}/{budget.get('test_subset') or 'full'}"
    parts = [f"baseline {get('baseline_epochs', '{:g}')} ep (lr {get('lr', '{:g}')}, {get('schedule')})"]
    if budget.get("adapt_epochs"):
        parts.append(f"adaptation of pretrained baselines {get('adapt_epochs', '{:g}')} ep"
                     + (f" (lr {get('adapt_lr', '{:g}')})" if budget.get("adapt_lr") is not None else ""))
    parts.append(f"fine-tune {get('finetune_epochs', '{:g}')} ep (lr {get('finetune_lr', '{:g}')})")
    parts.append(f"batch {get('batch_size')}, train/test images {subset}")
    if budget.get("calibration_size") is not None:
        parts.append(f"calibration {budget['calibration_size']} training images")
    return ", ".join(parts)


def criterion_label(rec: Mapping[str, Any]) -> str:
    """Criterion name plus the hyper-parameters that differ from its defaults, and the allocation
    of score criteria when it is not ``uniform``. Scratch controls are ``scratch`` (or
    ``scratch[<criterion>]`` when their architecture came from a criterion other than ``random``)."""
    if rec["criterion"] == "dense" and rec.get("dense"):
        return f"dense {rec['dense']}"
    if rec["criterion"] == "scratch":
        source = rec.get("architecture_from", "random")
        inner = criterion_label({**rec, "criterion": source})
        return "scratch" if inner == "random" else f"scratch[{inner}]"
    from prunebench import registry

    params = dict(rec.get("criterion_params") or {})
    try:
        cls = registry.criteria.get(rec["criterion"])
        defaults = {f.name: f.default for f in dataclasses.fields(cls.Params)}
        params = {k: v for k, v in params.items() if defaults.get(k, object()) != v}
    except Exception:  # noqa: BLE001 - a record from an uninstalled plug-in still gets a row
        pass
    label = rec["criterion"]
    if params:
        label += "(" + ", ".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    if rec.get("allocation", "uniform") != "uniform" and rec.get("criterion_kind") == "score":
        label += f" [{rec['allocation']}]"
    return label


def baseline_source(rec: Mapping[str, Any]) -> str:
    """Where the run's baseline came from, in a few words (trained, a file, a zoo checkpoint)."""
    info = rec.get("baseline_info") or {}
    source = info.get("source", "trained")
    if source == "pretrained" or info.get("zoo"):
        zoo = info.get("zoo") or {}
        name = zoo.get("name") or zoo.get("file") or "checkpoint"
        adapted = info.get("adaptation")
        return f"pretrained {name}" + (" (adapted)" if adapted else "")
    if source in ("trained", "cache"):
        return "trained"
    return f"file {str(source).rsplit('/', 1)[-1]}"


def profile_of(rec: Mapping[str, Any]) -> str | None:
    """The layer-ratio profile a run used: its name when recorded, else a digest of its ratios."""
    ident = rec.get("identity") or {}
    name = rec.get("layer_ratios_name") or ident.get("layer_ratios_name")
    ratios = rec.get("layer_ratios", ident.get("layer_ratios"))
    if name:
        return str(name)
    if ratios:
        from prunebench.config.profiles import name_of

        try:
            packaged = name_of(ratios)
        except Exception:  # noqa: BLE001 - a record's odd values only cost the name
            packaged = None
        return packaged or f"#{_digest(ratios)}"
    return None


def options_of(rec: Mapping[str, Any]) -> dict[str, str]:
    """The protocol options of a run that may separate rows, as display strings (ordered)."""
    opts = {
        "scope": str(rec.get("scope", "inner")),
        "shots": str(rec.get("shots", 1)),
        "shot epochs": f"{float(rec.get('shot_epochs', 0.0)):g}",
        "max layer ratio": f"{float(rec.get('max_layer_ratio', 0.9)):g}",
        "profile": profile_of(rec) or "none",
        "round to": str(rec.get("round_to") or "none"),
        "baseline": baseline_source(rec),
        "precision": str(rec.get("precision") or "not recorded"),
        "dataset options": json.dumps(rec.get("dataset_options") or {}, sort_keys=True),
    }
    return opts


def match_key(rec: Mapping[str, Any]) -> str:
    """What must agree for a row to be compared with a ``random`` control: every protocol option,
    and the allocation (a score criterion's own; ``uniform`` for criteria that allocate or
    transform, since the control then stands for a uniform random pruning at the same target)."""
    alloc = rec.get("allocation", "uniform") if rec.get("criterion_kind") == "score" else "uniform"
    return json.dumps({**options_of(rec), "allocation": alloc}, sort_keys=True)


def configuration(rec: Mapping[str, Any]) -> str:
    """A canonical string of the run's configuration minus its seed (the row key)."""
    ident = rec.get("identity")
    if isinstance(ident, Mapping):
        key = {k: v for k, v in ident.items() if k not in _GROUPED}
    else:  # records written before identities were stored
        key = {"criterion": rec["criterion"], "criterion_params": rec.get("criterion_params") or {},
               "architecture_from": rec.get("architecture_from"), **options_of(rec)}
    return json.dumps(key, sort_keys=True, default=str)


def _top1(block: Any) -> float:
    if not isinstance(block, Mapping) or block.get("top1") is None:
        return float("nan")
    try:
        return float(block["top1"])
    except (TypeError, ValueError):
        return float("nan")


def _shared(rec: Mapping[str, Any]) -> bool:
    """True when the run's latency was measured while other runs shared its device."""
    lat = rec.get("latency") or {}
    sharing = rec.get("sharing") or {}
    if lat.get("shared") is not None:
        return bool(lat["shared"])
    return int(sharing.get("runs_per_device", 1) or 1) > 1


def row(rec: Mapping[str, Any], source: str) -> dict[str, Any]:
    """One run as a flat dict (the columns of :func:`frame`)."""
    t = rec["target"]
    versions = rec.get("versions", {})
    final = _top1(rec.get("final"))
    baseline = _top1(rec.get("baseline"))
    lat = rec.get("latency") or {}
    info = rec.get("baseline_info") or {}
    adaptation = info.get("adaptation") or {}
    return {
        "dataset": rec["dataset"], "arch": rec["arch"], "budget": budget_label(rec["budget"]),
        "budget_info": budget_summary(rec["budget"]), "finetune_epochs": rec["budget"].get("finetune_epochs"),
        "target": f"{t['metric']} -{t['ratio']:.0%}", "metric": t["metric"], "ratio": float(t["ratio"]),
        "criterion": criterion_label(rec), "name": rec["criterion"], "config": configuration(rec),
        "run_id": str(rec.get("run_id", "")),
        "options": json.dumps(options_of(rec), sort_keys=False), "match": match_key(rec), "seed": rec["seed"],
        "baseline": baseline, "oneshot": _top1(rec.get("oneshot")), "oneshot_bn": _top1(rec.get("oneshot_bn")),
        "final": final, "delta": final - baseline,
        "macs_down": 100 * rec["achieved"]["macs_reduction"], "params_down": 100 * rec["achieved"]["params_reduction"],
        "speedup": float(lat.get("speedup_batch1", float("nan"))), "shared": _shared(rec),
        "crit_s": float(rec.get("criterion_seconds", float("nan"))),
        "device": (lat.get("after") or {}).get("device") or (rec.get("hardware") or {}).get("device", "?"),
        "finished": str(rec.get("finished", ""))[:10],
        "torch": versions.get("torch", "?"), "prunebench": versions.get("prunebench", "?"),
        "torch_pruning": versions.get("torch_pruning") or "?",
        "baseline_source": baseline_source(rec),
        "pretrained": bool(info.get("zoo")) or info.get("source") == "pretrained",
        "adapt_epochs": adaptation.get("epochs"), "adapt_before": adaptation.get("top1_before"),
        "adapt_after": adaptation.get("top1_after"), "file": source,
    }


def frame(records: list[tuple[str, Mapping[str, Any]]]) -> pd.DataFrame:
    """Rows of every complete record, given as ``(file name, record)`` pairs."""
    rows = [row(rec, name) for name, rec in records if rec.get("status") == "complete"]
    df = pd.DataFrame(rows)
    if not df.empty:
        df = df.sort_values(["dataset", "arch", "budget", "metric", "ratio", "criterion", "config", "seed", "file"],
                            kind="mergesort").reset_index(drop=True)
    return df


def is_finite(x: float) -> bool:
    return x is not None and not (isinstance(x, float) and (math.isnan(x) or math.isinf(x)))
