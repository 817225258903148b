"""One run of the protocol: baseline → calibration → compress → one-shot → fine-tune → record.

Every stage follows PROTOCOL.md; the test split is only used for evaluation, and final
(not best) accuracy is reported. The whole configuration is checked before any work
(:mod:`prunebench.config.validation`), the run holds ``<results>/<run_id>.lock`` while it executes,
every training stage and the compression are checked for divergence
(:mod:`prunebench.pipeline.divergence`), and checkpoints are loaded only as checked plain tensors
(:mod:`prunebench.storage.checkpoints`). Any exception still produces a record, with status
``failed`` (or ``diverged``) and the error, stored by :func:`prunebench.results.store.commit`, which
never lets it replace a complete record.
"""

from __future__ import annotations

import copy
import json
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunebench import registry
from prunebench.config.run import RunConfig, run_id
from prunebench.config.validation import check_data, check_run
from prunebench.errors import ConfigError, DivergedError, RecordError
from prunebench.pipeline import divergence
from prunebench.pipeline.baseline import get_baseline, known_baseline_accuracy
from prunebench.pipeline.compress import compress
from prunebench.pipeline.data import data_block, evaluate, load_data, resolve_device
from prunebench.pipeline.limits import sigterm_stops, time_limit
from prunebench.pipeline.meter import Meter
from prunebench.pipeline.metrics import (
    count_macs,
    count_params,
    peak_memory_mb,
)
from prunebench.pipeline.recipes import lr_hint, recipe, train_options
from prunebench.pipeline.record import base_record, check_accuracies, latency_block, record_value, widths
from prunebench.pipeline.surgery import compressed_payload
from prunebench.progress import Reporter
from prunebench.protocols import Calibration, CompressionContext, EpochLedger
from prunebench.results import store
from prunebench.results.records import is_complete, non_finite_field, now
from prunebench.storage import checkpoints
from prunebench.storage.locks import FileLock
from prunebench.training import distributed, threads
from prunebench.training.engine import DeviceData, train

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.training.streaming import StreamData


def execute(cfg: RunConfig, reporter: Reporter | None = None, *, locked: bool = False) -> tuple[dict[str, Any], Path]:
    """Run the protocol once and store the record. Returns (record, record path).

    The configuration is checked and the results directory probed before any work. The run
    holds ``<results>/<run_id>.lock`` while it executes (waiting for another process that
    holds it); a caller that already holds it passes ``locked=True``.

    In a run of several processes (:mod:`prunebench.training.distributed`) every rank calls this;
    rank 0 holds the lock (unless the launcher does: ``locked=True``) and writes the record.
    """
    rep = reporter or Reporter()
    check_run(cfg)
    world = distributed.world()
    device = distributed.device_for(resolve_device(cfg.device))
    if world.distributed:
        check_distributed(cfg, world.size)
    check_data(cfg)
    identity = cfg.identity()
    rid = run_id(identity)
    results = Path(cfg.results_dir)
    out_path = store.record_path(results, rid)
    if (locked or not world.distributed) and is_complete(out_path) and not cfg.force:
        return _already_complete(out_path, rep)
    store.check_results_dir(results)
    if locked:
        return _execute_holding_lock(cfg, rep, device, identity, rid)
    if world.distributed:  # started by torchrun itself: rank 0 holds the run's lock for all ranks
        with distributed.main_holds(results / f"{rid}.lock"):
            if distributed.broadcast_object(is_complete(out_path) and not cfg.force):
                return _already_complete(out_path, rep)
            return _execute_holding_lock(cfg, rep, device, identity, rid)
    lock = FileLock(results / f"{rid}.lock")
    if not lock.acquire(blocking=False):
        rep.log(f"another process is running {rid} (it holds {lock.path}); waiting for it to finish")
        lock.acquire()
    try:
        if is_complete(out_path) and not cfg.force:  # it may have just completed it
            return _already_complete(out_path, rep)
        return _execute_holding_lock(cfg, rep, device, identity, rid)
    finally:
        lock.release()


def _already_complete(path: Path, rep: Reporter) -> tuple[dict[str, Any], Path]:
    rep.log(f"already complete: {path} (use --force to re-run)")
    with open(path) as f:
        return json.load(f), path


def check_distributed(cfg: RunConfig, processes: int) -> None:
    """A run of several processes needs a streamed dataset and a batch the processes share evenly."""
    ds = registry.datasets.get(cfg.dataset)
    if not ds.streamed:
        streamed = ", ".join(n for n in registry.datasets.names() if _streamed(n))
        raise ConfigError(f"dataset {cfg.dataset!r} lives on the device and trains in one process; several "
                          f"processes need a streamed dataset ({streamed})")
    if cfg.budget.batch_size % processes:
        raise ConfigError(f"batch_size {cfg.budget.batch_size} (the global batch) must be a multiple of the "
                          f"{processes} processes; --set batch_size=...")


def _streamed(name: str) -> bool:
    try:
        return registry.datasets.get(name).streamed
    except Exception:  # noqa: BLE001 - a broken plug-in is simply not listed
        return False


def _execute_holding_lock(cfg: RunConfig, rep: Reporter, device: torch.device, identity: dict[str, Any],
                          rid: str) -> tuple[dict[str, Any], Path]:
    results = Path(cfg.results_dir)
    main = distributed.world().main  # only rank 0 writes
    if main:
        store.remove_partial_files(results, rid)
    record = base_record(cfg, rid, identity, device)
    criterion = registry.criteria.get(cfg.criterion).from_kwargs(seed=cfg.seed, **dict(cfg.criterion_params))
    arch = registry.architectures.get(cfg.arch)
    rep.header(record)
    with sigterm_stops():  # SIGTERM, like Ctrl-C, records the attempt on its way out
        return _execute_recorded(cfg, criterion, arch, device, record, rep, rid, results, main)


def _execute_recorded(cfg: RunConfig, criterion, arch, device: torch.device, record: dict[str, Any], rep: Reporter,
                      rid: str, results: Path, main: bool) -> tuple[dict[str, Any], Path]:
    threads.take_history()  # what this run's stages use, from here on
    try:
        with time_limit(cfg.timeout):
            if cfg.dense is not None:
                from prunebench.pipeline.dense import execute_dense

                model = execute_dense(cfg, device, record, rep, rid)
            else:
                model = _execute(cfg, criterion, arch, device, record, rep, rid)
            bad = non_finite_field(record)
            if bad is not None:  # never published as a result (and written as null, see records.dumps)
                raise RecordError(f"the record's {bad} is not a finite number ({record_value(record, bad)!r}); "
                                  "a run with non-finite numbers is not a result")
        record["status"] = "complete"
    except BaseException as exc:
        record["status"] = "diverged" if isinstance(exc, DivergedError) else "failed"
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc(limit=20)
        record["finished"] = now()
        if main:
            try:
                path = store.commit(results, rid, record, None, rep.log)
                rep.log(f"run {record['status']}; record written to {path}")
            except Exception as write_exc:  # noqa: BLE001 - the run's own error matters more; say what was lost
                rep.log(f"run {record['status']}; its record could not be written ({write_exc})")
        raise
    record["finished"] = now()
    record["threads"] = threads.take_history()  # chosen per training stage; not part of the run id
    record["stage_seconds"] = rep.close_stage()  # wall time per stage (the writes that follow excluded)
    if not main:
        return record, store.record_path(results, rid)
    path = store.commit(results, rid, record, model, rep.log)
    warning = store.model_warning(record, path)
    if warning:
        rep.warn(warning)
    return record, path


def _execute(cfg, criterion, arch, device, record, rep: Reporter, rid: str) -> dict[str, Any]:
    """The stages; fills ``record`` and returns the compressed-model payload to store."""
    torch.manual_seed(cfg.seed)
    budget = cfg.budget
    rep.stage("data")
    splits, data = load_data(cfg, device)
    record["data"] = data_block(splits, data)
    model = arch.build(num_classes=splits.num_classes, in_channels=splits.in_channels).to(device)
    example = torch.zeros(1, *splits.input_shape, device=device)

    rep.stage("baseline")
    named = str(record["identity"].get("baseline_file") or "")  # the --baseline content the run id names
    expect = named.removeprefix("sha256:") if named.startswith("sha256:") else None
    record["baseline_info"] = get_baseline(cfg, model, splits, data, rep, expect_file_sha256=expect)
    # the weights the run starts from, whatever their source
    record["baseline_info"]["weights_sha256"] = checkpoints.weights_sha256(model.state_dict())
    model.to(device)
    rep.close_stage("baseline evaluation")
    record["baseline"] = known_baseline_accuracy(record["baseline_info"], splits.num_classes) \
        or evaluate(model, data, splits.num_classes)
    rep.log(f"baseline top-1 {record['baseline']['top1']:.2f}%")
    baseline_model = copy.deepcopy(model)
    macs_before, params_before = count_macs(model, example), count_params(model)
    tb = min(64, budget.batch_size)

    rep.stage("calibration")
    ncal = min(budget.calibration_size, data.n_train)
    cidx = torch.randperm(data.n_train, generator=torch.Generator().manual_seed(cfg.seed + 1000))[:ncal]
    if isinstance(data, DeviceData):
        images, labels = data.normalise(data.train_x[cidx.to(device)]), data.train_y[cidx.to(device)]
    else:  # decoded with the evaluation preprocessing, identically on every rank
        images, labels = data.calibration(cidx.tolist())
    calibration = Calibration(images=images, labels=labels, batch_size=min(128, ncal))

    ledger = EpochLedger(total=float(budget.finetune_epochs))
    train_seconds = {"value": 0.0}

    def ctx_train(m: nn.Module, epochs: float, hooks=None, purpose: str = "compress") -> None:
        ledger.draw(epochs, purpose)
        t0 = time.perf_counter()
        with divergence.training(f"{purpose} training", lr_hint(budget, "finetune_lr")):
            stats = train(m, data, recipe(budget, "finetune", epochs), cfg.seed + 7, hooks=hooks,
                          progress=rep.train_callback(budget.batch_size), description=purpose, options=train_options(cfg))
        train_seconds["value"] += time.perf_counter() - t0
        divergence.check_training(m, stats, f"{purpose} training", lr_hint(budget, "finetune_lr"))

    target = cfg.target
    meter = Meter(baseline_model, example, target)
    prunable = arch.prunable_layers(model, cfg.scope)
    protected = arch.protected(model)
    ctx = CompressionContext(
        example_inputs=example, calibration=calibration, target=target, device=device, seed=cfg.seed,
        prunable=prunable, protected=protected, ledger=ledger, reduction=meter.reduction,
        reduction_of=lambda kept: meter.reduction_of(model, kept), train=ctx_train, log=rep.log,
    )

    rep.stage(f"compress ({criterion.name}, {target.metric} -{target.ratio:.0%})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = compress(criterion, model, ctx, meter, allocation=cfg.allocation,
                      max_ratio=cfg.max_layer_ratio, profile=cfg.layer_ratios,
                      shots=cfg.shots, shot_epochs=cfg.shot_epochs, round_to=cfg.round_to)
    compress_seconds = time.perf_counter() - t0
    model = result.model.to(device)
    distributed.agree_on_model(model, "compression")
    _check_compressed(model, calibration.images[:8], criterion.name)
    record["criterion_seconds"] = round(compress_seconds - train_seconds["value"], 4)
    record["compress_train_seconds"] = round(train_seconds["value"], 4)
    record["compress_peak_memory_mb"] = peak_memory_mb(device)
    record["knob"] = result.knob
    record["search_evaluations"] = result.search_evaluations

    if cfg.scratch:
        train_from_scratch(cfg, model, data, record, rep)
    else:
        rep.close_stage("one-shot evaluation")
        record["oneshot"] = evaluate(model, data, splits.num_classes)
        rep.log(f"one-shot top-1 {record['oneshot']['top1']:.2f}% (achieved {result.achieved:.2%} {target.metric} ↓)")
        rep.close_stage("BN re-estimation")
        record["oneshot_bn"] = oneshot_bn(model, calibration, data, splits.num_classes)
        if record["oneshot_bn"] is not None:
            rep.log(f"one-shot + BN re-estimation top-1 {record['oneshot_bn']['top1']:.2f}%")

        rep.stage("fine-tune")
        remaining = ledger.remaining
        if remaining > 1e-9:
            ctx_train(model, remaining, purpose="finetune")
        record["ledger"] = {"total_epochs": ledger.total, "spent": dict(ledger.spent),
                            "baseline_epochs": budget.baseline_epochs}
    rep.close_stage("final evaluation")
    record["final"] = evaluate(model, data, splits.num_classes)

    rep.close_stage("counting and latency")
    macs_after, params_after = count_macs(model, example), count_params(model)
    record["macs"] = {"before": macs_before, "after": macs_after}
    record["params"] = {"before": params_before, "after": params_after}
    record["achieved"] = {
        "macs_reduction": round(1 - macs_after / macs_before, 6),
        "params_reduction": round(1 - params_after / params_before, 6),
        "within_tolerance": abs(result.achieved - target.ratio) <= target.tolerance + 1e-12,
    }
    record["latency"] = latency_block(baseline_model, model, example, budget.latency_repeats, tb, cfg.sharing) \
        if distributed.world().main else None  # only rank 0's record is written
    rep.close_stage("model file")
    record["widths"] = widths(model, prunable)
    record["plan_steps"] = len(result.plan)
    # a factorised model's shapes (its replace steps) rebuild it without its model file
    replacements = [step for step in result.plan if step.get("op") == "replace"]
    if replacements:
        record["replacements"] = replacements
    record["peak_memory_mb"] = peak_memory_mb(device)
    check_accuracies(record)
    record["model_file"] = f"models/{rid}.pt"  # relative to the record's folder
    rep.log(f"final top-1 {record['final']['top1']:.2f}% (baseline {record['baseline']['top1']:.2f}%)")
    return compressed_payload(
        cfg.arch, {"num_classes": splits.num_classes, "in_channels": splits.in_channels},
        result.plan, model, list(example.shape), meta={"run_id": rid},
    )


def _check_compressed(model: nn.Module, probe: torch.Tensor, criterion: str) -> None:
    """Compression (scores, compensation, factorisation, training drawn from the ledger) must
    leave finite weights and finite outputs."""
    hint = f"criterion {criterion!r} produced them"
    divergence.check_model(model, "compression", hint)
    if probe.numel():
        divergence.check_outputs(model, probe, "compression", hint)


def oneshot_bn(model: nn.Module, calibration: Calibration, data: DeviceData | StreamData,
               num_classes: int) -> dict[str, float] | None:
    """One-shot accuracy after re-estimating BatchNorm statistics on the calibration images
    (adaptive BN, EagleEye). Measured on a copy: the fine-tune starts from the compressed model
    as it is, so the one-shot and final columns do not depend on this one. None without BatchNorm."""
    from prunebench.pipeline.adaptive_bn import batchnorms, recalibrate_bn

    if not batchnorms(model):
        return None
    probe = copy.deepcopy(model)
    recalibrate_bn(probe, calibration.images, batch_size=calibration.batch_size)
    return evaluate(probe, data, num_classes)


def train_from_scratch(cfg: RunConfig, model: nn.Module, data: DeviceData | StreamData, record: dict[str, Any],
                       rep: Reporter) -> None:
    """Scratch control: re-initialise every parameter of the compressed model and train it for
    the whole budget (baseline + fine-tune epochs) with the baseline recipe. No one-shot stage."""
    epochs = cfg.budget.baseline_epochs + cfg.budget.finetune_epochs
    rep.stage(f"scratch: re-initialise, train {epochs:g} epochs")
    torch.manual_seed(cfg.seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with divergence.training("scratch training", lr_hint(cfg.budget, "lr")):
        stats = train(model, data, recipe(cfg.budget, "baseline", epochs), cfg.seed, progress=rep.train_callback(cfg.budget.batch_size),
                      description="scratch", options=train_options(cfg))
    divergence.check_training(model, stats, "scratch training", lr_hint(cfg.budget, "lr"))
    record["oneshot"] = None
    record["oneshot_bn"] = None
    record["note"] = (f"scratch control: architecture from {cfg.criterion}, re-initialised and trained "
                      f"{epochs:g} epochs with the baseline recipe; no one-shot stage")
    record["ledger"] = {"total_epochs": epochs, "spent": {"scratch": epochs},
                        "baseline_epochs": cfg.budget.baseline_epochs}
