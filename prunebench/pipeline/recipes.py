"""The training recipes a budget gives each stage (baseline, fine-tune) and the run's training
options."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prunebench.config.budgets import Budget
from prunebench.training.steps import Recipe, TrainOptions

if TYPE_CHECKING:  # pragma: no cover
    from prunebench.config.run import RunConfig


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


def train_options(cfg: RunConfig) -> TrainOptions:
    return TrainOptions(precision=cfg.resolved_precision())


def lr_hint(budget: Budget, field_name: str) -> str:
    return f"lower the learning rate (now {field_name}={getattr(budget, field_name):g}; --set {field_name}=...)"
