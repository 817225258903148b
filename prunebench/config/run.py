"""A run's configuration and its identity: what determines a result, hashed into the run id.

:class:`RunConfig` is built the same way from the command line and from a sweep file (options
and hyper-parameters typed in :mod:`prunebench.config.options`), and :func:`run_id` names a
record after what the run computed (:meth:`RunConfig.identity`), never after paths or flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebench import registry
from prunebench.config.budgets import ADAPTATION_FIELDS, Budget
from prunebench.config.options import check_dataset_options, typed_criterion_params, typed_dataset_options
from prunebench.errors import ConfigError
from prunebench.protocols import Target
from prunebench.storage import checkpoints
from prunebench.training.precision import check_precision, resolve_precision

if TYPE_CHECKING:  # pragma: no cover
    pass


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


def run_id(config: Mapping[str, Any]) -> str:
    """Readable, deterministic id: dataset-arch-criterion-target-budget-seed-<hash of the rest>."""
    blob = json.dumps(config, sort_keys=True, default=str)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
    t = config["target"]
    # a dense control has no target: its id names the smaller architecture instead
    where = f"{config['dense']}" if t is None else f"{t['metric']}{round(t['ratio'] * 100)}"
    return (
        f"{config['dataset']}-{config['arch']}-{config['criterion']}-"
        f"{where}-{config['budget']['name']}-s{config['seed']}-{digest}"
    )


def cfg_run_id(cfg: RunConfig) -> str:
    return run_id(cfg.identity())
