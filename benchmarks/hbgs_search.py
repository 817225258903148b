"""Search time of HBGS / HBGTS on CIFAR ResNets.

Times ``allocate`` (the whole greedy search, compensation fold included) at a MACs target
for ResNet-56 with 256 and 1,024 calibration images, both variants and both selectors, and
how the time grows with depth (ResNet-20/56/110). The calibration images are random
normal tensors (already "normalised" inputs of CIFAR shape): the search's cost does not
depend on what the pixels show, only the chosen filters do. Weights are the random
initialisation of the architecture. The target is checked the way the harness does it
(channels removed through torch-pruning's DependencyGraph, MACs counted by
``prunebench.pipeline.metrics.count_macs``), and those checks are part of the time.

Every configuration runs in its own process and is cut after ``--limit`` seconds.

    python benchmarks/hbgs_search.py                 # the full table
    python benchmarks/hbgs_search.py --limit 60 --only resnet20
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time

CONFIGS = [
    # (arch, images, criterion, selector, lazy)
    *[
        ("resnet56", n, crit, sel, False)
        for n in (256, 1024)
        for crit in ("hbgs", "hbgts")
        for sel in ("backward", "omp")
    ],
    ("resnet56", 256, "hbgts", "backward", True),
    ("resnet56", 1024, "hbgts", "backward", True),
    *[(arch, 256, "hbgs", "backward", False) for arch in ("resnet20", "resnet56", "resnet110")],
    *[(arch, 256, "hbgts", "backward", True) for arch in ("resnet20", "resnet56", "resnet110")],
]


def run_one(arch: str, images: int, criterion: str, selector: str, lazy: bool, ratio: float) -> None:
    """Child process: run one search and print a JSON line."""
    import torch

    from prunebench.architectures import cifar_resnet
    from prunebench.criteria.hbgs import HBGS, HBGTS
    from prunebench.pipeline.metrics import count_macs
    from prunebench.pipeline.surgery import prune_kept
    from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

    torch.manual_seed(0)
    spec = getattr(cifar_resnet, arch.upper())
    model = spec.build().eval()
    x = torch.randn(images, 3, 32, 32)
    example = x[:1]
    base = count_macs(model, example)
    baseline = copy.deepcopy(model)

    def reduction_of(kept):
        m = copy.deepcopy(baseline)
        prune_kept(m, example, kept)
        return 1.0 - count_macs(m, example) / base

    def log(msg: str) -> None:
        print("LOG", msg, flush=True)

    ctx = CompressionContext(
        example_inputs=example,
        calibration=Calibration(x, torch.zeros(images, dtype=torch.long), batch_size=128),
        target=Target(metric="macs", ratio=ratio),
        device=torch.device("cpu"),
        seed=0,
        prunable=spec.prunable(model),
        protected=spec.protected(model),
        ledger=EpochLedger(total=0.0),
        reduction=lambda m: 1.0 - count_macs(m, example) / base,
        reduction_of=reduction_of,
        train=lambda *a, **k: None,
        log=log,
    )
    cls = HBGS if criterion == "hbgs" else HBGTS
    crit = cls.from_kwargs(selector=selector, lazy=lazy)
    t0 = time.perf_counter()
    kept = crit.allocate(model, ctx)
    seconds = time.perf_counter() - t0
    achieved = reduction_of(kept)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT", json.dumps({"seconds": seconds, "achieved": achieved, "peak_mb": peak_mb}), flush=True)


def parse_log(lines: list[str]) -> dict:
    """Steps / evaluations / exact checks from the criterion's final log line."""
    info: dict = {}
    for line in lines:
        if not line.startswith("LOG "):
            continue
        msg = line[4:]
        if " steps, " in msg:
            parts = msg.split(", ")
            info["steps"] = int(parts[0].split()[-2])
            for p in parts:
                if p.endswith("network evaluations"):
                    info["evals"] = int(p.split()[0])
                if p.endswith("exact reduction checks"):
                    info["exact"] = int(p.split()[0])
        elif "step " in msg:
            info["last_progress"] = msg
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=float, default=180.0, help="seconds before a configuration is cut")
    ap.add_argument("--ratio", type=float, default=0.5, help="MACs reduction target")
    ap.add_argument("--only", default="", help="run configurations whose arch or criterion contains this")
    ap.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        arch, images, criterion, selector, lazy = args.one
        run_one(arch, int(images), criterion, selector, lazy == "1", args.ratio)
        return

    import torch

    from prunebench.results.records import cpu_name

    print(
        f"# hbgs/hbgts search time, MACs target {args.ratio:.2f}, random init, random normal images; "
        f"CPU {cpu_name()}, torch {torch.__version__}, "
        f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}, cut after {args.limit:.0f}s"
    )
    header = "| arch | images | criterion | selector | lazy | search s | steps | net evals | exact checks | MACs reduction | peak RSS MB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for arch, images, criterion, selector, lazy in CONFIGS:
        if args.only and args.only not in arch and args.only not in criterion:
            continue
        cmd = [
            sys.executable,
            __file__,
            "--ratio",
            str(args.ratio),
            "--one",
            arch,
            str(images),
            criterion,
            selector,
            str(int(lazy)),
        ]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.limit)
            out, err, cut = proc.stdout, proc.stderr, False
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            err, cut = "", True
        lines = out.splitlines()
        info = parse_log(lines)
        result = next((json.loads(line[7:]) for line in lines if line.startswith("RESULT ")), None)
        row = [arch, str(images), criterion, selector, "yes" if lazy else "no"]
        if result is not None:
            row += [
                f"{result['seconds']:.1f}",
                str(info.get("steps", "?")),
                str(info.get("evals", "?")),
                str(info.get("exact", "?")),
                f"{result['achieved']:.4f}",
                f"{result['peak_mb']:.0f}",
            ]
        elif cut:
            note = info.get("last_progress", "no progress line yet")
            row += [f"cut at {time.perf_counter() - t0:.0f}", f"({note})", "", "", "", ""]
        else:
            tail = (err or out).strip().splitlines()[-1:] or ["?"]
            row += ["failed", tail[0][:80], "", "", "", ""]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
