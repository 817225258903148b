"""The epoch ledger's guard: a criterion trains only through the ledger, and its training hooks
are checked before they run."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from prunebench.errors import PluginError
from prunebench.protocols import (
    CompressionContext,
    Criterion,
    TrainingHooks,
)
from prunebench.storage.checkpoints import weights_sha256


def check_hooks(name: str, hooks: TrainingHooks | None) -> None:
    """Reject hook objects with public methods the engine would never call (typos)."""
    if hooks is None:
        return
    if not isinstance(hooks, TrainingHooks):
        raise PluginError(f"criterion {name!r}: training_hooks() must return a TrainingHooks, got {hooks!r}")
    known = {n for n in dir(TrainingHooks) if not n.startswith("_")}
    for attr in dir(type(hooks)):
        if attr.startswith("_") or attr in known or not callable(getattr(type(hooks), attr)):
            continue
        close = difflib.get_close_matches(attr, known, n=1, cutoff=0.75)
        if close:
            raise PluginError(
                f"criterion {name!r}: hook method {attr!r} is not a training hook and would never be "
                f"called. Did you mean {close[0]!r}? Hooks: {', '.join(sorted(known))}"
            )


def _state_digest(model: nn.Module) -> str:
    return weights_sha256(model.state_dict())


class LedgerGuard:
    """Holds a criterion to the ledger while it compresses (docs/guarantees.md):

    * an optimizer step outside ``ctx.train`` (the ledger's training) fails the run;
    * a score criterion's ``scores()`` (and a transform criterion's set-up and trial
      transforms of copies) must leave the model's parameters and buffers as they were;
    * the calibration data handed to the criterion is read-only: a write to it fails the run.
    """

    def __init__(self, criterion: Criterion, ctx: CompressionContext) -> None:
        self.name = criterion.name or type(criterion).__name__
        self.calibration = ctx.calibration
        self.calibration_digest = self._calibration_digest()
        self.calibration_versions = self._calibration_versions()
        self.training = 0
        self.violation: str | None = None

    def _calibration_digest(self) -> str | None:
        c = self.calibration
        return None if c is None else weights_sha256({"images": c.images, "labels": c.labels})

    def _calibration_versions(self) -> tuple[int, int] | None:
        """torch's counters of in-place writes to the calibration tensors (and their views): cheap
        to read after every call; the full digest is compared once, when compression ends."""
        c = self.calibration
        return None if c is None else (c.images._version, c.labels._version)

    def _check_calibration(self, where: str, full: bool = False) -> None:
        changed = self._calibration_versions() != self.calibration_versions or (
            full and self._calibration_digest() != self.calibration_digest)
        if changed:
            raise PluginError(f"criterion {self.name!r} wrote to the calibration data in {where}; "
                              "they are read-only (copy them to change them)")

    def train(self, train: Callable[..., None]) -> Callable[..., None]:
        """``ctx.train`` as the criterion sees it: the one place where optimizer steps are allowed."""
        def ledger_train(*args: Any, **kwargs: Any) -> None:
            self.training += 1
            try:
                train(*args, **kwargs)
            finally:
                self.training -= 1
        return ledger_train

    def _step_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.training == 0:
            self.violation = (f"criterion {self.name!r} took an optimizer step outside the ledger's training; "
                              "training during compression must go through ctx.train, which charges its epochs")
            raise PluginError(self.violation)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        handle = register_optimizer_step_pre_hook(self._step_hook)
        try:
            yield
        finally:
            handle.remove()
        self._raise_violation()
        self._check_calibration("compression", full=True)

    def _raise_violation(self) -> None:
        if self.violation is not None:  # also when the criterion caught the error itself
            raise PluginError(self.violation)

    @contextlib.contextmanager
    def call(self, where: str, unchanged: nn.Module | None = None) -> Iterator[None]:
        """A call into the criterion: afterwards no optimizer step was taken outside the ledger,
        the calibration data are as they were, and so is ``unchanged`` (when given)."""
        before = None if unchanged is None else _state_digest(unchanged)
        yield
        self._raise_violation()
        self._check_calibration(where)
        if unchanged is not None and _state_digest(unchanged) != before:
            raise PluginError(f"criterion {self.name!r} changed the model's parameters or buffers in {where}, "
                              "outside the ledger's training (ctx.train); it must not modify the model there")
