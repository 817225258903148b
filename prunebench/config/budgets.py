"""Named training budgets (PROTOCOL.md); every field can be overridden from the CLI."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from prunebench.errors import ConfigError, suggest


@dataclass(frozen=True)
class Budget:
    name: str
    baseline_epochs: float
    finetune_epochs: float  # the post-baseline ledger, equal for every criterion
    batch_size: int
    lr: float  # baseline peak learning rate
    finetune_lr: float
    momentum: float
    weight_decay: float
    schedule: str  # "step" (drops x0.1 at milestones) | "onecycle" | "cosine" | "constant"
    milestones: tuple[float, ...]  # fractions of training, for "step"
    train_subset: int | None  # None = full split
    test_subset: int | None
    calibration_size: int  # images of the training split shown to criteria
    latency_repeats: int
    label_smoothing: float = 0.0
    # pretrained baselines (--baseline pretrained) whose training data differ from the run's:
    # the adaptation fine-tune on the run's training split (cosine decay from adapt_lr)
    adapt_epochs: float = 4.0
    adapt_lr: float = 0.02

    def __post_init__(self) -> None:
        check_budget(self)

    def override(self, **changes: str | float | int | None) -> Budget:
        fields = {f.name: f for f in dataclasses.fields(self)}
        typed = {}
        for key, value in changes.items():
            if key not in fields or key == "name":
                raise ConfigError(
                    f"budget has no field {key!r}.{suggest(key, fields)} "
                    f"Fields: {', '.join(k for k in fields if k != 'name')}"
                )
            typed[key] = _parse(key, value, getattr(self, key))
        return dataclasses.replace(self, **typed) if typed else self

    def resolved(self) -> dict:
        return dataclasses.asdict(self)


SCHEDULES = ("step", "onecycle", "cosine", "constant")


def check_budget(b: Budget) -> None:
    """Every field in its range, so a bad override fails before any work (ConfigError)."""
    def bad(key: str, need: str) -> ConfigError:
        return ConfigError(f"budget {b.name!r}: {key} {need}, got {getattr(b, key)!r}")

    def number(key: str) -> float:
        value = getattr(b, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise bad(key, "must be a finite number")
        return value

    def integer(key: str, low: int) -> None:
        value = getattr(b, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise bad(key, f"must be an integer >= {low}")

    for key in ("baseline_epochs", "finetune_epochs", "weight_decay", "adapt_epochs"):
        if number(key) < 0:
            raise bad(key, "must be >= 0")
    for key in ("lr", "finetune_lr", "adapt_lr"):
        if number(key) <= 0:
            raise bad(key, "must be > 0")
    if not 0 <= number("momentum") < 1:
        raise bad("momentum", "must lie in [0, 1)")
    if not 0 <= number("label_smoothing") < 1:
        raise bad("label_smoothing", "must lie in [0, 1)")
    integer("batch_size", 1)
    integer("calibration_size", 1)
    integer("latency_repeats", 1)
    for key in ("train_subset", "test_subset"):
        if getattr(b, key) is not None:
            integer(key, 1)
    if b.schedule not in SCHEDULES:
        raise ConfigError(f"budget {b.name!r}: unknown schedule {b.schedule!r}.{suggest(str(b.schedule), SCHEDULES)} "
                          f"Available: {', '.join(SCHEDULES)}")
    ms = b.milestones
    if not isinstance(ms, tuple) or any(isinstance(m, bool) or not isinstance(m, int | float) or not 0 < m < 1
                                        for m in ms) or list(ms) != sorted(ms):
        raise bad("milestones", "must be increasing fractions of training in (0, 1), e.g. 0.5,0.75")


#: budget fields that only matter to runs from a pretrained baseline (left out of other runs' ids)
ADAPTATION_FIELDS = ("adapt_epochs", "adapt_lr")


def _parse(key: str, value, current):
    if not isinstance(value, str):
        return value
    try:
        if value.lower() in ("none", "full", "all"):
            return None
        if isinstance(current, tuple):
            return tuple(float(v) for v in value.split(",") if v)
        if isinstance(current, bool):
            return value.lower() in ("1", "true", "yes")
        if isinstance(current, int) or key in ("train_subset", "test_subset"):
            return int(value)
        if isinstance(current, float):
            return float(value)
    except ValueError:
        raise ConfigError(f"budget field {key!r}: cannot parse {value!r}") from None
    return value


BUDGETS: dict[str, Budget] = {
    # The first run (`prunebench run` without --budget): a converged digits baseline in well under a minute.
    "demo": Budget(
        name="demo", baseline_epochs=10, finetune_epochs=3, batch_size=64, lr=0.05, finetune_lr=0.01,
        momentum=0.9, weight_decay=5e-4, schedule="onecycle", milestones=(),
        train_subset=None, test_subset=None, calibration_size=256, latency_repeats=5,
    ),
    "smoke": Budget(
        name="smoke", baseline_epochs=3, finetune_epochs=2, batch_size=64, lr=0.02, finetune_lr=0.02,
        momentum=0.9, weight_decay=5e-4, schedule="onecycle", milestones=(),
        train_subset=512, test_subset=256, calibration_size=128, latency_repeats=5,
    ),
    # A CPU-sized subset budget: real data, honest about being a subset (5k train / 2k test).
    "cpu": Budget(
        name="cpu", baseline_epochs=10, finetune_epochs=3, batch_size=128, lr=0.1, finetune_lr=0.01,
        momentum=0.9, weight_decay=5e-4, schedule="onecycle", milestones=(),
        train_subset=5000, test_subset=2000, calibration_size=512, latency_repeats=20,
    ),
    # Pretrained baselines on a CPU (--baseline pretrained): the full test split, a fraction of an epoch
    # of fine-tuning on the full training split; trains no baseline of its own (baseline_epochs=0).
    "cpu-pretrained": Budget(
        name="cpu-pretrained", baseline_epochs=0, finetune_epochs=0.25, batch_size=128, lr=0.1, finetune_lr=0.01,
        momentum=0.9, weight_decay=5e-4, schedule="cosine", milestones=(),
        train_subset=None, test_subset=None, calibration_size=1024, latency_repeats=20,
        adapt_epochs=4.0, adapt_lr=0.02,
    ),
    # The same with four times the fine-tune: does a ranking made after 0.25 epoch hold after a longer one?
    "cpu-pretrained-long": Budget(
        name="cpu-pretrained-long", baseline_epochs=0, finetune_epochs=1.0, batch_size=128, lr=0.1,
        finetune_lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine", milestones=(),
        train_subset=None, test_subset=None, calibration_size=1024, latency_repeats=20,
        adapt_epochs=4.0, adapt_lr=0.02,
    ),
    "fast": Budget(
        name="fast", baseline_epochs=30, finetune_epochs=15, batch_size=256, lr=0.2, finetune_lr=0.02,
        momentum=0.9, weight_decay=5e-4, schedule="onecycle", milestones=(),
        train_subset=None, test_subset=None, calibration_size=1024, latency_repeats=50,
    ),
    "standard": Budget(
        name="standard", baseline_epochs=200, finetune_epochs=100, batch_size=128, lr=0.1, finetune_lr=0.01,
        momentum=0.9, weight_decay=5e-4, schedule="step", milestones=(0.5, 0.75),
        train_subset=None, test_subset=None, calibration_size=1024, latency_repeats=100,
    ),
    # ImageNet from torchvision's pretrained weights (--baseline pretrained), global batch 256 over all
    # processes. Everyday comparison: a few cosine fine-tune epochs.
    "imagenet-short": Budget(
        name="imagenet-short", baseline_epochs=0, finetune_epochs=4, batch_size=256, lr=0.1, finetune_lr=0.01,
        momentum=0.9, weight_decay=1e-4, schedule="cosine", milestones=(),
        train_subset=None, test_subset=None, calibration_size=1024, latency_repeats=50,
    ),
    # The papers' scale: 90 epochs of torchvision's ResNet recipe (lr 0.1, x0.1 after epochs 30 and 60,
    # weight decay 1e-4, batch 256) as the fine-tune; the same recipe trains a baseline when none is given.
    "imagenet-paper": Budget(
        name="imagenet-paper", baseline_epochs=90, finetune_epochs=90, batch_size=256, lr=0.1, finetune_lr=0.1,
        momentum=0.9, weight_decay=1e-4, schedule="step", milestones=(1 / 3, 2 / 3),
        train_subset=None, test_subset=None, calibration_size=1024, latency_repeats=100,
    ),
}


#: the budget of `prunebench run` and `prunebench baseline` without --budget
DEFAULT_BUDGET = "demo"


def get_budget(name: str, overrides: dict[str, str] | None = None) -> Budget:
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}.{suggest(name, BUDGETS)} Available: {', '.join(BUDGETS)}")
    return BUDGETS[name].override(**(overrides or {}))
