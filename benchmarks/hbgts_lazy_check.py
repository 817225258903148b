"""Lazy HBGTS on a fixed-seed ResNet-56: time one search and save what it decided.

ResNet-56 from ``torch.manual_seed(0)``, random normal 3x32x32 images from
``torch.Generator().manual_seed(1)``, calibration batches of 128, MACs target 0.5, one
thread (or THREADS, fixed as ``--threads`` fixes them; ``auto``: the process's own choice,
PyTorch's default count, and workers on free cores where the implementation has them); the
exact MACs checks as in ``benchmarks/hbgs_search.py``. Saves the moves, every
scored candidate's error, the kept filters and the compensated state dict, so that two
implementations (run this file from each checkout) can be compared:

    OMP_NUM_THREADS=1 python benchmarks/hbgts_lazy_check.py run 1024 new.pt
    python benchmarks/hbgts_lazy_check.py run 1024 new-auto.pt auto
    python benchmarks/hbgts_lazy_check.py compare old.pt new.pt
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch


def run(images: int, out: str, threads: str = "1") -> None:
    if threads != "auto":
        torch.set_num_threads(int(threads))
        os.environ["PRUNEBENCH_THREADS"] = threads
    from prunebench.architectures import cifar_resnet
    from prunebench.criteria import hbgs as hbgs_pkg
    from prunebench.protocols import Calibration, CompressionContext, EpochLedger, Target

    try:
        from prunebench.pipeline.metrics import count_macs
        from prunebench.pipeline.surgery import prune_kept
    except ImportError:  # checkouts before the package layout of prunebench/pipeline
        from prunebench.metrics import count_macs
        from prunebench.surgery import prune_kept

    torch.manual_seed(0)
    spec = cifar_resnet.RESNET56
    model = spec.build().eval()
    x = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    example = x[:1]
    base = count_macs(model, example)
    baseline = copy.deepcopy(model)

    def reduction_of(kept):
        m = copy.deepcopy(baseline)
        prune_kept(m, example, kept)
        return 1.0 - count_macs(m, example) / base

    lines: list[str] = []
    ctx = CompressionContext(
        example_inputs=example,
        calibration=Calibration(x, torch.zeros(images, dtype=torch.long), batch_size=128),
        target=Target(metric="macs", ratio=0.5), device=torch.device("cpu"), seed=0,
        prunable=spec.prunable(model), protected=spec.protected(model), ledger=EpochLedger(total=0.0),
        reduction=lambda m: 1.0 - count_macs(m, example) / base,
        reduction_of=reduction_of, train=lambda *a, **k: None, log=lines.append,
    )
    search = hbgs_pkg.search.Search
    moves: list[str] = []
    errors: list[tuple[str, int, float]] = []
    apply, output_error = search.apply, search.output_error

    def logged_apply(self, n, b):
        moves.append(f"{n}:{b}")
        return apply(self, n, b)

    def logged_error(self, n, b):
        e = output_error(self, n, b)
        errors.append((n, b, e))
        return e

    search.apply, search.output_error = logged_apply, logged_error
    t0 = time.perf_counter()
    kept = hbgs_pkg.HBGTS.from_kwargs(lazy=True).allocate(model, ctx)
    seconds = time.perf_counter() - t0
    torch.save({"moves": moves, "errors": errors, "kept": {k: v.tolist() for k, v in kept.items()},
                "state": model.state_dict(), "seconds": seconds}, out)
    print(json.dumps({"seconds": round(seconds, 1), "moves": len(moves), "evaluations": len(errors),
                      "threads": threads}))


def compare(a_path: str, b_path: str) -> None:
    a, b = torch.load(a_path, weights_only=True), torch.load(b_path, weights_only=True)
    differ = [k for k in a["state"] if not torch.equal(a["state"][k], b["state"][k])]
    print(json.dumps({
        "same_moves": a["moves"] == b["moves"], "moves": len(a["moves"]),
        "same_errors": a["errors"] == b["errors"], "evaluations": len(a["errors"]),
        "same_kept": a["kept"] == b["kept"],
        "same_state": a["state"].keys() == b["state"].keys() and not differ, "tensors": len(a["state"]),
        "seconds": [round(a["seconds"], 1), round(b["seconds"], 1)],
    }))


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"]:
        run(int(sys.argv[2]), sys.argv[3], *sys.argv[4:5])
    elif sys.argv[1:2] == ["compare"]:
        compare(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
