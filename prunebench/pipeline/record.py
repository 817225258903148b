"""What a run's record holds besides accuracies: its fields from the start, plug-in versions,
latency, layer widths, and the check that every accuracy is a finite number."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunebench import registry
from prunebench.errors import DivergedError
from prunebench.pipeline.metrics import (
    measure_latency_pair,
)
from prunebench.results.records import hardware, now, versions
from prunebench.storage import checkpoints
from prunebench.training import distributed

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.config.run import RunConfig, Sharing


def base_record(cfg: RunConfig, rid: str, identity: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The fields a record has from the start (status ``running``)."""
    crit_cls = registry.criteria.get(cfg.criterion)
    criterion = crit_cls.from_kwargs(seed=cfg.seed, **dict(cfg.criterion_params))
    arch = registry.architectures.get(cfg.arch)
    scope = arch.resolve_scope(cfg.scope)
    record: dict[str, Any] = {
        "schema": "prunebench-result/1", "run_id": rid, "status": "running",
        "criterion": cfg.criterion, "criterion_kind": crit_cls.kind.value,
        "criterion_params": criterion.describe(), "arch": cfg.arch, "dataset": cfg.dataset,
        "dataset_options": dict(cfg.dataset_options), "budget": cfg.budget_fields(),
        "target": dataclasses.asdict(cfg.target), "seed": cfg.seed, "scope": scope, "allocation": cfg.allocation,
        "max_layer_ratio": cfg.max_layer_ratio, "layer_ratios": dict(cfg.layer_ratios) if cfg.layer_ratios else None,
        "shots": cfg.shots, "shot_epochs": cfg.shot_epochs, "started": now(), "versions": versions(),
        "plugins": plugin_versions(cfg), "identity": identity,
        "precision": cfg.resolved_precision(), "sharing": cfg.sharing.describe(),
    }
    if cfg.round_to is not None and cfg.round_to > 1 and cfg.dense is None:  # only when given: other records keep their fields
        record["round_to"] = cfg.round_to
    if cfg.scratch:
        record.update(criterion="scratch", architecture_from=cfg.criterion)
    if cfg.dense is not None:
        record.update(criterion="dense", dense=cfg.dense, criterion_kind="control", criterion_params={},
                      allocation=None, layer_ratios=None, scope=None)
    record["hardware"] = hardware(device)
    world = distributed.world()
    if world.distributed:  # only in runs of several processes, so other records keep their fields
        record["distributed"] = {**world.describe(), "batch_per_process": cfg.budget.batch_size // world.size,
                                 "batchnorm": "per process"}
    return record


def plugin_versions(cfg: RunConfig) -> dict[str, str]:
    out = {}
    for reg, name in ((registry.criteria, cfg.criterion), (registry.architectures, cfg.arch), (registry.datasets, cfg.dataset)):
        e = reg.entries().get(name)
        if e is not None:
            out[f"{reg.kind}:{name}"] = f"{e.distribution} {e.version}"
    return out


def record_value(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list | tuple) else value[part]
    return value


def latency_block(baseline: nn.Module, compressed: nn.Module, example: torch.Tensor, repeats: int,
                  throughput_batch: int, sharing: Sharing | None = None) -> dict[str, Any]:
    """Baseline and compressed latency, measured interleaved in this process at batch 1 and at a
    throughput batch (plus CPU batch 1 for GPU runs). ``measured_under_sharing`` says whether
    other runs shared the device meanwhile (absolute times are then inflated; the interleaved
    ratios less so)."""
    def pair(b: nn.Module, c: nn.Module, x: torch.Tensor, batch: int, reps: int) -> tuple[float, float, str]:
        lb, lc = measure_latency_pair(b, c, x, batch_size=batch, repeats=reps)
        return round(lb.median_ms, 4), round(lc.median_ms, 4), lb.device

    b1, c1, device = pair(baseline, compressed, example, 1, repeats)
    bt, ct, _ = pair(baseline, compressed, example, throughput_batch, max(3, repeats // 4))
    out: dict[str, Any] = {
        "before": {"device": device, "batch1_ms": b1, "throughput_batch": throughput_batch, "throughput_ms": bt},
        "after": {"device": device, "batch1_ms": c1, "throughput_batch": throughput_batch, "throughput_ms": ct},
        "speedup_batch1": round(b1 / max(c1, 1e-9), 4),
        "speedup_throughput": round(bt / max(ct, 1e-9), 4),
        "method": "interleaved medians",
        "measured_under_sharing": bool(sharing and sharing.shared),
    }
    if example.device.type == "cuda":
        cb, cc, cpu = pair(copy.deepcopy(baseline).cpu(), copy.deepcopy(compressed).cpu(), example.cpu(), 1, repeats)
        out["before"]["cpu_batch1_ms"], out["after"]["cpu_batch1_ms"], out["cpu"] = cb, cc, cpu
    return out


def widths(model: nn.Module, layers: list[str]) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {n: int(modules[n].out_channels) for n in layers if n in modules and hasattr(modules[n], "out_channels")}


def check_accuracies(record: dict[str, Any]) -> None:
    for stage in ("baseline", "oneshot", "oneshot_bn", "final"):
        block = record.get(stage)
        if block is not None and not all(checkpoints.finite_number(v) for v in block.values()):
            raise DivergedError(f"{stage} accuracy is not a finite number: {block}")
