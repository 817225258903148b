"""The baseline a run starts from: the model zoo's checkpoint (adapted where needed),
``--baseline FILE``, a cached checkpoint, or one trained now and cached."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from prunebench.datasets.base import DataSplits
from prunebench.datasets.streaming import StreamedSplits
from prunebench.errors import CheckpointError
from prunebench.pipeline import divergence
from prunebench.pipeline.recipes import lr_hint, recipe, train_options
from prunebench.progress import Reporter
from prunebench.storage import checkpoints
from prunebench.training import distributed
from prunebench.training.engine import DeviceData, train
from prunebench.training.resume import StageCheckpoint

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.config.run import RunConfig
    from prunebench.training.streaming import StreamData


def baseline_key(cfg: RunConfig, splits: DataSplits) -> str:
    import prunebench

    b = cfg.budget
    key = {
        "arch": cfg.arch, "dataset": cfg.dataset, "options": dict(sorted(cfg.dataset_options.items())),
        "n_train": b.train_subset, "epochs": b.baseline_epochs, "lr": b.lr, "batch": b.batch_size,
        "wd": b.weight_decay, "schedule": b.schedule, "milestones": b.milestones, "seed": cfg.seed,
        "ls": b.label_smoothing, "version": prunebench.__version__, "shape": list(splits.input_shape),
    }
    precision = cfg.resolved_precision()
    if precision != "fp32":  # fp32 baselines keep their cache keys
        key["precision"] = precision
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cfg.arch}-{cfg.dataset}-{b.name}-s{cfg.seed}-{digest}"


def get_baseline(
    cfg: RunConfig, model: nn.Module, splits: DataSplits | StreamedSplits, data: DeviceData | StreamData,
    rep: Reporter, expect_file_sha256: str | None = None,
) -> dict[str, Any]:
    """Load the model zoo's checkpoint (adapted where needed), ``--baseline FILE``, a cached
    checkpoint, or train and cache one.

    A given file must hold finite tensors that fit the architecture (else a one-line
    :class:`CheckpointError` naming it), and, with ``expect_file_sha256``, be the content the
    run id names. A cached one that does not fit, or does not match the digest stored when it
    was written, is moved aside and the baseline retrained; a baseline whose training diverges
    is never cached.
    """
    from prunebench.datasets import cache_dir

    if cfg.pretrained:
        from prunebench.pipeline.adaptation import pretrained_baseline

        return pretrained_baseline(cfg, model, splits, data, rep)
    if cfg.baseline is not None:
        path = Path(cfg.baseline)
        data = checkpoints.read_bytes(path, "--baseline")  # hashed and loaded from the same bytes
        digest = hashlib.sha256(data).hexdigest()
        if expect_file_sha256 is not None and digest != expect_file_sha256:
            raise CheckpointError(f"--baseline {path} was changed after the run started (its content is not the "
                                  "one the run id names); run again")
        checkpoints.load_state(model, path, "--baseline", payload=checkpoints.read(path, "--baseline", data=data))
        return {"source": str(path), "file_sha256": digest, "trained_seconds": 0.0}
    path = cache_dir() / "baselines" / f"{baseline_key(cfg, splits)}.pt"
    # one process trains a given baseline; another that needs it waits here, then loads it (a read-only
    # cache that holds it is read without the lock: cached files are whole, written by rename)
    with distributed.main_holds(f"{path}.lock", read_only_ok=path):
        return _cached_or_trained_baseline(cfg, model, data, rep, path)


def _cached_or_trained_baseline(cfg: RunConfig, model: nn.Module, data: DeviceData | StreamData, rep: Reporter,
                                path: Path) -> dict[str, Any]:
    # rank 0 decides and loads; the other ranks of a multi-process run take its weights
    cached = _load_cached_baseline(model, path, rep) if distributed.world().main and path.exists() else None
    cached = distributed.broadcast_object(None if cached is None else {"seconds": cached.get("seconds", 0.0)})
    if cached is not None:
        distributed.broadcast_module(model)
        rep.log(f"baseline: reusing cached checkpoint {path}")
        seconds = cached.get("seconds", 0.0)
        return {"source": "cache", "key": path.stem,
                "trained_seconds": float(seconds) if checkpoints.finite_number(seconds) else 0.0}
    t0 = time.perf_counter()
    # an interrupted training resumes from its partial checkpoint (the lock keeps other processes out)
    partial = StageCheckpoint(path.with_suffix(""), {"stage": "baseline", "key": path.stem}, rep.log) \
        if distributed.world().main and isinstance(data, DeviceData) else None
    with divergence.training("baseline training", lr_hint(cfg.budget, "lr")):
        stats = train(
            model, data, recipe(cfg.budget, "baseline", cfg.budget.baseline_epochs), cfg.seed,
            progress=rep.train_callback(cfg.budget.batch_size), description="baseline", options=train_options(cfg),
            checkpoint=partial,
        )
    divergence.check_training(model, stats, "baseline training", lr_hint(cfg.budget, "lr"))
    seconds = time.perf_counter() - t0
    if distributed.world().main:
        checkpoints.save_with_digest(
            {"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "seconds": seconds}, path
        )
    if partial is not None:
        partial.clear()
    rep.log(f"baseline: trained in {seconds:.1f}s, cached at {path}")
    return {"source": "trained", "key": path.stem, "trained_seconds": round(seconds, 3),
            **{k: v for k, v in stats.items() if checkpoints.finite_number(v)}}


def _load_cached_baseline(model: nn.Module, path: Path, rep: Reporter) -> dict[str, Any] | None:
    """The cached checkpoint loaded into ``model``; None (after moving the file aside to
    ``<name>.corrupt``) when it is unreadable, does not fit, or holds non-finite weights, and
    (after moving it aside to ``<name>.unverified``) when its content is not the one written
    there (the sha256 stored beside it at writing differs, or is missing)."""
    what = "cached baseline"
    try:
        data = checkpoints.read_bytes(path, what)
        payload = checkpoints.read(path, what, data=data)
        state = checkpoints.state_dict(payload, path, what)
        checkpoints.check_finite(state, path, what)
        checkpoints.check_fits(model, state, path, what)
        why = checkpoints.digest_mismatch(path, data)
        if why is not None:
            _set_aside(path, ".unverified", f"{what} {path} {why}", rep)
            return None
        model.load_state_dict(state)
        return {k: v for k, v in payload.items() if k != "state_dict"} if isinstance(payload, Mapping) else {}
    except CheckpointError as exc:
        _set_aside(path, ".corrupt", str(exc), rep)
        return None


def _set_aside(path: Path, suffix: str, why: str, rep: Reporter) -> None:
    """Move a cached checkpoint that cannot be used to ``<name><suffix>`` (kept for inspection),
    so that the baseline is trained again; a file that cannot be moved is a one-line error."""
    aside = path.with_name(path.name + suffix)
    try:
        os.replace(path, aside)
    except OSError as move_exc:
        raise CheckpointError(f"{why}; it could not be moved aside ({move_exc.strerror or move_exc}): "
                              f"delete {path} and run again") from None
    rep.log(f"baseline: {why}; moved to {aside}, training it again")


def known_baseline_accuracy(info: Mapping[str, Any], num_classes: int) -> dict[str, float] | None:
    """The baseline's top-1 when the adaptation (run now, or cached) already measured it on
    this run's test split with these weights (``top1_after``): evaluating them again gives the
    same number, and costs a pass over the test split per run. None otherwise (top-5 is not
    kept)."""
    adaptation = info.get("adaptation") or {}
    if num_classes >= 100 or adaptation.get("top1_after") is None:
        return None
    return {"top1": float(adaptation["top1_after"])}
