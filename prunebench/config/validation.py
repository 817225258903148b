"""Checks of a whole run configuration, made before any work starts.

``prunebench run`` and ``prunebench sweep`` both call :func:`check_run` on every run before
any data is loaded or any file is written, so a typo or an impossible value is a one-line
:class:`ConfigError` (with a suggestion for misspelt names) instead of a failed record after
minutes or hours of training. Budgets and targets check their own fields when built
(:class:`prunebench.config.budgets.Budget`, :class:`prunebench.protocols.Target`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prunebench import registry
from prunebench.config.options import check_dataset_options
from prunebench.config.run import RunConfig
from prunebench.errors import ConfigError, suggest

ALLOCATIONS = ("uniform", "global", "profile")
#: the largest seed: torch seeds are 64-bit, and a run derives seeds of its stages by adding offsets
MAX_SEED = 2**63 - 1
DEVICES = ("auto", "cpu", "cuda", "mps")


def check_allocation(name: Any) -> str:
    if name not in ALLOCATIONS:
        raise ConfigError(f"unknown allocation {name!r}.{suggest(str(name), ALLOCATIONS)} "
                          f"Available: {', '.join(ALLOCATIONS)}")
    return name


def check_device(name: Any) -> str:
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or another device string torch accepts.
    (Whether a CUDA device is present is checked when the run starts, on the machine that runs it.)"""
    if name == "auto":
        return name
    import torch

    try:
        torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        hint = " For a GPU use 'cuda' (or 'cuda:N')." if str(name).lower().startswith("gpu") else ""
        raise ConfigError(f"unknown device {name!r}.{suggest(str(name), DEVICES)}{hint} "
                          "Use auto, cpu, cuda or cuda:N") from None
    return name


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_profile(profile: Any, source: str = "layer-ratio profile") -> dict[str, float]:
    """A profile is a JSON object ``{layer: fraction}``: finite fractions in [0, 1], not all zero."""
    if not isinstance(profile, Mapping):
        raise ConfigError(f"{source} must be a JSON object {{\"layer\": fraction removed, ...}}, "
                          f"got a {type(profile).__name__}")
    if not profile:
        raise ConfigError(f"{source} names no layer")
    out = {}
    for key, value in profile.items():
        if not _number(value):
            raise ConfigError(f"{source}: the ratio of {key!r} must be a number in [0, 1], got {value!r}")
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{source}: the ratio of {key!r} must lie in [0, 1], got {value}")
        out[str(key)] = float(value)
    if not any(out.values()):
        raise ConfigError(f"{source}: every ratio is 0, so it prunes nothing; give relative ratios above 0")
    return out


def load_profile(spec: str | Path, source: str = "--layer-ratios", base: Path = Path("."),
                 arch: str | None = None) -> dict[str, float]:
    """Read and check a layer-ratio profile: a JSON file (relative to ``base``) or the name of a
    profile shipped with prunebench (:mod:`prunebench.config.profiles`; one written for another
    architecture than ``arch`` is refused)."""
    from prunebench.config import profiles

    path = Path(base) / Path(spec)
    if not path.is_file() and str(spec) in profiles.named_profiles():
        doc = profiles.named_profile(str(spec))
        if arch is not None and doc["arch"] != arch:
            raise ConfigError(f"{source}: profile {str(spec)!r} is for architecture {doc['arch']!r}, not {arch!r}")
        return check_profile(doc["ratios"], f"{source} profile {spec}")
    if not path.is_file():
        names = profiles.named_profiles()
        raise ConfigError(f"{source} file {path} does not exist, and {str(spec)!r} is no named profile."
                          f"{suggest(str(spec), names)} Named profiles: {', '.join(names)}")
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{source} file {path} is not valid JSON ({exc})") from None
    return check_profile(doc, f"{source} file {path}")


def _prunable_layers(arch_name: str) -> list[str]:
    """Every layer some scope of the architecture prunes (a profile may name layers that the
    run's own scope leaves alone: they are ignored, and reported, when the run compresses)."""
    arch = registry.architectures.get(arch_name)
    model = arch.build(num_classes=10, in_channels=3)
    return list(dict.fromkeys(n for s in arch.scope_names() for n in arch.prunable_layers(model, s)))


def check_data(cfg: RunConfig) -> None:
    """The dataset's files are where it looks for them (a cheap look, no decoding), on the
    machine that runs ``cfg``: made by every run before it writes anything, but not when a
    sweep is listed or planned (its runs may execute where the data are)."""
    check_cache()
    check = registry.datasets.get(cfg.dataset).check
    if check is not None:
        from prunebench.datasets import data_root

        check(data_root(cfg.data_dir), **check_dataset_options(cfg.dataset, cfg.dataset_options))


def check_cache() -> None:
    """prunebench's cache folder (``$PRUNEBENCH_CACHE``) is a folder, or can be made one."""
    from prunebench.datasets import cache_dir

    path = cache_dir()
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is" if folder == path else f"lies under {folder}, which is"
                raise ConfigError(f"the cache folder {path} (PRUNEBENCH_CACHE or ~/.cache/prunebench) {what} a "
                                  "file, not a folder; point PRUNEBENCH_CACHE at a folder")
            return


def check_run(cfg: RunConfig) -> None:
    """Everything about ``cfg`` that can be known before loading data; raises ConfigError."""
    criterion = registry.criteria.get(cfg.criterion)
    params = criterion.from_kwargs(seed=0, **dict(cfg.criterion_params)).describe()  # its own checks first
    for key, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"criterion {cfg.criterion!r}: hyper-parameter {key!r} must be a finite number, "
                              f"got {value}")
    registry.architectures.get(cfg.arch).resolve_scope(getattr(cfg, "scope", None))
    check_dataset_options(cfg.dataset, cfg.dataset_options)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {cfg.seed!r}")
    if cfg.seed > MAX_SEED:
        raise ConfigError(f"seed must be at most 2^63 - 1 = {MAX_SEED}, got {cfg.seed}")
    check_allocation(cfg.allocation)
    if not _number(cfg.max_layer_ratio) or not 0.0 < cfg.max_layer_ratio <= 1.0:
        raise ConfigError(f"max_layer_ratio is the most of a layer that may be removed and must lie in (0, 1], "
                          f"got {cfg.max_layer_ratio!r}")
    if cfg.allocation == "profile" and not cfg.layer_ratios:
        raise ConfigError("allocation 'profile' needs per-layer ratios (--layer-ratios FILE)")
    round_to = getattr(cfg, "round_to", None)
    if round_to is not None and round_to > 1 and criterion.kind.value != "score" and getattr(cfg, "dense", None) is None:
        # rounding would be ignored while the record and the run id named it
        raise ConfigError(f"--round-to rounds the widths that score criteria choose; {cfg.criterion!r} is a "
                          f"{criterion.kind.value} criterion and would ignore it")
    if cfg.layer_ratios is not None and criterion.kind.value != "score" and getattr(cfg, "dense", None) is None:
        # an allocate criterion chooses its own per-layer rates, a transform criterion removes no channel:
        # a profile would be ignored while the record and the leaderboard row named it
        raise ConfigError(f"a layer-ratio profile sets the per-layer rates of score criteria; {cfg.criterion!r} is a "
                          f"{criterion.kind.value} criterion and would ignore it")
    if cfg.layer_ratios is not None:
        if cfg.allocation != "profile":
            raise ConfigError(f"layer ratios were given, but the allocation is {cfg.allocation!r}; use 'profile'")
        profile = check_profile(cfg.layer_ratios)
        layers = _prunable_layers(cfg.arch)
        unknown = [k for k in profile if k not in layers]
        if unknown:
            raise ConfigError(f"the layer-ratio profile names layers that {cfg.arch} cannot prune: "
                              f"{', '.join(unknown[:5])}.{suggest(unknown[0], layers)} "
                              f"See `prunebench info --arch {cfg.arch} --layers`")
    if isinstance(cfg.shots, bool) or not isinstance(cfg.shots, int) or cfg.shots < 1:
        raise ConfigError(f"shots must be an integer of at least 1, got {cfg.shots!r}")
    if not _number(cfg.shot_epochs) or cfg.shot_epochs < 0:
        raise ConfigError(f"shot_epochs must be a number of epochs >= 0, got {cfg.shot_epochs!r}")
    between = (cfg.shots - 1) * cfg.shot_epochs
    if criterion.kind.value == "score" and between > cfg.budget.finetune_epochs + 1e-9:
        raise ConfigError(f"{cfg.shots} shots with {cfg.shot_epochs:g} epochs between them need {between:g} "
                          f"epochs, but the budget's ledger holds {cfg.budget.finetune_epochs:g} (finetune_epochs)")
    check_device(cfg.device)
    if getattr(cfg, "dense", None) is not None:
        check_dense(cfg)
    if cfg.pretrained:
        from prunebench import zoo

        zoo.lookup(cfg.arch, cfg.dataset)  # an unknown combination lists the entries
    elif cfg.baseline is not None and not Path(cfg.baseline).is_file():
        raise ConfigError(f"--baseline {cfg.baseline} does not exist" if not Path(cfg.baseline).exists()
                          else f"--baseline {cfg.baseline} is not a file")
    elif cfg.baseline is None and cfg.budget.baseline_epochs <= 0:
        raise ConfigError(f"budget {cfg.budget.name!r} trains no baseline (baseline_epochs=0): use --baseline "
                          "pretrained or --baseline FILE, or set baseline_epochs")


def check_dense(cfg: RunConfig) -> None:
    """The smaller architecture exists, differs from the run's, and (for a pretrained
    baseline) has a checkpoint in the model zoo for the dataset. Raises ConfigError."""
    names = registry.architectures.names()
    if not isinstance(cfg.dense, str) or cfg.dense not in names:
        raise ConfigError(f"unknown dense-control architecture {cfg.dense!r}.{suggest(str(cfg.dense), names)} "
                          "See `prunebench list architectures`")
    if cfg.dense == cfg.arch:
        raise ConfigError(f"the dense control of {cfg.arch} must be another, smaller architecture, got {cfg.dense!r}")
    if cfg.scratch:
        raise ConfigError("a run is either a scratch control or a dense control, not both")
    if cfg.baseline is not None and not cfg.pretrained:
        raise ConfigError("a dense control starts from the zoo's checkpoints (--baseline pretrained) or from "
                          "baselines trained under the budget; --baseline FILE holds the larger network only")
    if cfg.pretrained:
        from prunebench import zoo

        zoo.lookup(cfg.dense, cfg.dataset)  # an unknown combination lists the entries
