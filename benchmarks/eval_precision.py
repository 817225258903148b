"""Evaluation in bf16 or fp32? Top-1, disagreements and time of the two on one converged model.

Takes the public pretrained ResNet-56 CIFAR-10 checkpoint (``$PRUNEBENCH_DATA/pretrained/
resnet56-4bfd9763.th``, Idelbayev's pytorch_resnet_cifar10, BSD-2-Clause; its ImageNet
normalisation) and the cifar10-jpeg test split, and evaluates it in both precisions on the
current device, interleaved, ``--repeats`` times:

* fp32: plain forward passes (what prunebench's evaluation does);
* bf16: the same under ``torch.autocast(dtype=torch.bfloat16)`` with channels_last inputs.

It prints both top-1s, how many test images the two classify differently, and the median
seconds per pass over the test split.

    python benchmarks/eval_precision.py [--images 10000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from prunebench import registry
from prunebench.datasets import data_root
from prunebench.datasets.base import DataSplits

CHECKPOINT = "pretrained/resnet56-4bfd9763.th"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def pretrained_resnet56() -> torch.nn.Module:
    """prunebench's resnet56 with the checkpoint's weights (``module.`` prefix dropped, its
    ``linear`` classifier is our ``fc``; it stores no ``num_batches_tracked``)."""
    model = registry.architectures.get("resnet56").build(num_classes=10, in_channels=3)
    payload = torch.load(data_root(None) / CHECKPOINT, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module.").replace("linear.", "fc."): v for k, v in payload["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any("num_batches_tracked" not in k for k in missing):
        raise RuntimeError(f"checkpoint does not match resnet56: missing {missing}, unexpected {unexpected}")
    return model.eval()


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, bf16: bool, batch: int = 500) -> torch.Tensor:
    out = []
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(x.device.type, enabled=False)
    with ctx:
        for i in range(0, x.shape[0], batch):
            xb = x[i : i + batch]
            if bf16:
                xb = xb.contiguous(memory_format=torch.channels_last)
            out.append(model(xb).float().argmax(1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    splits: DataSplits = registry.datasets.get("cifar10-jpeg").load(data_root(None))
    x8, y = splits.test_x[: args.images].to(dev), splits.test_y[: args.images].to(dev)
    mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    x = (x8.float() / 255 - mean) / std
    fp32_model = pretrained_resnet56().to(dev)
    bf16_model = pretrained_resnet56().to(dev).to(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    preds = {}
    for _ in range(args.repeats):
        for name, model in (("fp32", fp32_model), ("bf16", bf16_model)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            preds[name] = predict(model, x, bf16=name == "bf16")
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    n = y.numel()
    for name in ("fp32", "bf16"):
        top1 = 100.0 * (preds[name] == y).sum().item() / n
        print(f"{name}: top-1 {top1:.2f}% on {n} cifar10-jpeg test images, "
              f"{statistics.median(times[name]):.2f}s per pass (median of {args.repeats}, interleaved)")
    diff = (preds["fp32"] != preds["bf16"]).sum().item()
    print(f"predictions that differ: {diff} of {n} ({100.0 * diff / n:.2f}%); "
          f"bf16 time / fp32 time {statistics.median(times['bf16']) / statistics.median(times['fp32']):.2f}")


if __name__ == "__main__":
    main()
