"""The smaller-dense control: is pruning better than picking a smaller network?

A ``dense`` run takes a smaller architecture of the same family as the run's architecture
(e.g. ResNet-20/32/44 beside ResNet-56), starts it exactly like the run's own baseline (the
zoo's checkpoint adapted to the data by the same recipe, a ``--baseline``-free trained one
under the same budget, ...), trains it for the budget's post-compression epochs (the same
ledger a pruned row spends after compression) and records it against the larger network:
MACs and params reductions relative to the larger network's baseline, Δ against that
baseline. It prunes nothing, so it has no target: it sits at its own MACs reduction, and
the leaderboard draws it as its own series (PROTOCOL.md, Controls).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from prunebench import registry
from prunebench.errors import ConfigError
from prunebench.pipeline import divergence
from prunebench.pipeline.metrics import count_macs, count_params
from prunebench.storage import checkpoints
from prunebench.training.engine import train

if TYPE_CHECKING:
    from prunebench.config.run import RunConfig
    from prunebench.progress import Reporter

#: the record's ``criterion`` (and the run id's criterion part) of a smaller-dense control
NAME = "dense"


def execute_dense(cfg: RunConfig, device: torch.device, record: dict[str, Any], rep: Reporter,
                  rid: str) -> dict[str, Any]:
    """The stages of a dense control; fills ``record`` and returns the model payload to store."""
    from prunebench.pipeline.baseline import get_baseline
    from prunebench.pipeline.data import data_block, evaluate, load_data
    from prunebench.pipeline.recipes import lr_hint, recipe, train_options
    from prunebench.pipeline.record import check_accuracies, latency_block
    from prunebench.pipeline.surgery import compressed_payload
    from prunebench.training import distributed

    torch.manual_seed(cfg.seed)
    budget = cfg.budget
    rep.stage("data")
    splits, data = load_data(cfg, device)
    record["data"] = data_block(splits, data)
    kwargs = {"num_classes": splits.num_classes, "in_channels": splits.in_channels}
    example = torch.zeros(1, *splits.input_shape, device=device)

    rep.stage(f"baseline ({cfg.arch}, the reference)")
    reference = registry.architectures.get(cfg.arch).build(**kwargs).to(device)
    record["baseline_info"] = get_baseline(cfg, reference, splits, data, rep)
    record["baseline_info"]["weights_sha256"] = checkpoints.weights_sha256(reference.state_dict())
    reference.to(device)
    record["baseline"] = evaluate(reference, data, splits.num_classes)
    macs_before, params_before = count_macs(reference, example), count_params(reference)

    rep.stage(f"dense control ({cfg.dense})")
    small_cfg = dataclasses.replace(cfg, arch=cfg.dense, dense=None)
    model = registry.architectures.get(cfg.dense).build(**kwargs).to(device)
    record["dense_info"] = get_baseline(small_cfg, model, splits, data, rep)
    record["dense_info"]["weights_sha256"] = checkpoints.weights_sha256(model.state_dict())
    model.to(device)
    macs_after, params_after = count_macs(model, example), count_params(model)
    if macs_after >= macs_before:
        raise ConfigError(f"the dense control {cfg.dense} ({macs_after:,} MACs) is not smaller than "
                          f"{cfg.arch} ({macs_before:,} MACs)")
    record["criterion_seconds"] = 0.0
    record["oneshot"] = evaluate(model, data, splits.num_classes)  # before the post-compression epochs
    record["oneshot_bn"] = None  # nothing was removed: there are no statistics to re-estimate
    rep.log(f"{cfg.dense} before training top-1 {record['oneshot']['top1']:.2f}%")

    rep.stage("fine-tune")
    epochs = float(budget.finetune_epochs)
    t0 = time.perf_counter()
    if epochs > 0:
        hint = lr_hint(budget, "finetune_lr")
        with divergence.training("dense training", hint):
            stats = train(model, data, recipe(budget, "finetune", epochs), cfg.seed + 7,
                          progress=rep.train_callback(budget.batch_size), description="dense", options=train_options(cfg))
        divergence.check_training(model, stats, "dense training", hint)
    record["compress_train_seconds"] = 0.0
    record["ledger"] = {"total_epochs": epochs, "spent": {"finetune": epochs} if epochs > 0 else {},
                        "baseline_epochs": budget.baseline_epochs}
    record["train_seconds"] = round(time.perf_counter() - t0, 3)
    record["final"] = evaluate(model, data, splits.num_classes)

    macs_red = round(1 - macs_after / macs_before, 6)
    record["macs"] = {"before": macs_before, "after": macs_after}
    record["params"] = {"before": params_before, "after": params_after}
    record["achieved"] = {"macs_reduction": macs_red, "params_reduction": round(1 - params_after / params_before, 6),
                          "within_tolerance": True}
    # no target was asked for: the row sits at its own MACs reduction
    record["target"] = {"metric": "macs", "ratio": round(macs_red, 4), "tolerance": 0.0}
    tb = min(64, budget.batch_size)
    record["latency"] = latency_block(copy.deepcopy(reference), model, example, budget.latency_repeats, tb,
                                      cfg.sharing) if distributed.world().main else None
    record["widths"] = {}
    record["plan_steps"] = 0
    check_accuracies(record)
    record["model_file"] = f"models/{rid}.pt"
    rep.log(f"final top-1 {record['final']['top1']:.2f}% at {macs_red:.1%} fewer MACs than {cfg.arch} "
            f"(its baseline {record['baseline']['top1']:.2f}%)")
    return compressed_payload(cfg.dense, kwargs, [], model, list(example.shape), meta={"run_id": rid})
