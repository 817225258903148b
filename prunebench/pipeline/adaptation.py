"""Pretrained baselines (``--baseline pretrained``) and their adaptation stage.

The run's architecture and dataset pick a zoo entry (:mod:`prunebench.zoo`); its verified
checkpoint is loaded, and the run evaluates and trains with the checkpoint's preprocessing.
When the checkpoint was trained on other data than the run's dataset (official CIFAR-10 for
a ``cifar10-jpeg`` run: JPEG re-encoding shifts the inputs), the baseline is first adapted
by a fine-tune on the run's training split: ``adapt_epochs`` epochs with cosine decay from
``adapt_lr``, the budget's batch size, momentum and weight decay, the usual augmentation.

The adaptation uses one fixed seed (:data:`ADAPT_SEED`), not the run's, so every seed of a
benchmark prunes the same adapted baseline, as every seed prunes the same published
checkpoint. It is done once and cached (``<cache>/baselines/<key>.pt``) under a key of
everything that determines it (entry and its sha256, architecture, dataset and options,
training images, recipe, seed, preprocessing, prunebench version); concurrent runs wait on
a file lock and then load it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from prunebench import zoo
from prunebench.errors import CheckpointError
from prunebench.pipeline import divergence
from prunebench.storage import checkpoints
from prunebench.training import distributed
from prunebench.training.engine import DeviceData, train
from prunebench.training.resume import StageCheckpoint
from prunebench.training.steps import Recipe

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.config.budgets import Budget
    from prunebench.config.run import RunConfig
    from prunebench.datasets.base import DataSplits
    from prunebench.progress import Reporter
    from prunebench.training.engine import DeviceData
    from prunebench.training.streaming import StreamData

#: the seed of every adaptation fine-tune (shared by all run seeds; see the module docstring)
ADAPT_SEED = 0


def adaptation_recipe(budget: Budget) -> Recipe:
    """The adaptation fine-tune: ``adapt_epochs`` with cosine decay from ``adapt_lr``."""
    return Recipe(
        epochs=budget.adapt_epochs, lr=budget.adapt_lr, batch_size=budget.batch_size, momentum=budget.momentum,
        weight_decay=budget.weight_decay, schedule="cosine", label_smoothing=budget.label_smoothing,
    )


def adaptation_key(cfg: RunConfig, entry: zoo.ZooEntry, splits: DataSplits) -> str:
    """Cache key of the adapted baseline: everything that determines its weights."""
    import prunebench

    key = {
        "entry": entry.name, "sha256": entry.sha256, "git_blob": entry.git_blob, "arch": cfg.arch,
        "dataset": cfg.dataset, "options": dict(sorted(cfg.dataset_options.items())),
        "n_train": cfg.budget.train_subset, "recipe": dataclasses.asdict(adaptation_recipe(cfg.budget)),
        "seed": ADAPT_SEED, "mean": list(entry.mean), "std": list(entry.std),
        "version": prunebench.__version__, "shape": list(splits.input_shape),
    }
    precision = cfg.resolved_precision()
    if precision != "fp32":  # fp32 adaptations keep the keys they had before precision was a choice
        key["precision"] = precision
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cfg.arch}-{cfg.dataset}-adapted-{digest}"


def pretrained_baseline(cfg: RunConfig, model: nn.Module, splits: DataSplits, data: DeviceData,
                        rep: Reporter) -> dict[str, Any]:
    """Load the zoo checkpoint for the run into ``model`` and adapt it where its training data
    differ from the run's. Returns ``record["baseline_info"]``."""
    entry = zoo.lookup(cfg.arch, cfg.dataset)
    checkpoint = zoo.load_pretrained(entry, model, cfg.data_dir, num_classes=splits.num_classes)
    model.to(data.device)
    rep.log(f"baseline: pretrained {entry.name} ({checkpoint['file']}, {checkpoint['verified']} verified, "
            f"found in the {checkpoint['found_in']})")
    info: dict[str, Any] = {"source": "pretrained", "zoo": entry.describe(), "checkpoint": checkpoint,
                            "adaptation": None, "trained_seconds": 0.0}
    if entry.needs_adaptation(cfg.dataset):
        info["adaptation"] = adapt(cfg, entry, model, splits, data, rep)
        info["key"] = info["adaptation"]["key"]
        info["trained_seconds"] = info["adaptation"]["seconds"]
    return info


def adapt(cfg: RunConfig, entry: zoo.ZooEntry, model: nn.Module, splits: DataSplits, data: DeviceData,
          rep: Reporter) -> dict[str, Any]:
    """Fine-tune ``model`` (holding the checkpoint) on the run's training split, or load the
    cached result. Returns the record's ``adaptation`` block."""
    from prunebench.datasets import cache_dir
    from prunebench.pipeline.data import evaluate
    from prunebench.pipeline.recipes import train_options

    rcp = adaptation_recipe(cfg.budget)
    evaluated_on = {"test_subset": cfg.budget.test_subset, "test_images": data.n_test}
    block: dict[str, Any] = {
        "epochs": rcp.epochs, "recipe": dataclasses.asdict(rcp), "seed": ADAPT_SEED,
        "precision": cfg.resolved_precision(),
        "train_images": data.n_train, "test_images": evaluated_on["test_images"],
    }
    if rcp.epochs <= 0:
        top1 = evaluate(model, data, splits.num_classes)["top1"]
        return {**block, "top1_before": top1, "top1_after": top1, "seconds": 0.0, "key": None, "cached": False}
    key = adaptation_key(cfg, entry, splits)
    path = cache_dir() / "baselines" / f"{key}.pt"
    # one process (rank 0 of a multi-process run) adapts or loads; the others wait here, then use its result
    with distributed.main_holds(f"{path}.lock", read_only_ok=path):
        read = _read_adapted(path, model, rep) if distributed.world().main and path.exists() else None
        found = distributed.broadcast_object(None if read is None else read[1:])
        if found is not None:
            return _use_adapted(model, None if read is None else read[0], *found, evaluated_on, splits.num_classes,
                                data, rep, path)
        top1_before = evaluate(model, data, splits.num_classes)["top1"]
        rep.log(f"adapting {entry.name} ({entry.trained_on} → {cfg.dataset}): {rcp.epochs:g} epochs, "
                f"lr {rcp.lr:g} cosine, seed {ADAPT_SEED}; top-1 before {top1_before:.2f}%")
        t0 = time.perf_counter()
        hint = f"lower the learning rate (now adapt_lr={rcp.lr:g}; --set adapt_lr=...)"
        # an interrupted adaptation resumes from its partial checkpoint (the lock keeps other processes out)
        partial = StageCheckpoint(path.with_suffix(""), {"stage": "adaptation", "key": key}, rep.log) \
            if distributed.world().main and isinstance(data, DeviceData) else None
        with divergence.training("adaptation", hint):
            stats = train(model, data, rcp, ADAPT_SEED, progress=rep.train_callback(rcp.batch_size),
                          description="adapt", options=train_options(cfg), checkpoint=partial)
        divergence.check_training(model, stats, "adaptation", hint)
        seconds = round(time.perf_counter() - t0, 3)
        top1_after = evaluate(model, data, splits.num_classes)["top1"]
        block.update(top1_before=top1_before, top1_after=top1_after, seconds=seconds, key=key)
        if distributed.world().main:
            checkpoints.save_with_digest({"state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                                          "adaptation": json.dumps(block), "evaluated_on": json.dumps(evaluated_on)},
                                         path)
        if partial is not None:
            partial.clear()
    rep.log(f"adapted in {seconds:.1f}s: top-1 {top1_before:.2f}% → {top1_after:.2f}%, cached at {path}")
    return {**block, "cached": False}


def _read_adapted(path: Path, model: nn.Module, rep: Reporter) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
    """(state dict, stored block, what it was evaluated on) of a cached adaptation that fits
    ``model``; None, after
    moving the file aside to ``<name>.corrupt``, when it is unusable."""
    what = "cached adapted baseline"
    try:
        data = checkpoints.read_bytes(path, what)
        payload = checkpoints.read(path, what, data=data)
        stored = json.loads(payload["adaptation"])
        evaluated_on = json.loads(payload["evaluated_on"])
        state = checkpoints.state_dict(payload, path, what)
        checkpoints.check_finite(state, path, what)
        checkpoints.check_fits(model, state, path, what)
    except (CheckpointError, KeyError, TypeError, ValueError) as exc:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        rep.log(f"baseline: {what} {path} is unusable ({exc}); moved to {aside}, adapting again")
        return None
    why = checkpoints.digest_mismatch(path, data)
    if why is not None:  # written by another hand than prunebench's, or changed since
        aside = path.with_name(path.name + ".unverified")
        os.replace(path, aside)
        rep.log(f"baseline: {what} {path} {why}; moved to {aside}, adapting again")
        return None
    return state, stored, evaluated_on


def _use_adapted(model: nn.Module, state: dict[str, Any] | None, stored: dict[str, Any], stored_on: dict[str, Any],
                 evaluated_on: dict[str, Any], num_classes: int, data: DeviceData | StreamData, rep: Reporter,
                 path: Path) -> dict[str, Any]:
    """Load the cached adaptation (``state``: rank 0's; the other ranks receive its weights)
    into ``model``, which holds the checkpoint; re-measure the accuracies when they were
    measured on another test split. Returns the record's ``adaptation`` block."""
    from prunebench.pipeline.data import evaluate

    same_test = stored_on == evaluated_on
    if not same_test:  # measured on another test split: measure both on this run's
        stored["top1_before"] = evaluate(model, data, num_classes)["top1"]
    if state is not None:
        model.load_state_dict(state)
    model.to(data.device)
    distributed.broadcast_module(model)
    if not same_test:
        stored["top1_after"] = evaluate(model, data, num_classes)["top1"]
        stored["test_images"] = evaluated_on["test_images"]
    rep.log(f"baseline: reusing the adapted checkpoint {path}")
    return {**stored, "cached": True}
