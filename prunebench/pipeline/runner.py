"""One run of the protocol: baseline → calibration → compress → one-shot → fine-tune → record.

Every stage follows PROTOCOL.md; the test split is only used for evaluation, and final
(not best) accuracy is reported. The whole configuration is checked before any work
(:mod:`prunebench.pipeline.validation`), the run holds ``<results>/<run_id>.lock`` while it executes,
every training stage and the compression are checked for divergence
(:mod:`prunebench.pipeline.divergence`), and checkpoints are loaded only as checked plain tensors
(:mod:`prunebench.storage.checkpoints`). Any exception still produces a record, with status
``failed`` (or ``diverged``) and the error, stored by :func:`prunebench.results.store.commit`, which
never lets it replace a complete record.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunebench import registry
from prunebench.config.budgets import ADAPTATION_FIELDS, Budget
from prunebench.datasets.base import DataSplits
from prunebench.datasets.streaming import StreamedSplits
from prunebench.errors import CheckpointError, ConfigError, DivergedError, RecordError
from prunebench.pipeline import divergence
from prunebench.pipeline.compress import Meter, compress
from prunebench.pipeline.limits import sigterm_stops, time_limit
from prunebench.pipeline.metrics import (
    accuracy,
    count_macs,
    count_params,
    measure_latency_pair,
    peak_memory_mb,
)
from prunebench.pipeline.surgery import compressed_payload
from prunebench.pipeline.validation import (
    check_data,
    check_dataset_options,
    check_run,
    typed_criterion_params,
    typed_dataset_options,
)
from prunebench.progress import Reporter
from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target
from prunebench.results import store
from prunebench.results.records import hardware, is_complete, non_finite_field, now, run_id, versions
from prunebench.storage import checkpoints
from prunebench.storage.locks import FileLock
from prunebench.training import distributed, threads
from prunebench.training.engine import DeviceData, Recipe, TrainOptions, train
from prunebench.training.precision import check_precision, resolve_precision
from prunebench.training.resume import StageCheckpoint

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.training.streaming import StreamData


@dataclass(frozen=True)
class Sharing:
    """What a run shares its device with: ``runs_per_device`` runs of one sweep at a time
    (``executor``: ``run`` for ``prunebench run``, else the sweep's executor). Not part of the
    run's identity: it changes timings (latency above all), not what is computed."""

    runs_per_device: int = 1
    executor: str = "run"

    def __post_init__(self) -> None:
        if isinstance(self.runs_per_device, bool) or not isinstance(self.runs_per_device, int) \
                or self.runs_per_device < 1:
            raise ConfigError(f"runs per device must be a whole number of at least 1, got {self.runs_per_device!r}")

    @property
    def shared(self) -> bool:
        return self.runs_per_device > 1

    def describe(self) -> dict[str, Any]:
        return {"runs_per_device": self.runs_per_device, "executor": self.executor}


@dataclass(frozen=True)
class RunConfig:
    criterion: str
    arch: str
    budget: Budget
    dataset: str = "digits"
    target: Target = field(default_factory=Target)
    seed: int = 0
    criterion_params: Mapping[str, Any] = field(default_factory=dict)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    allocation: str = "uniform"
    max_layer_ratio: float = 0.9
    layer_ratios: Mapping[str, float] | None = None
    shots: int = 1
    shot_epochs: float = 0.0
    data_dir: Path | None = None
    results_dir: Path = Path("results")
    baseline: Path | str | None = None  # a checkpoint file, or "pretrained" (the model zoo's entry)
    device: str = "auto"
    force: bool = False
    scratch: bool = False  # control: the compressed architecture re-initialised and trained from scratch
    dense: str | None = None  # control: this smaller architecture, trained for the post-compression epochs
    scope: str | None = None  # which layers may be pruned (architecture scopes); None: the default
    precision: str = "auto"  # auto | bf16 | fp32 (prunebench.training.precision); resolved for the run's device
    sharing: Sharing = field(default_factory=Sharing)
    workers: int | None = None  # DataLoader workers per process for streamed datasets (None: automatic)
    # seconds the run may take before it is stopped and recorded as failed (None: no limit); like
    # the paths, not part of the run's identity: it decides whether there is a result, not what it is
    timeout: float | None = None
    round_to: int | None = None  # kept channel counts rounded to multiples of this (score criteria); None: any

    def __post_init__(self) -> None:
        # typed in one place, whether given on the command line (strings) or in a sweep file (TOML
        # values), so that the same settings are the same configuration everywhere (cache keys,
        # records, the leaderboard's grouping); the run id already hashed them typed
        object.__setattr__(self, "dataset_options", typed_dataset_options(self.dataset, self.dataset_options))
        object.__setattr__(self, "criterion_params", typed_criterion_params(self.criterion, self.criterion_params))
        check_precision(self.precision)
        check_timeout(self.timeout)
        if self.round_to is not None and (isinstance(self.round_to, bool) or not isinstance(self.round_to, int)
                                          or self.round_to < 1):
            raise ConfigError(f"round_to must be a whole number >= 1, got {self.round_to!r}")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 0):
            raise ConfigError(f"workers must be a whole number >= 0, got {self.workers!r}")

    def resolved_precision(self) -> str:
        """``bf16`` or ``fp32``: what this run trains in on its device."""
        return resolve_precision(self.precision, self.device)

    @property
    def pretrained(self) -> bool:
        """Does the run start from the model zoo's checkpoint (``--baseline pretrained``)?"""
        return isinstance(self.baseline, str) and self.baseline == PRETRAINED

    def budget_fields(self) -> dict[str, Any]:
        """The budget's resolved numbers that can affect this run (recorded, and hashed into the
        id): the adaptation fields only for runs from a pretrained baseline, so that the ids and
        records of all other runs stay what they were."""
        budget = self.budget.resolved()
        if not self.pretrained:
            for key in ADAPTATION_FIELDS:
                budget.pop(key)
        return budget

    def identity(self) -> dict[str, Any]:
        """What determines the result (paths and flags excluded) — hashed into the run id.

        Criterion hyper-parameters enter resolved (defaults filled in, values typed), dataset
        options typed, so a run given its defaults explicitly is the same run; plug-ins not
        built into prunebench enter with the distribution that provides them.
        """
        budget = self.budget_fields()
        identity = {
            "criterion": self.criterion,
            "criterion_params": resolved_params(self.criterion, self.criterion_params),
            "arch": self.arch,
            "dataset": self.dataset,
            "dataset_options": dict(sorted(check_dataset_options(self.dataset, self.dataset_options).items())),
            "budget": budget,
            "target": dataclasses.asdict(self.target),
            "seed": self.seed,
            "allocation": self.allocation,
            "max_layer_ratio": self.max_layer_ratio,
            "layer_ratios": dict(self.layer_ratios) if self.layer_ratios else None,
            "shots": self.shots,
            "shot_epochs": self.shot_epochs,
            "baseline_file": self.baseline_identity(),
        }
        if self.scope is not None and self.scope != _default_scope(self.arch):
            # only when not the architecture's default, so the ids of default-scope runs stay what they were
            identity["scope"] = self.scope
        if self.round_to is not None and self.round_to > 1:
            # only when given (1 rounds nothing), so the ids of all other runs stay what they were
            identity["round_to"] = self.round_to
        if self.scratch:  # only when set, so the ids of all other runs stay what they were
            identity.update(criterion="scratch", scratch=True, architecture_from=self.criterion)
        if self.dense is not None:  # prunes nothing: no criterion, no target, no pruning options
            identity.update(criterion="dense", dense=self.dense, criterion_params={}, target=None,
                            allocation=None, max_layer_ratio=None, layer_ratios=None, shots=None, shot_epochs=None)
            identity.pop("scope", None)
            identity.pop("round_to", None)
        providers = plugin_providers(self)
        if providers:  # likewise only for plug-ins from other distributions
            identity["plugins"] = providers
        if self.pretrained:
            from prunebench import zoo

            entry = zoo.lookup(self.arch, self.dataset)
            identity["pretrained"] = f"{entry.name}@{entry.sha256[:8]}"
            if self.dense is not None:
                small = zoo.lookup(self.dense, self.dataset)
                identity["dense_pretrained"] = f"{small.name}@{small.sha256[:8]}"
        precision = self.resolved_precision()
        if precision != "fp32":  # fp32 runs keep the ids they had before precision was a choice
            identity["precision"] = precision
        return identity

    def baseline_identity(self) -> str | None:
        """What the baseline contributes to the identity: None (trained), ``pretrained`` (the
        zoo entry enters on its own), or ``sha256:<digest of the file's content>`` for
        ``--baseline FILE``, so that a file replaced at the same path is another run."""
        if not self.baseline:
            return None
        if self.pretrained:
            return PRETRAINED
        return f"sha256:{checkpoints.file_sha256(self.baseline, '--baseline')}"


def check_timeout(value: Any, what: str = "--timeout") -> None:
    """A time limit is a finite number of seconds above 0 (or None: no limit)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a number of seconds above 0, got {value!r}")


#: ``RunConfig.baseline`` value that selects the model zoo's checkpoint
PRETRAINED = "pretrained"


def resolved_params(criterion: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The criterion's hyper-parameters with defaults filled in and values typed."""
    cls = registry.criteria.get(criterion)
    return dict(sorted(cls.from_kwargs(seed=0, **dict(params)).describe().items()))


def plugin_providers(cfg: RunConfig) -> dict[str, str]:
    """``{"criterion": distribution, ...}`` for the plug-ins of ``cfg`` that are not built in."""
    out = {}
    for kind, reg, name in (("criterion", registry.criteria, cfg.criterion),
                            ("architecture", registry.architectures, cfg.arch),
                            ("dataset", registry.datasets, cfg.dataset)):
        dist = reg.provider(name)
        if dist is not None:
            out[kind] = dist
    return out


def _default_scope(arch: str) -> str | None:
    try:
        return registry.architectures.get(arch).default_scope
    except Exception:  # noqa: BLE001 - an unknown architecture fails later, with its own message
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is available")
    return dev


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n is None or n >= x.shape[0]:
        return x, y
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def load_data(cfg: RunConfig, device: torch.device) -> tuple[DataSplits | StreamedSplits, DeviceData | StreamData]:
    """The run's data: on the device (small datasets), or streamed when the dataset returns
    :class:`StreamedSplits` (the dataset chooses). Subsets are taken alike in both."""
    from prunebench.datasets import data_root

    ds = registry.datasets.get(cfg.dataset)
    splits = ds.load(data_root(cfg.data_dir), **dict(cfg.dataset_options))
    if isinstance(splits, StreamedSplits):
        return splits, stream_data(cfg, splits, device)
    # the data subset is fixed (seed 0) so that every seed and criterion sees the same images
    tx, ty = subset(splits.train_x, splits.train_y, cfg.budget.train_subset, 0)
    vx, vy = subset(splits.test_x, splits.test_y, cfg.budget.test_subset, 1)
    c = splits.in_channels
    mean, std = preprocessing(cfg, splits)
    data = DeviceData(
        train_x=tx.to(device), train_y=ty.to(device), test_x=vx.to(device), test_y=vy.to(device),
        mean=torch.tensor(mean, device=device).view(1, c, 1, 1),
        std=torch.tensor(std, device=device).view(1, c, 1, 1),
        hflip=splits.hflip,
    )
    return splits, data


def stream_data(cfg: RunConfig, splits: StreamedSplits, device: torch.device) -> StreamData:
    """A streamed dataset's budget subsets (seeded permutations, as on the device path), its
    normalisation on ``device`` and its loader's worker count."""
    from prunebench.training.streaming import StreamData, default_workers

    def pick(images, n: int | None, seed: int):
        if n is None or n >= len(images):
            return images
        return images.subset(torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n].tolist())

    splits = dataclasses.replace(splits, train=pick(splits.train, cfg.budget.train_subset, 0),
                                 test=pick(splits.test, cfg.budget.test_subset, 1))
    mean, std = preprocessing(cfg, splits)
    c = splits.in_channels
    workers = default_workers() if cfg.workers is None else cfg.workers
    return StreamData(splits, device, torch.tensor(mean, device=device).view(1, c, 1, 1),
                      torch.tensor(std, device=device).view(1, c, 1, 1), workers=workers)


def preprocessing(cfg: RunConfig, splits: DataSplits | StreamedSplits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation (mean, std) for everything the run evaluates and trains: a pretrained
    checkpoint's own, else the dataset's training-split statistics."""
    if cfg.pretrained:
        from prunebench import zoo

        entry = zoo.lookup(cfg.arch, cfg.dataset)
        return tuple(entry.mean), tuple(entry.std)
    return tuple(splits.mean), tuple(splits.std)


_FINETUNE_SCHEDULE = {"step": "step", "constant": "constant"}


def recipe(budget: Budget, stage: str, epochs: float) -> Recipe:
    lr = budget.lr if stage == "baseline" else budget.finetune_lr
    # fine-tuning keeps step and constant schedules; one-cycle baselines fine-tune with cosine decay
    schedule = budget.schedule if stage == "baseline" else _FINETUNE_SCHEDULE.get(budget.schedule, "cosine")
    return Recipe(
        epochs=epochs, lr=lr, batch_size=budget.batch_size, momentum=budget.momentum,
        weight_decay=budget.weight_decay, schedule=schedule, milestones=budget.milestones,
        label_smoothing=budget.label_smoothing,
    )


def evaluate(model: nn.Module, data: DeviceData | StreamData, num_classes: int) -> dict[str, float]:
    ks = (1, 5) if num_classes >= 100 else (1,)
    if isinstance(data, DeviceData):
        acc = accuracy(model, data.normalise(data.test_x), data.test_y, topk=ks)
    else:
        acc = data.evaluate(model, ks)
    return {f"top{k}": round(v, 4) for k, v in acc.items()}


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
    with divergence.training("baseline training", _lr_hint(cfg.budget, "lr")):
        stats = train(
            model, data, recipe(cfg.budget, "baseline", cfg.budget.baseline_epochs), cfg.seed,
            progress=rep.train_callback(cfg.budget.batch_size), description="baseline", options=train_options(cfg),
            checkpoint=partial,
        )
    divergence.check_training(model, stats, "baseline training", _lr_hint(cfg.budget, "lr"))
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


def _lr_hint(budget: Budget, field_name: str) -> str:
    return f"lower the learning rate (now {field_name}={getattr(budget, field_name):g}; --set {field_name}=...)"


def train_options(cfg: RunConfig) -> TrainOptions:
    return TrainOptions(precision=cfg.resolved_precision())


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


def record_value(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list | tuple) else value[part]
    return value


def plugin_versions(cfg: RunConfig) -> dict[str, str]:
    out = {}
    for reg, name in ((registry.criteria, cfg.criterion), (registry.architectures, cfg.arch), (registry.datasets, cfg.dataset)):
        e = reg.entries().get(name)
        if e is not None:
            out[f"{reg.kind}:{name}"] = f"{e.distribution} {e.version}"
    return out


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
        with divergence.training(f"{purpose} training", _lr_hint(budget, "finetune_lr")):
            stats = train(m, data, recipe(budget, "finetune", epochs), cfg.seed + 7, hooks=hooks,
                          progress=rep.train_callback(budget.batch_size), description=purpose, options=train_options(cfg))
        train_seconds["value"] += time.perf_counter() - t0
        divergence.check_training(m, stats, f"{purpose} training", _lr_hint(budget, "finetune_lr"))

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
    record["peak_memory_mb"] = peak_memory_mb(device)
    _check_accuracies(record)
    record["model_file"] = f"models/{rid}.pt"  # relative to the record's folder
    rep.log(f"final top-1 {record['final']['top1']:.2f}% (baseline {record['baseline']['top1']:.2f}%)")
    return compressed_payload(
        cfg.arch, {"num_classes": splits.num_classes, "in_channels": splits.in_channels},
        result.plan, model, list(example.shape), meta={"run_id": rid},
    )


def data_block(splits: DataSplits | StreamedSplits, data: DeviceData | StreamData) -> dict[str, Any]:
    """The record's ``data``: sizes, shape, classes, and a digest of the images and labels the
    run trains and evaluates on (device-resident data only)."""
    block: dict[str, Any] = {"train_images": data.n_train, "test_images": data.n_test,
                             "input_shape": list(splits.input_shape), "num_classes": splits.num_classes}
    if isinstance(data, DeviceData):
        block["sha256"] = checkpoints.weights_sha256(
            {"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x, "test_y": data.test_y})
    return block


def known_baseline_accuracy(info: Mapping[str, Any], num_classes: int) -> dict[str, float] | None:
    """The baseline's top-1 when the adaptation (run now, or cached) already measured it on
    this run's test split with these weights (``top1_after``): evaluating them again gives the
    same number, and costs a pass over the test split per run. None otherwise (top-5 is not
    kept)."""
    adaptation = info.get("adaptation") or {}
    if num_classes >= 100 or adaptation.get("top1_after") is None:
        return None
    return {"top1": float(adaptation["top1_after"])}


def _check_compressed(model: nn.Module, probe: torch.Tensor, criterion: str) -> None:
    """Compression (scores, compensation, factorisation, training drawn from the ledger) must
    leave finite weights and finite outputs."""
    hint = f"criterion {criterion!r} produced them"
    divergence.check_model(model, "compression", hint)
    if probe.numel():
        divergence.check_outputs(model, probe, "compression", hint)


def _check_accuracies(record: dict[str, Any]) -> None:
    for stage in ("baseline", "oneshot", "oneshot_bn", "final"):
        block = record.get(stage)
        if block is not None and not all(checkpoints.finite_number(v) for v in block.values()):
            raise DivergedError(f"{stage} accuracy is not a finite number: {block}")


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
    with divergence.training("scratch training", _lr_hint(cfg.budget, "lr")):
        stats = train(model, data, recipe(cfg.budget, "baseline", epochs), cfg.seed, progress=rep.train_callback(cfg.budget.batch_size),
                      description="scratch", options=train_options(cfg))
    divergence.check_training(model, stats, "scratch training", _lr_hint(cfg.budget, "lr"))
    record["oneshot"] = None
    record["oneshot_bn"] = None
    record["note"] = (f"scratch control: architecture from {cfg.criterion}, re-initialised and trained "
                      f"{epochs:g} epochs with the baseline recipe; no one-shot stage")
    record["ledger"] = {"total_epochs": epochs, "spent": {"scratch": epochs},
                        "baseline_epochs": cfg.budget.baseline_epochs}
