"""The training step both loops share: the recipe, its learning-rate schedule, the optimiser,
one optimisation step and the divergence check at each progress tick.

The device-resident loop (:mod:`prunebench.training.engine`) and the streamed loop
(:mod:`prunebench.training.streaming`) both build on these, so a recipe trains the same way
whichever loop feeds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunebench.errors import DivergedError
from prunebench.protocols import TrainingHooks
from prunebench.training.precision import check_precision, resolve_precision

#: steps between host reads of the accumulated loss on CUDA (each read waits for the device)
CUDA_TICK = 50


@dataclass(frozen=True)
class Recipe:
    epochs: float
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    schedule: str
    milestones: tuple[float, ...] = ()
    label_smoothing: float = 0.0


@dataclass(frozen=True)
class TrainOptions:
    """How the engine computes; only ``precision`` changes the numbers.

    ``precision``: ``auto`` | ``bf16`` | ``fp32`` (see :mod:`prunebench.training.precision`).
    ``channels_last``: None follows the precision (on with bf16, and always on CUDA).
    ``compile``: run the model through ``torch.compile`` (off: on a CPU it does not pay for its
    compile time within a run, see docs/performance.md), in ``compile_mode`` (e.g.
    ``"reduce-overhead"``: CUDA graphs). ``tick``: steps between host reads of the loss
    (progress and divergence checks); None is 1 on a CPU and ``CUDA_TICK`` on CUDA.
    """

    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    compile_mode: str | None = None
    tick: int | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.tick is not None and self.tick < 1:
            raise ValueError(f"tick must be at least 1, got {self.tick}")


def lr_at(recipe: Recipe, step: int, total: int) -> float:
    frac = step / max(total, 1)
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "step":
        drops = sum(frac >= m for m in recipe.milestones)
        return recipe.lr * (0.1**drops)
    if recipe.schedule == "cosine":
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * frac))
    if recipe.schedule == "onecycle":
        warm = 0.15
        if frac < warm:
            return recipe.lr * (0.1 + 0.9 * frac / warm)
        return 0.5 * recipe.lr * (1 + math.cos(math.pi * (frac - warm) / (1 - warm)))
    raise ValueError(f"unknown schedule {recipe.schedule!r}")


def optimizer(model: nn.Module, recipe: Recipe, fused: bool = False) -> torch.optim.SGD:
    """SGD (Nesterov when momentum > 0), no weight decay on biases and norm parameters.
    ``fused`` (CUDA) updates every parameter in one kernel."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if fused else {}
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.momentum > 0, **extra)




def check_tick(mean: float, description: str, first: int, step: int, total: int, lr: float) -> None:
    """Raise :class:`DivergedError` when the mean loss of steps ``first..step`` is not finite."""
    if not math.isfinite(mean):
        where = f"step {step}" if step == first else f"steps {first}-{step}"
        raise DivergedError(
            f"{description} diverged: the training loss became {mean} in {where} of {total} "
            f"(learning rate {lr:.4g}); lower the learning rate or check the model")

def train_step(model: nn.Module, forward: Callable[[Tensor], Tensor], opt: torch.optim.Optimizer,
               hooks: TrainingHooks, autocast: Any, x: Tensor, y: Tensor, recipe: Recipe, step: int,
               total: int) -> tuple[Tensor, Tensor, float]:
    """One optimiser step at the schedule's learning rate, with the criterion's hooks; shared by
    the device-resident and the streamed loops. Returns the logits, the loss and the rate."""
    lr = lr_at(recipe, step, total)
    for g in opt.param_groups:
        g["lr"] = lr
    with autocast:
        out = forward(x)
        loss = F.cross_entropy(out.float(), y, label_smoothing=recipe.label_smoothing)
        extra = hooks.extra_loss(model)
        if extra is not None:
            loss = loss + extra
    opt.zero_grad(set_to_none=True)
    loss.backward()
    hooks.after_backward(model, step)
    opt.step()
    hooks.after_step(model, step)
    return out, loss, lr


@dataclass(frozen=True)
class Plan:
    """How a loop trains ``recipe`` over ``n`` images on ``device``: the step counts, the
    precision, the memory format and the progress tick (both loops make the same choices)."""

    steps_per_epoch: int
    total: int
    precision: str
    channels_last: bool
    tick: int
    cuda: bool


def plan(recipe: Recipe, n: int, device: torch.device, options: TrainOptions) -> Plan:
    steps_per_epoch = max(1, n // recipe.batch_size)
    cuda = device.type == "cuda"
    precision = resolve_precision(options.precision, device)
    channels_last = options.channels_last if options.channels_last is not None else (precision == "bf16" or cuda)
    return Plan(steps_per_epoch, int(round(recipe.epochs * steps_per_epoch)), precision, channels_last,
                options.tick or (CUDA_TICK if cuda else 1), cuda)


def prepare(model: nn.Module, plan: Plan) -> None:
    """The model and backend set for the loop: cuDNN's autotuner (fixed shapes within a run:
    pick the fastest kernels once) and channels_last weights where the plan uses them."""
    if plan.cuda:
        torch.backends.cudnn.benchmark = True
    if plan.channels_last:
        model.to(memory_format=torch.channels_last)
