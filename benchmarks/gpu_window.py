"""The GPU leaderboard within a fixed time window, in one call (driven by gpu_window.sh).

Phases, each printing as it goes and bounded by one hard deadline:

1. the environment (``env.txt``) and the sweep's dataset decoded once into the cache;
2. the training-throughput table (``throughput.md``, benchmarks/train_throughput.py), given
   at most ``--throughput-seconds``;
3. the sweep, one seed at a time (seed-major: what the window allows is complete seeds), with
   ``runs_per_gpu`` runs sharing the GPU. Before a seed starts, the time the previous one took
   is compared with the time left; at the deadline the running seed is stopped (its finished
   runs keep their records, the others leave none). After each seed the records
   (``records.tar.gz``) and a summary table (``summary.md``) are rewritten, so the output is
   useful whenever the window closes;
4. on a CUDA device, with at least ``LATENCY_MIN_S`` left, ``prunebench latency`` on the records
   with the ``torch-cuda`` runtime (PyTorch eager on the GPU, batch 1 and 64; its records in
   ``records.tar.gz`` under ``records/latency/``);
5. the leaderboard pages of those records (``leaderboard.tar.gz``).

The output folder gets at most 7 files: window.log (written by gpu_window.sh), env.txt,
throughput.md, summary.md, records.tar.gz, leaderboard.tar.gz and sweep.toml (the config run).

    python benchmarks/gpu_window.py --out OUT --deadline UNIX_TIME [--config benchmarks/gpu_window.toml]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

HERE = Path(__file__).resolve().parent
#: seconds kept back at the end for packing the output
RESERVE_S = 20.0
#: a seed is not started with less time left than this (its runs could not finish)
MIN_SEED_S = 45.0
#: the GPU latency is not started with less time left than this
LATENCY_MIN_S = 30.0


def say(message: str) -> None:
    print(f"[window {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------- the sweep file
def load_config(path: Path, runs_per_gpu: int | None, results: Path):
    """The sweep of ``path``; a key this prunebench does not know yet (``baseline``) is dropped
    with a warning rather than losing the window."""
    from prunebench.sweep.spec import TOP_KEYS, parse_sweep

    doc = tomllib.loads(path.read_text())
    for key in [k for k in doc if k not in TOP_KEYS]:
        say(f"WARNING: this prunebench does not know the sweep key {key!r} = {doc[key]!r}; running without it")
        doc.pop(key)
    if runs_per_gpu is not None:
        doc["runs_per_gpu"] = runs_per_gpu
    return parse_sweep(doc, base=path.parent, results_dir=results)


def run_seed(config: Path, seed: int, runs_per_gpu: int | None, results: Path) -> int:
    """Child process: the sweep restricted to one seed; one line per finished run."""
    import dataclasses

    from prunebench.sweep.run import run_sweep

    sweep = dataclasses.replace(load_config(config, runs_per_gpu, results), seeds=(seed,))

    def log(line: str) -> None:
        parts = line.split()
        if len(parts) > 2 and parts[1] == "complete":
            try:
                rec = json.loads((results / f"{parts[2]}.json").read_text())
                line += f"  final {rec['final']['top1']:.2f}% (one-shot {rec['oneshot']['top1']:.2f}%)" \
                    if rec.get("oneshot") else f"  final {rec['final']['top1']:.2f}%"
            except (OSError, KeyError, ValueError, TypeError):
                pass
        print(line, flush=True)

    outcomes = run_sweep(sweep, log=log)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


# --------------------------------------------------------------------------------- processes
def run_until(cmd: Sequence[str], deadline: float, log: Callable[[str], None] = say,
              stdout: Path | None = None) -> int | None:
    """Run ``cmd`` in its own process group; stop the whole group (workers too) at
    ``deadline`` (a ``time.time()``). Returns its exit status, or None when it was stopped.
    With ``stdout``, its output also goes to that file."""
    out = open(stdout, "w") if stdout else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(list(cmd), start_new_session=True, stdout=subprocess.PIPE if out else None,
                                stderr=subprocess.STDOUT if out else None, text=True, bufsize=1)
        if out is not None:
            import threading

            def copy() -> None:
                for line in proc.stdout:  # type: ignore[union-attr]
                    sys.stdout.write(line)
                    sys.stdout.flush()
                    out.write(line)
                    out.flush()

            threading.Thread(target=copy, daemon=True).start()
        while proc.poll() is None:
            if time.time() >= deadline:
                log(f"deadline: stopping {shlex.join(cmd[:4])} ...")
                _kill_group(proc)
                return None
            time.sleep(0.2)
        return proc.returncode
    finally:
        if out is not None:
            time.sleep(0.2)  # let the copier finish the last lines
            out.close()


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        t0 = time.time()
        while time.time() - t0 < grace:
            if proc.poll() is not None:
                return
            time.sleep(0.1)


def should_start(seconds_left: float, last_seed_s: float | None) -> bool:
    """Start another seed? Not with less than MIN_SEED_S left, nor with less than half of what
    the last seed took (a quarter of a seed's runs would finish, at best)."""
    if seconds_left < MIN_SEED_S:
        return False
    return last_seed_s is None or seconds_left >= 0.5 * last_seed_s


# --------------------------------------------------------------------------------- outputs
def environment() -> str:
    import torch

    lines = [f"python {platform.python_version()} ({sys.executable})", f"torch {torch.__version__}",
             f"cpu cores {os.cpu_count()}", f"platform {platform.platform()}"]
    for mod in ("torchvision", "torch_pruning", "tensorly", "prunebench"):
        try:
            lines.append(f"{mod} {getattr(__import__(mod), '__version__', '?')}")
        except ImportError as exc:
            lines.append(f"{mod} MISSING ({exc})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
            lines += ["", smi]
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        lines.append("no CUDA device")
    return "\n".join(lines) + "\n"


def records(results: Path) -> list[dict]:
    out = []
    for p in sorted(results.glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def row_label(rec: dict) -> str:
    """The criterion and the hyper-parameters it was given that differ from its defaults."""
    import dataclasses

    from prunebench import registry

    name = rec["criterion"]
    params = rec.get("criterion_params") or {}
    try:
        defaults = {f.name: f.default for f in dataclasses.fields(registry.criteria.get(name).Params)}
        params = {k: v for k, v in params.items() if defaults.get(k, object()) != v}
    except Exception:  # noqa: BLE001 - a criterion this install lacks still gets a row
        pass
    return name + (f"({', '.join(f'{k}={v}' for k, v in sorted(params.items()))})" if params else "")


def summary(results: Path) -> str:
    """Final top-1 per criterion, target and seed, from the complete records so far."""
    rows: dict[tuple[str, str], dict[int, dict]] = {}
    seeds: set[int] = set()
    baseline = {}
    for rec in records(results):
        if rec.get("status") != "complete":
            continue
        t = rec["target"]
        rows.setdefault((row_label(rec), f"{t['metric']} -{t['ratio']:.0%}"), {})[rec["seed"]] = rec
        seeds.add(rec["seed"])
        baseline[rec["seed"]] = rec["baseline"]["top1"]
    order = sorted(seeds)
    head = ["criterion", "target"] + [f"seed {s}" for s in order] + ["mean final", "mean one-shot", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (label, target), by_seed in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        finals = [by_seed[s]["final"]["top1"] for s in order if s in by_seed]
        oneshots = [by_seed[s]["oneshot"]["top1"] for s in order if s in by_seed and by_seed[s].get("oneshot")]
        speed = [by_seed[s]["latency"]["speedup_throughput"] for s in order if s in by_seed]
        cells = [f"{by_seed[s]['final']['top1']:.2f}" if s in by_seed else "" for s in order]
        lines.append("| " + " | ".join([label, target, *cells, f"{statistics.mean(finals):.2f}",
                                         f"{statistics.mean(oneshots):.2f}" if oneshots else "",
                                         f"{statistics.mean(speed):.2f}"]) + " |")
    failed = [r["run_id"] + ": " + str(r.get("error", ""))[:200] for r in records(results) if r.get("status") != "complete"]
    base = ", ".join(f"seed {s}: {baseline[s]:.2f}%" for s in order)
    text = f"baseline top-1 {base}\n\n" + "\n".join(lines) + "\n"
    if failed:
        text += "\nnot complete:\n" + "\n".join(f"- {f}" for f in failed) + "\n"
    return text


def pack(results: Path, out: Path) -> None:
    """``records.tar.gz``: every record (JSON) so far, written atomically."""
    tmp = out / ".records.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(results.glob("*.json")):
            tar.add(p, arcname=f"records/{p.name}")
        for p in sorted(results.glob("latency/*.json")):
            tar.add(p, arcname=f"records/latency/{p.name}")
    os.replace(tmp, out / "records.tar.gz")


def gpu_latency(results: Path, stop: float, runtime: str = "torch-cuda") -> None:
    """``prunebench latency`` with the torch-cuda runtime (or ``runtime``: a rehearsal on a CPU
    with ``torch``) on the window's records, until ``stop``. The machine has just finished the
    sweep; its CPU load is what the quiet check sees, so a result is kept marked ``unreliable``
    rather than refused."""
    import torch

    if runtime == "torch-cuda" and not torch.cuda.is_available():
        say("no CUDA device: no GPU latency")
        return
    if stop - time.time() < LATENCY_MIN_S:
        say(f"no GPU latency: {stop - time.time():.0f}s left")
        return
    say(f"latency ({runtime}): batch 1 and 64")
    cmd = [sys.executable, "-m", "prunebench", "latency", str(results), "--runtime", runtime,
           "--batch", "1", "--threads", "1", "--batch", "64", "--threads", "0", "--allow-noisy"]
    status = run_until(cmd, stop)
    say(f"GPU latency: {'stopped at the deadline' if status is None else f'exit status {status}'}")


def leaderboard(results: Path, out: Path) -> None:
    """``leaderboard.tar.gz``: the pages ``prunebench leaderboard`` makes of the records."""
    with tempfile.TemporaryDirectory() as tmp:
        pages = Path(tmp) / "leaderboard"
        subprocess.run([sys.executable, "-m", "prunebench", "leaderboard", "--records", str(results),
                        "--out", str(pages)], check=True, capture_output=True, text=True, timeout=120)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(pages, arcname="leaderboard")
        (out / "leaderboard.tar.gz").write_bytes(buf.getvalue())


# --------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--deadline", type=float, default=None, help="unix time by which everything is written")
    p.add_argument("--config", type=Path, default=HERE / "gpu_window.toml")
    p.add_argument("--runs-per-gpu", type=int, default=None, help="overrides the config's")
    p.add_argument("--results", type=Path, default=None, help="where records go (default: a temporary folder)")
    p.add_argument("--throughput-args", default="--images 12800 --batch-size 256 --repeats 2 --processes 11")
    p.add_argument("--throughput-seconds", type=float, default=90.0)
    p.add_argument("--latency-runtime", default="torch-cuda", help="runtime of the latency phase (torch: a CPU rehearsal)")
    p.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    results = args.results or Path(tempfile.gettempdir()) / "prunebench-window" / "results"
    if args.one_seed is not None:
        return run_seed(args.config, args.one_seed, args.runs_per_gpu, results)

    deadline = args.deadline or time.time() + 540
    stop = deadline - RESERVE_S
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    say(f"{(deadline - time.time()):.0f}s until the deadline; output in {out}, records in {results}")
    (out / "env.txt").write_text(environment())
    print((out / "env.txt").read_text(), flush=True)
    (out / "sweep.toml").write_text(args.config.read_text())
    sweep = load_config(args.config, args.runs_per_gpu, results)

    say(f"dataset {sweep.dataset}: decoding once into the cache")
    from prunebench import registry
    from prunebench.datasets import data_root

    t0 = time.time()
    registry.datasets.get(sweep.dataset).load(data_root(sweep.data_dir), **dict(sweep.dataset_options))
    say(f"dataset ready in {time.time() - t0:.1f}s")

    if args.throughput_seconds > 0:
        say("throughput table")
        budget = min(args.throughput_seconds, stop - time.time() - MIN_SEED_S)
        cmd = [sys.executable, str(HERE / "train_throughput.py"), *shlex.split(args.throughput_args),
               "--budget-seconds", f"{max(0.0, 0.6 * budget):.0f}"]
        status = run_until(cmd, time.time() + budget, stdout=out / "throughput.md")
        say(f"throughput table: {'stopped at its time limit' if status is None else f'exit status {status}'}")

    last: float | None = None
    for seed in sweep.seeds:
        left = stop - time.time()
        if not should_start(left, last):
            say(f"not starting seed {seed}: {left:.0f}s left, the last seed took {last or 0:.0f}s")
            break
        say(f"seed {seed}: starting ({left:.0f}s left)")
        t0 = time.time()
        cmd = [sys.executable, __file__, "--out", str(out), "--config", str(args.config), "--results", str(results),
               "--one-seed", str(seed)] + (["--runs-per-gpu", str(args.runs_per_gpu)] if args.runs_per_gpu else [])
        status = run_until(cmd, stop)
        last = time.time() - t0
        say(f"seed {seed}: {'stopped at the deadline' if status is None else f'done (exit status {status})'} "
            f"after {last:.0f}s")
        pack(results, out)
        text = summary(results)
        (out / "summary.md").write_text(text)
        print(text, flush=True)
        if status is None:
            break
    gpu_latency(results, stop, args.latency_runtime)
    pack(results, out)
    if time.time() < deadline - 5:
        try:
            leaderboard(results, out)
            say("leaderboard pages in leaderboard.tar.gz")
        except Exception as exc:  # noqa: BLE001 - the records are what matters
            say(f"leaderboard failed: {type(exc).__name__}: {exc}")
    done = sum(r.get("status") == "complete" for r in records(results))
    say(f"finished: {done} complete records; {deadline - time.time():.0f}s before the deadline")
    return 0


if __name__ == "__main__":
    sys.exit(main())
