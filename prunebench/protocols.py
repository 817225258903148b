"""The criterion contract: what a pruning criterion receives, returns, and may hook into.

This module is the single written contract between prunebench's harness and every
criterion, built-in or third-party (compare pytest's ``hookspec.py``). Three kinds:

* **score** (:class:`ScoreCriterion`): per-output-channel importance for each prunable
  convolution. The harness turns scores into a removal plan (uniform per-layer ratio or
  global ranking), meets the MACs/params target by bisection and removes channels through
  torch-pruning's DependencyGraph, so every score criterion gets identical surgery.
* **allocate** (:class:`AllocateCriterion`): the criterion decides how many (and which)
  channels each layer keeps, e.g. by a greedy whole-network search. It returns the kept
  indices per layer; the harness performs the surgery and checks the target.
* **transform** (:class:`TransformCriterion`): replaces modules by factorised ones. It
  exposes one scalar knob (energy threshold, rank fraction...) that the harness bisects to
  meet the target, and may hook into training (:class:`TrainingHooks`).

Hyper-parameters are declared as a frozen dataclass named ``Params`` on the criterion
class; unknown names are rejected when the criterion is built, before any training.
"""

from __future__ import annotations

import dataclasses
import enum
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from prunebench.errors import ConfigError, suggest


class Kind(str, enum.Enum):
    SCORE = "score"
    ALLOCATE = "allocate"
    TRANSFORM = "transform"


@dataclass(frozen=True)
class Target:
    """What compression must achieve: ``ratio`` of baseline MACs (or params) removed."""

    metric: str = "macs"  # "macs" | "params"
    ratio: float = 0.5
    tolerance: float = 0.01  # the harness guarantees |achieved - ratio| <= tolerance

    def __post_init__(self) -> None:
        if self.metric not in ("macs", "params"):
            raise ConfigError(f"target metric must be 'macs' or 'params', got {self.metric!r}")
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(
                f"target ratio is the fraction removed and must lie in (0, 1), got {self.ratio}"
            )
        if not 0.0 <= self.tolerance < 1.0:  # also rejects NaN
            raise ConfigError(f"target tolerance is |achieved - target| allowed and must lie in [0, 1), "
                              f"got {self.tolerance}")


@dataclass
class Calibration:
    """A fixed, seeded subset of the *training* split, already normalised, on the run's device.

    The test split never reaches a criterion.
    """

    images: Tensor
    labels: Tensor
    batch_size: int = 128

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, len(self), self.batch_size):
            yield (
                self.images[start : start + self.batch_size],
                self.labels[start : start + self.batch_size],
            )


class TrainingHooks:
    """Optional hooks a criterion may place into the training loop (all default to no-ops).

    The engine calls them in this order for every optimisation step::

        loss = criterion_loss(outputs, labels) + (hooks.extra_loss(model) or 0)
        loss.backward();  hooks.after_backward(model, step)   # e.g. add a sub-gradient
        optimizer.step(); hooks.after_step(model, step)        # e.g. a projection

    and ``hooks.on_train_end(model)`` once after the last step.
    """

    def extra_loss(self, model: nn.Module) -> Tensor | None:
        return None

    def after_backward(self, model: nn.Module, step: int) -> None:
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        return None

    def on_train_end(self, model: nn.Module) -> None:
        return None


@dataclass
class EpochLedger:
    """Training epochs after the baseline: equal in total for every criterion.

    ``total`` is the budget's fine-tune epochs. A criterion that trains during compression
    (K-shot pruning, fine-tuning between greedy steps, regularised training) draws from the
    ledger; whatever is left is spent on the common fine-tune stage.
    """

    total: float
    spent: dict[str, float] = field(default_factory=dict)

    @property
    def remaining(self) -> float:
        return self.total - sum(self.spent.values())

    def draw(self, epochs: float, purpose: str) -> float:
        if epochs < 0:
            raise ConfigError(f"cannot draw a negative number of epochs ({epochs}) for {purpose}")
        if epochs > self.remaining + 1e-9:
            raise ConfigError(
                f"{purpose} asks for {epochs:g} epochs but only {self.remaining:g} of the "
                f"{self.total:g} post-baseline epochs are left in the ledger"
            )
        self.spent[purpose] = self.spent.get(purpose, 0.0) + epochs
        return epochs


@dataclass
class CompressionContext:
    """Everything a criterion may use while compressing. Built by the harness.

    ``prunable`` names the convolutions whose *output* channels may be removed (declared by
    the architecture); ``protected`` names modules that must keep their outputs (e.g. the
    classifier). ``reduction(model)`` returns the achieved fraction of the target metric
    removed relative to the baseline; ``reduction_of(kept)`` the reduction that keeping
``{conv_name: kept output-channel indices}`` of the current model would achieve (computed
on a pruned copy; the model is untouched). ``train(model, epochs, hooks=None, purpose="compress")``
    trains in place with the budget's fine-tune recipe and charges ``epochs`` to the ledger
    under ``purpose``; criteria that train must go through it.
    """

    example_inputs: Tensor
    calibration: Calibration | None
    target: Target
    device: torch.device
    seed: int
    prunable: Sequence[str]
    protected: Sequence[str]
    ledger: EpochLedger
    reduction: Callable[[nn.Module], float]
    reduction_of: Callable[[Mapping[str, Tensor]], float]
    train: Callable[..., None]
    log: Callable[[str], None] = print


class Criterion(ABC):
    """Base of every criterion. Subclasses set ``kind`` and may declare ``Params``."""

    kind: ClassVar[Kind]
    #: The registered name (set by the registry from the entry point's name).
    name: ClassVar[str] = ""
    #: True when the criterion needs calibration data (feature maps, activations...).
    needs_data: ClassVar[bool] = False
    #: One line shown by ``prunebench list criteria``.
    summary: ClassVar[str] = ""
    #: Paper reference shown in docs and records.
    reference: ClassVar[str] = ""

    @dataclass(frozen=True)
    class Params:
        pass

    def __init__(self, params: Any | None = None, seed: int = 0) -> None:
        self.params = params if params is not None else self.Params()
        self.seed = seed

    @classmethod
    def from_kwargs(cls, seed: int = 0, **kwargs: Any) -> Criterion:
        """Build with validated hyper-parameters; unknown names fail with suggestions."""
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            name = getattr(cls, "name", cls.__name__)
            k = unknown[0]
            raise ConfigError(
                f"criterion {name!r} has no hyper-parameter {k!r}.{suggest(k, fields)} "
                f"Available: {', '.join(sorted(fields)) or '(none)'}"
            )
        coerced = {k: _coerce(v, fields[k]) for k, v in kwargs.items()}
        return cls(cls.Params(**coerced), seed=seed)

    def describe(self) -> dict[str, Any]:
        """Parameters as plain data, for the result record."""
        return dataclasses.asdict(self.params)


class ScoreCriterion(Criterion):
    kind = Kind.SCORE

    @abstractmethod
    def scores(
        self, model: nn.Module, layers: Sequence[str], calibration: Calibration | None
    ) -> dict[str, Tensor]:
        """Return ``{conv_name: 1-D tensor}`` with one importance per output channel.

        Higher means more important. Every name in ``layers`` must be present, each tensor
        of length ``out_channels`` of that conv. Must not modify the model.
        """

    def compensate(
        self,
        model: nn.Module,
        removal: Mapping[str, Tensor],
        calibration: Calibration | None,
    ) -> None:
        """Called once, right before surgery, with the channels about to be removed per layer.

        Criteria that can fold a removed channel into the kept ones (e.g. into the next
        layer's input weights) edit ``model`` in place here. Default: nothing.
        """
        return None


class AllocateCriterion(Criterion):
    kind = Kind.ALLOCATE

    @abstractmethod
    def allocate(self, model: nn.Module, ctx: CompressionContext) -> dict[str, Tensor]:
        """Return ``{conv_name: kept output-channel indices}`` meeting ``ctx.target``.

        May edit weights of ``model`` in place (compensation) but not its structure; the
        harness removes the channels and verifies the achieved reduction.
        """


@dataclass(frozen=True)
class Knob:
    """The scalar a transform criterion exposes for the harness to bisect."""

    name: str
    low: float
    high: float
    #: True when a larger value compresses *more* (e.g. a rank fraction removed);
    #: False when it compresses less (e.g. an energy threshold kept).
    increases_compression: bool


class TransformCriterion(Criterion):
    kind = Kind.TRANSFORM
    knob: ClassVar[Knob]
    #: True when :meth:`transform` at a knob value depends on nothing but the weights it is given
    #: and the criterion's parameters (no seed, no data, no training): two runs from the same
    #: baseline weights at the same knob then have the same architecture.
    weights_decide_shapes: ClassVar[bool] = False

    def training_hooks(self, model: nn.Module, ctx: CompressionContext) -> TrainingHooks | None:
        """Hooks for training *before* the transform, or None (the default)."""
        return None

    def training_epochs(self, ctx: CompressionContext) -> float:
        """Epochs of hooked training to draw from the ledger before transforming (default 0)."""
        return 0.0

    @abstractmethod
    def transform(self, model: nn.Module, value: float, ctx: CompressionContext) -> list[dict[str, Any]]:
        """Replace modules of ``model`` in place at knob ``value``.

        Returns one plan step per replaced module:
        ``{"op": "replace", "module": name, "criterion": <registered name>, "spec": {...}}``
        where ``spec`` is plain JSON data that :meth:`rebuild_module` turns back into an
        (untrained) module of the right shapes.
        """

    @classmethod
    @abstractmethod
    def rebuild_module(cls, original: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
        """Build the replacement for ``original`` from a plan step's ``spec`` (shapes only)."""


def _coerce(value: Any, f: dataclasses.Field) -> Any:
    """Turn CLI strings into the declared field type (int, float, bool, str)."""
    if not isinstance(value, str):
        return value
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    try:
        if typ == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ == "int":
            return int(value)
        if typ == "float":
            return float(value)
    except ValueError:
        raise ConfigError(f"hyper-parameter {f.name!r} expects {typ}, got {value!r}") from None
    return value
