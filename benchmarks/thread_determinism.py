"""Do a run's numbers depend on its thread count? The same run (same run id) with 1 and with 2
threads, in fp32 and in bf16: the README demo's l1 run on resnet20/digits, each in its own
cache (so each trains its own baseline) and results folder. Prints the accuracies of both and
the largest weight difference of the stored models.

    python benchmarks/thread_determinism.py --out /tmp/thread-determinism
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def run(out: Path, precision: str, threads: int, arch: str) -> dict:
    results = out / f"results-{precision}-{threads}"
    env = {**os.environ, "PRUNEBENCH_CACHE": str(out / f"cache-{precision}-{threads}")}
    subprocess.run([sys.executable, "-m", "prunebench", "run", "-c", "l1", "-a", arch, "-d", "digits",
                    "--precision", precision, "--threads", str(threads), "--results-dir", str(results), "-q"],
                   env=env, check=True, capture_output=True)
    (path,) = results.glob("*.json")
    rec = json.loads(path.read_text())
    rec["_state"] = torch.load(results / rec["model_file"], weights_only=True)["state_dict"]
    return rec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--arch", default="resnet20")
    args = p.parse_args()
    for precision in ("fp32", "bf16"):
        a, b = (run(args.out, precision, t, args.arch) for t in (1, 2))
        diff = max(float((a["_state"][k].float() - b["_state"][k].float()).abs().max())
                   for k in a["_state"] if a["_state"][k].is_floating_point())
        print(f"{precision}: run id {a['run_id']} (same with 2 threads: {a['run_id'] == b['run_id']})")
        for stage in ("baseline", "oneshot", "oneshot_bn", "final"):
            print(f"  {stage:11s} 1 thread {a[stage]['top1']:7.4f}   2 threads {b[stage]['top1']:7.4f}")
        print(f"  largest weight difference of the stored models: {diff:.4g}")


if __name__ == "__main__":
    main()
