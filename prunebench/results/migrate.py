"""Bringing result records written under an older run-id rule to the current one.

A run id hashes the run's identity (:meth:`prunebench.config.run.RunConfig.identity`). The
current rule hashes criterion hyper-parameters *resolved* (defaults filled in, values
typed), dataset options typed, and the distribution of any plug-in that is not built in;
the older rule hashed hyper-parameters and options as they were given. A record written
under the older rule would therefore not be found by a re-run of its configuration, and
its run would execute again. Records written under the current rule store the hashed
identity as ``record["identity"]``.

``prunebench records migrate DIR [--dry-run]`` rewrites such records explicitly: it rebuilds
each record's configuration from its fields, checks that those fields reproduce the
record's old id (trying the ways its hyper-parameters could have been given), and only then
renames ``<old id>.json`` and ``models/<old id>.pt`` to the new id, storing the identity.
Records it cannot verify (a profile run whose record lacks its layer ratios, a criterion
that is not installed, hand-edited fields) are reported and left as they are.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunebench.config.budgets import Budget, get_budget
from prunebench.config.run import run_id
from prunebench.errors import PrunebenchError
from prunebench.protocols import Target
from prunebench.results.parsing import UnusableFile, read_regular_file
from prunebench.results.records import RecordProblem, read_record, write_atomic
from prunebench.storage import checkpoints
from prunebench.storage.checkpoints import atomic_torch_save
from prunebench.storage.files import replace_atomically


class CannotMigrate(Exception):
    """The record's fields do not determine its run under the current rule."""


@dataclass(frozen=True)
class Change:
    path: Path
    old_id: str
    new_id: str | None
    action: str  # current | add identity | rename | merge | skip
    reason: str = ""

    def line(self) -> str:
        if self.action == "rename":
            source = self.old_id if self.path.stem == self.old_id else self.path.name
            return f"rename   {source} -> {self.new_id}"
        if self.action == "merge":
            source = self.old_id if self.path.stem == self.old_id else self.path.name
            return f"merge    {source} -> {self.new_id} ({self.reason})"
        if self.action == "add identity":
            return f"identity {self.old_id} (id unchanged; the identity is added to the record)"
        if self.action == "current":
            return f"current  {self.old_id}"
        return f"skip     {self.path.name}: {self.reason}"


def config_from_record(rec: Mapping[str, Any]):  # -> RunConfig
    """The run configuration a record describes (paths and flags excluded)."""
    from prunebench.config.run import PRETRAINED, RunConfig

    try:
        scratch = rec["criterion"] == "scratch"
        dense = rec.get("dense")  # a smaller-dense control: no criterion, no target, no pruning options
        criterion = rec.get("architecture_from", "random") if scratch else "random" if dense else rec["criterion"]
        pruning = {} if dense else {
            "target": Target(**rec["target"]), "allocation": rec.get("allocation", "uniform"),
            "max_layer_ratio": rec.get("max_layer_ratio", 0.9), "layer_ratios": rec.get("layer_ratios"),
            "shots": rec.get("shots", 1), "shot_epochs": rec.get("shot_epochs", 0.0)}
        fields = dict(rec["budget"])
        base = get_budget(fields.pop("name"))
        known = {f.name for f in dataclasses.fields(Budget)}
        budget = dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v
                                              for k, v in fields.items() if k in known})
        source = (rec.get("baseline_info") or {}).get("source")
        if rec.get("allocation") == "profile" and not rec.get("layer_ratios"):
            raise CannotMigrate("a profile run whose record does not store its layer ratios")
        return RunConfig(
            criterion=criterion, arch=rec["arch"], budget=budget, dataset=rec["dataset"],
            seed=rec["seed"], criterion_params=dict(rec["criterion_params"]),
            dataset_options=dict(rec.get("dataset_options") or {}), **pruning, dense=dense,
            baseline=PRETRAINED if source == "pretrained"
            else Path(source) if source not in (None, "cache", "trained") else None, scratch=scratch,
            precision=rec.get("precision", "fp32"),  # records made before precision was a choice trained in fp32
            scope=rec.get("scope"),  # records made before scopes existed used the default
            round_to=rec.get("round_to"),  # recorded only when given
        )
    except (KeyError, TypeError, PrunebenchError) as exc:
        raise CannotMigrate(f"its fields do not describe a run ({type(exc).__name__}: {exc})") from None


def _given_variants(resolved: Mapping[str, Any]):
    """The ways hyper-parameters could have been given: each one absent, typed, or as a string."""
    keys = sorted(resolved)
    choices = [(None, resolved[k], str(resolved[k]).lower() if isinstance(resolved[k], bool) else str(resolved[k]))
               for k in keys]
    for combo in itertools.product(*[range(3)] * len(keys)):
        yield {k: choices[i][c] for i, (k, c) in enumerate(zip(keys, combo, strict=True)) if c != 0}


def verify_old_id(rec: Mapping[str, Any], identity: Mapping[str, Any]) -> bool:
    """Do the record's fields, hashed by the old rule, give its run id?"""
    old = {k: v for k, v in identity.items() if k != "plugins"}
    old["dataset_options"] = dict(sorted((rec.get("dataset_options") or {}).items()))
    for given in _given_variants(identity["criterion_params"]):
        if run_id({**old, "criterion_params": dict(sorted(given.items()))}) == rec["run_id"]:
            return True
    return False


def plan(directory: Path) -> list[Change]:
    """What :func:`apply` would do to each record of ``directory``. A record whose run already
    has another file (its current record, or an earlier file of this plan) is merged with it."""
    directory = Path(directory)
    changes = []
    targets: dict[str, Path] = {}
    for path in sorted(directory.glob("*.json")):
        if path.is_symlink():
            changes.append(Change(path, path.stem, None, "skip", "a symbolic link; only regular files are migrated"))
            continue
        rec = read_record(path)
        if isinstance(rec, RecordProblem):
            changes.append(Change(path, path.stem, None, "skip", rec.reason))
            continue
        old = rec["run_id"]
        try:
            identity = json.loads(json.dumps(config_from_record(rec).identity(), default=str))
        except (CannotMigrate, PrunebenchError) as exc:
            changes.append(Change(path, old, None, "skip", str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one odd record never stops the migration of the others
            changes.append(Change(path, old, None, "skip", f"its fields do not describe a run "
                                  f"({type(exc).__name__}: {exc})"))
            continue
        new = run_id(identity)
        dest = directory / f"{new}.json"
        if rec.get("identity") == identity and new == old:
            changes.append(Change(path, old, new, "current"))
        elif new != old and not verify_old_id(rec, identity):
            changes.append(Change(path, old, None, "skip", "its fields do not reproduce its run id "
                                  "(edited by hand, or written by another version); left as is"))
        else:
            in_place = path.name == dest.name
            clash = None if in_place else targets.get(new) or (dest if dest.exists() or dest.is_symlink() else None)
            if clash is not None:
                changes.append(Change(path, old, new, "merge", f"{clash.name} is the same run under the current rule"))
            elif new == old and in_place:
                changes.append(Change(path, old, new, "add identity"))
            else:
                changes.append(Change(path, old, new, "rename"))
        targets.setdefault(new, path)
    return changes


def apply(directory: Path, changes: list[Change], log: Callable[[str], None] = print) -> None:
    """Carry out ``changes`` (from :func:`plan`). A run that ends up with two records keeps the
    complete one finished last; a complete record is never replaced by one that is not
    complete. Whatever is replaced, or not kept, goes to ``attempts/<run id>/`` first (a file
    in the record's place that is no record, byte for byte, as ``unusable-<n>.json``)."""
    from prunebench.results.store import archive

    directory = Path(directory)
    for ch in changes:
        if ch.action in ("current", "skip"):
            continue
        rec = read_record(ch.path)
        if isinstance(rec, RecordProblem) or ch.path.is_symlink():  # changed since the plan
            log(f"skip     {ch.path.name}: {rec.reason if isinstance(rec, RecordProblem) else 'a symbolic link'}")
            continue
        new = ch.new_id
        assert new is not None
        try:
            identity = json.loads(json.dumps(config_from_record(rec).identity(), default=str))
        except Exception as exc:  # noqa: BLE001 - changed since the plan
            log(f"skip     {ch.path.name}: its fields do not describe a run ({type(exc).__name__}: {exc})")
            continue
        moved = {**rec, "run_id": new, "identity": identity}
        if new != ch.old_id:
            moved["migrated_from"] = ch.old_id
        renamed = new != ch.old_id  # models/<old id>.pt moves to models/<new id>.pt
        old_model = directory / "models" / f"{ch.old_id}.pt"
        if rec.get("model_file") and renamed:
            moved["model_file"] = f"models/{new}.pt"
        dest = directory / f"{new}.json"
        if ch.path.name != dest.name and (dest.exists() or dest.is_symlink()):
            current = read_record(dest)
            unusable = None
            if isinstance(current, RecordProblem):  # kept byte for byte before it is replaced
                try:
                    unusable = b"" if dest.is_symlink() else read_regular_file(dest)
                except UnusableFile as exc:
                    unusable = str(exc)
            if dest.is_symlink() or isinstance(unusable, str):
                why = "a symbolic link" if dest.is_symlink() else unusable
                log(f"skip     {ch.path.name}: its run's place {dest.name} is {why}; left as is")
                continue
            if isinstance(current, dict) and _keeps(current, moved):
                archive(directory, new, {**moved, "model_file": None}, note=f"merged by migration from {ch.path.name}")
                _remove(ch.path, old_model if renamed else None)
                log(f"{ch.line()}: kept {dest.name}")
                continue
            if isinstance(current, dict):
                replaced_model = renamed and old_model.is_file() and current.get("status") == "complete"
                archive(directory, new, {**current, "model_file": None} if replaced_model else current,
                        note=f"replaced by migration of {ch.path.name}")
            elif isinstance(unusable, bytes):
                _keep_unusable(directory, new, unusable)
        if old_model.is_file() and renamed:
            _rewrite_model(old_model, directory / "models" / f"{new}.pt", new)
        write_atomic(dest, moved)
        if ch.path.name != dest.name:
            _remove(ch.path, old_model if renamed else None)
        if renamed:
            _move_attempts(directory, ch.old_id, new)
        log(ch.line())


def _keep_unusable(directory: Path, rid: str, raw: bytes) -> None:
    """Keep the bytes of a file in a record's place that is no usable record, before it is
    replaced, as ``attempts/<run id>/unusable-<n>.json``."""
    from prunebench.results.store import attempts_dir

    folder = attempts_dir(directory, rid)
    n = 1
    while (folder / f"unusable-{n}.json").exists():
        n += 1
    replace_atomically(folder / f"unusable-{n}.json", lambda f: f.write(raw))


def _keeps(current: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Does ``current`` win over ``other`` as the record of their run?"""
    def rank(r: Mapping[str, Any]) -> tuple[bool, str]:
        return r.get("status") == "complete", str(r.get("finished", ""))

    return rank(current) >= rank(other)


def _rewrite_model(src: Path, dest: Path, new_id: str) -> None:
    payload = checkpoints.read(src, "compressed model")
    if isinstance(payload, dict) and isinstance(payload.get("meta"), str):
        meta = json.loads(payload["meta"])
        payload = {**payload, "meta": json.dumps({**meta, "run_id": new_id})}
    atomic_torch_save(payload, dest)


def _remove(record: Path, model: Path | None) -> None:
    record.unlink(missing_ok=True)
    if model is not None:
        model.unlink(missing_ok=True)


def _move_attempts(directory: Path, old: str, new: str) -> None:
    src = directory / "attempts" / old
    if not src.is_dir():
        return
    dest = directory / "attempts" / new
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        target = dest / p.name
        if not target.exists():
            os.replace(p, target)
    if not any(src.iterdir()):
        src.rmdir()
