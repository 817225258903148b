"""One-shot accuracy of every criterion on the converged ResNet-56, at 50% MACs, per pruning scope.

    PRUNEBENCH_DATA=/path/to/data python benchmarks/oneshot_pretrained.py \\
        --checkpoint /path/to/resnet56-4bfd9763.th [--scopes inner,all] [--only coring,qsfm]

Loads the public option-A ResNet-56 checkpoint of the ``pytorch_resnet_cifar10`` project (a dict
``{"best_prec1", "state_dict"}``; keys carry a ``module.`` prefix, the classifier is
``linear``, BatchNorm layers have no ``num_batches_tracked``; trained with ImageNet
normalisation), evaluates it on the ``cifar10-jpeg`` test split, then compresses a fresh copy
with every criterion to the MACs target through the harness (``prunebench.pipeline.compress``) and
evaluates again, with no training at all: for ``trp`` that is its transform of the converged
weights (its training hooks never run, the epoch ledger is empty). Calibration images are a
fixed seeded subset of the training split. Prints one row per (criterion, scope): one-shot
top-1, achieved MACs reduction and the compress stage's wall time (the criterion plus the
harness's target search); ``--out FILE`` also writes them as JSON lines.

The script runs against older prunebench versions too (criteria or options a version does not
have are reported as ``n/a``), so the same file measures a change before and after.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

#: (label, alternatives): the first registered (name, params) a version accepts is used
CRITERIA: list[tuple[str, list[tuple[str, dict]]]] = [
    ("l1", [("l1", {})]),
    ("random", [("random", {})]),
    ("coring vbd", [("coring", {"distance": "vbd"})]),
    ("coring euclidean", [("coring", {"distance": "euclidean"})]),
    ("coring cosine", [("coring", {"distance": "cosine"})]),
    ("qsfm", [("qsfm", {"compensation": True})]),
    ("qsfm no-comp", [("qsfm", {"compensation": False})]),
    ("HBGS (omp)", [("hbgs", {"selector": "omp"})]),
    ("HBGS-B (backward)", [("hbgs-b", {}), ("hbgs", {"selector": "backward"})]),
    ("HBGS (omp, one order)", [("hbgs", {"selector": "omp", "reselect": False})]),
    ("HBGTS (omp, lazy)", [("hbgts", {"selector": "omp", "lazy": True})]),
    ("HBGTS (omp, lazy, one order)", [("hbgts", {"selector": "omp", "lazy": True, "reselect": False})]),
    ("ht2", [("ht2", {})]),
    ("trp one-shot", [("trp", {})]),
]


def load_pretrained(path: Path) -> nn.Module:
    """prunebench's resnet56 with the checkpoint's weights (keys mapped, missing BN counters zero)."""
    from prunebench import registry

    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = {}
    for key, value in payload["state_dict"].items():
        key = key.removeprefix("module.")
        if key.startswith("linear."):
            key = "fc." + key[len("linear."):]
        state[key] = value
    model = registry.architectures.get("resnet56").build(num_classes=10, in_channels=3)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("num_batches_tracked") for k in missing):
        raise SystemExit(f"checkpoint does not fit resnet56: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x.float() / 255.0 - mean) / std


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((model(normalise(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum())
    return 100.0 * correct / len(images)


def prunable(arch, model: nn.Module, scope: str) -> list[str] | None:
    """The scope's layers, or None when this prunebench version has no such scope."""
    if hasattr(arch, "prunable_layers"):
        try:
            return arch.prunable_layers(model, scope)
        except Exception:  # noqa: BLE001 - an unknown scope
            return None
    return arch.prunable(model) if scope == "inner" else None


def build_criterion(alternatives: list[tuple[str, dict]]):
    from prunebench import registry

    for name, params in alternatives:
        if name not in registry.criteria.names():
            continue
        try:
            return name, params, registry.criteria.get(name).from_kwargs(seed=0, **params)
        except Exception:  # noqa: BLE001 - a parameter this version does not have
            continue
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=Path(os.environ.get("PRUNEBENCH_DATA", ".")) / "pretrained" / "resnet56-4bfd9763.th")
    parser.add_argument("--scopes", default="inner,all")
    parser.add_argument("--only", default="", help="comma-separated label prefixes to run")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of MACs removed")
    parser.add_argument("--calibration", type=int, default=512, help="training images shown to criteria")
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import prunebench
    from prunebench import registry
    from prunebench.datasets import data_root
    from prunebench.pipeline.compress import compress
    from prunebench.pipeline.meter import Meter
    from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

    if not args.checkpoint.is_file():
        raise SystemExit(f"checkpoint {args.checkpoint} not found (give --checkpoint)")
    splits = registry.datasets.get("cifar10-jpeg").load(data_root(None))
    test_x, test_y = splits.test_x, splits.test_y
    if args.test_images < len(test_x):  # a seeded random subset (the split is ordered by class)
        pick = torch.randperm(len(test_x), generator=torch.Generator().manual_seed(7))[: args.test_images]
        test_x, test_y = test_x[pick], test_y[pick]
    g = torch.Generator().manual_seed(1000)
    cidx = torch.randperm(len(splits.train_x), generator=g)[: args.calibration]
    calibration = Calibration(normalise(splits.train_x[cidx]), splits.train_y[cidx], batch_size=128)
    example = torch.zeros(1, 3, 32, 32)

    arch = registry.architectures.get("resnet56")
    baseline = load_pretrained(args.checkpoint)
    base_acc = top1(baseline, test_x, test_y)
    print(f"prunebench {prunebench.__version__} at {Path(prunebench.__file__).parent}; torch threads "
          f"{torch.get_num_threads()}; baseline ResNet-56 top-1 {base_acc:.2f}% on {len(test_x)} cifar10-jpeg "
          f"test images; calibration {args.calibration} training images; target -{args.target:.0%} MACs",
          flush=True)
    out = open(args.out, "a") if args.out else None
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    rows = []
    for label, alternatives in CRITERIA:
        if only and not any(label.startswith(o) for o in only):
            continue
        for scope in args.scopes.split(","):
            row = {"label": label, "scope": scope, "baseline_top1": round(base_acc, 2)}
            built = build_criterion(alternatives)
            model = copy.deepcopy(baseline)
            layers = prunable(arch, model, scope)
            if built is None or layers is None:
                row.update(status="n/a")
            else:
                name, params, crit = built
                row.update(criterion=name, params=params)
                target = Target("macs", args.target, 0.01)
                meter = Meter(copy.deepcopy(baseline), example, target)
                ctx = CompressionContext(
                    example_inputs=example, calibration=calibration, target=target, device=torch.device("cpu"),
                    seed=0, prunable=layers, protected=arch.protected(model), ledger=EpochLedger(0.0),
                    reduction=meter.reduction, reduction_of=lambda kept, m=model, mt=meter: mt.reduction_of(m, kept),
                    train=lambda *a, **k: None, log=lambda msg: print("   ", msg, flush=True),
                )
                t0 = time.perf_counter()
                try:
                    result = compress(crit, model, ctx, meter)
                except Exception as exc:  # noqa: BLE001 - report and go on
                    row.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                               seconds=round(time.perf_counter() - t0, 1))
                else:
                    row.update(status="ok", seconds=round(time.perf_counter() - t0, 1),
                               achieved=round(float(result.achieved), 4), oneshot_top1=round(top1(model, test_x, test_y), 2))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
    print("\n| criterion | scope | one-shot top-1 % | MACs removed | compress s |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok":
            print(f"| {r['label']} | {r['scope']} | {r['oneshot_top1']:.2f} | {r['achieved']:.3f} | {r['seconds']:.1f} |")
        else:
            print(f"| {r['label']} | {r['scope']} | {r['status']} | | {r.get('seconds', '')} |")
    if out:
        out.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
