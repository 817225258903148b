"""Divergence checks between the stages of a run.

A training stage that ends with a non-finite loss, or leaves a NaN or infinity in any
parameter or buffer (BatchNorm statistics included), has produced numbers that mean
nothing: accuracy of such a model is chance level at best, and a run that reported it as
a result would be silently wrong. After every training stage (baseline, K-shot or
criterion training, fine-tune, scratch) and after compression the runner calls these
checks, and the run fails with status ``diverged`` and a :class:`DivergedError` naming the
stage, the first offending tensor and the setting to change.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from prunebench.errors import DivergedError
from prunebench.storage.checkpoints import non_finite


def first_non_finite(model: nn.Module) -> str | None:
    """Name of the first parameter or floating-point buffer holding NaN or infinity."""
    return non_finite({**dict(model.named_parameters()), **dict(model.named_buffers())})


def check_model(model: nn.Module, stage: str, hint: str = "") -> None:
    """Raise :class:`DivergedError` if any weight or buffer of ``model`` is not finite."""
    name = first_non_finite(model)
    if name is not None:
        raise DivergedError(f"{stage} diverged: non-finite values in {name!r}{'; ' + hint if hint else ''}")


def check_training(model: nn.Module, stats: Mapping[str, float], stage: str, hint: str = "") -> None:
    """After a call of :func:`prunebench.training.engine.train`: a finite last-epoch loss (when any step
    ran) and finite weights."""
    loss = stats.get("loss")
    if stats.get("steps", 0) and loss is not None and not math.isfinite(float(loss)):
        raise DivergedError(f"{stage} diverged: the training loss became {loss}{'; ' + hint if hint else ''}")
    check_model(model, stage, hint)


@contextmanager
def training(stage: str, hint: str = "") -> Iterator[None]:
    """Around a call of :func:`prunebench.training.engine.train`: the engine stops at the first
    non-finite loss with a :class:`DivergedError` of its own; re-raise it naming the run's
    stage and the setting to change, as :func:`check_training` does after the call."""
    try:
        yield
    except DivergedError as exc:
        detail = str(exc).split(" diverged: ", 1)[-1].split("; lower the learning rate", 1)[0]
        raise DivergedError(f"{stage} diverged: {detail}{'; ' + hint if hint else ''}") from None


def check_outputs(model: nn.Module, x: Tensor, stage: str, hint: str = "") -> None:
    """Finite logits on ``x`` (finite weights can still overflow to infinity in a forward pass)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
    if not bool(torch.isfinite(out).all()):
        raise DivergedError(f"{stage} diverged: the model's outputs are not finite{'; ' + hint if hint else ''}")
