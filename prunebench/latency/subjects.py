"""The models a latency run measures: each compressed model of a results directory, rebuilt from
its model file or from its record's widths, beside its unpruned baseline."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunebench.errors import PrunebenchError


@dataclass
class Subject:
    """A compressed model of a results directory, its baseline architecture, and where it came from."""

    run_id: str
    model: nn.Module
    baseline: nn.Module
    input_shape: list[int]
    arch: str
    arch_kwargs: dict[str, Any]
    source: str  # "model file" | "record widths"
    digest: str = ""

    def __post_init__(self) -> None:
        self.digest = architecture_digest(self.model, self.arch, self.arch_kwargs, self.input_shape)


def architecture_digest(model: nn.Module, arch: str, arch_kwargs: Mapping[str, Any], input_shape: Sequence[int]) -> str:
    """sha256 of what the latency depends on: the modules (types, hyper-parameters, parameter
    and buffer shapes), the architecture it came from with its arguments, and the input shape
    (batch left out). Two runs that arrive at the same widths share it."""
    structure = {
        "arch": arch, "arch_kwargs": dict(sorted(arch_kwargs.items())), "input_shape": list(input_shape[1:]),
        "modules": repr(model),
        "shapes": [[k, list(v.shape)] for k, v in model.state_dict().items()],
    }
    return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()


def model_path(results: Path, record: Mapping[str, Any]) -> Path:
    """Where ``record``'s model file is (or was): its ``model_file``, relative to ``results``."""
    return Path(results) / str(record.get("model_file") or f"models/{record['run_id']}.pt")


class RebuildError(PrunebenchError):
    """A compressed model can be neither loaded nor rebuilt from its record."""


def load_subject(results: Path, record: Mapping[str, Any], others: Sequence[Mapping[str, Any]] = ()) -> Subject:
    """The compressed model of ``record`` and its baseline architecture: from its model file,
    else rebuilt from the record (widths, a factorised model's replace steps), else -- for a
    criterion whose shapes only the weights decide -- from a run of ``others`` that shares them."""
    from prunebench import registry
    from prunebench.errors import CheckpointError
    from prunebench.pipeline.surgery import load_compressed

    rid = record["run_id"]
    data = record.get("data") or {}
    shape = [1, *data.get("input_shape", [])]
    kwargs = {"num_classes": int(data.get("num_classes", 10)), "in_channels": int(shape[1]) if len(shape) > 1 else 3}
    arch = record["arch"]
    baseline = registry.architectures.get(arch).build(**kwargs)
    path = model_path(results, record)
    if path.is_file():
        try:
            model, info = load_compressed(path)
        except CheckpointError as exc:
            raise RebuildError(str(exc)) from None
        return Subject(rid, model, baseline, shape, info["arch"], kwargs, "model file")
    if len(shape) < 2:
        raise RebuildError(f"no model file ({path}) and no input shape in the record")
    if record.get("dense"):  # the smaller-dense control: the smaller architecture as built
        model = registry.architectures.get(record["dense"]).build(**kwargs)
        return Subject(rid, model, baseline, shape, record["dense"], kwargs, "record widths")
    if record.get("criterion_kind") == "transform":
        return _factorised(results, record, baseline, shape, kwargs, path, others)
    model = copy.deepcopy(baseline)
    widths = record.get("widths") or {}
    modules = dict(model.named_modules())
    kept = {name: list(range(int(w))) for name, w in widths.items()
            if name in modules and int(w) < getattr(modules[name], "out_channels", int(w))}
    if kept:
        from prunebench.pipeline.surgery import prune_kept

        prune_kept(model, torch.zeros(shape), kept)
    return Subject(rid, model, baseline, shape, arch, kwargs, "record widths")


def _factorised(results: Path, record: Mapping[str, Any], baseline: nn.Module, shape: list[int],
                kwargs: dict[str, Any], path: Path, others: Sequence[Mapping[str, Any]]) -> Subject:
    """A factorised model without its file: replayed from the record's replace steps, or the
    architecture of a twin run (:func:`twin`)."""
    from prunebench.pipeline.surgery import load_compressed, replay

    rid = record["run_id"]
    steps = record.get("replacements")
    if steps:
        try:
            model = replay(copy.deepcopy(baseline), torch.zeros(shape), steps)
        except (PrunebenchError, KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise RebuildError(f"its replace steps do not apply to {record['arch']} ({type(exc).__name__}: {exc})") from None
        return Subject(rid, model, baseline, shape, record["arch"], kwargs, "record plan")
    other = twin(record, others, results)
    if other is None:
        raise RebuildError(f"its model file {path} is gone, its record holds no replace steps, and no run "
                           f"with a model file shares its architecture ({record['criterion']}); restore the file")
    model, info = load_compressed(model_path(results, other))
    return Subject(rid, model, baseline, shape, info["arch"], kwargs, f"architecture of {other['run_id']}")


def twin(record: Mapping[str, Any], others: Sequence[Mapping[str, Any]], results: Path) -> Mapping[str, Any] | None:
    """A run of ``others`` whose model file exists and whose architecture is ``record``'s for
    certain: its criterion declares that the weights alone decide the shapes
    (``weights_decide_shapes``), and both runs transformed the same baseline weights with the same
    parameters at the same knob (same identity but the seed, same adapted checkpoint or baseline
    weights digest, same knob) and counted the same MACs and parameters."""
    from prunebench import registry

    try:
        criterion = registry.criteria.get(str(record.get("criterion")))
    except PrunebenchError:
        return None
    if not getattr(criterion, "weights_decide_shapes", False):
        return None

    def weights(rec: Mapping[str, Any]) -> Any:  # the adapted checkpoint's cache key names its weights
        info = rec.get("baseline_info") or {}
        return (info.get("adaptation") or {}).get("key") or info.get("weights_sha256")

    def key(rec: Mapping[str, Any]) -> Any:
        identity = {k: v for k, v in (rec.get("identity") or {}).items() if k != "seed"}
        return json.dumps([identity, weights(rec), rec.get("knob"), rec.get("macs"), rec.get("params")], sort_keys=True)

    if not weights(record) or record.get("knob") is None:
        return None
    wanted = key(record)
    for other in others:
        if other.get("run_id") == record.get("run_id") or key(other) != wanted:
            continue
        if model_path(results, other).is_file():
            return other
    return None


def measurable(results: Path) -> Iterable[dict[str, Any]]:
    """Complete, compressed runs of ``results`` (records only read)."""
    from prunebench.results.records import RecordProblem
    from prunebench.results.survey import scan_records

    for rec in scan_records(results):
        if isinstance(rec, RecordProblem) or rec.get("status") != "complete":
            continue
        yield rec
