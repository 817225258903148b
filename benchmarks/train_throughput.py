"""Training throughput (img/s) of the engine against a plain torchvision DataLoader loop.

On the current device, in one process and interleaved (every variant once per repeat, so
machine load hits all of them alike), it trains ResNet-56 (default) on ~1,536 cifar10-jpeg
training images (random uint8 images of the same shape when ``PRUNEBENCH_DATA`` lacks the
archive) and prints img/s for:

* **engine**: ``prunebench.training.engine.train`` with its defaults (precision ``auto``: bf16 where
  the device computes it natively; channels_last with bf16; no ``torch.compile``);
* **plain loop**: the baseline to beat, fp32: a ``torch.utils.data.DataLoader`` over the same
  uint8 images with torchvision's ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
  ``ToDtype`` and ``Normalize`` per sample, SGD, and ``loss.item()`` per step as such loops do;
* the engine with each speed option switched from its default: fp32 precision, channels_last
  off;
* optionally (``--processes N``) N engine processes training at once: the aggregate img/s of
  packed runs;
* with ``torch.compile`` (and, on CUDA, its CUDA-graph mode ``reduce-overhead``), timed last and
  alternately with the default engine, with the compile time and the images after which it
  pays for itself;
* the **compute-bound limit**: training costs 3 × MACs multiply-accumulates of 2 FLOP per
  image (forward, and backward for inputs and weights), so ``peak / (6 × MACs)`` img/s, and
  each row's share of it.

Peaks (``--peak-tflops`` for bf16, ``--peak-tflops-fp32``) default per device kind: the
H100/H200 SXM datasheet's dense rates (bf16 989.4 TFLOP/s; fp32 494.7 as TF32, which cuDNN
uses for fp32 convolutions by default, else 66.9); on a CPU, threads × reported clock × FLOP
per cycle, assuming two FMA pipes per core, 512 bits wide where the CPU has full-width
AVX-512 (64 fp32 / 128 bf16 FLOP per cycle; Intel server cores, AMD Zen 5) and 256 bits wide
otherwise (32 / 64; AMD Zen 4, AVX2 CPUs) — an estimate: pass the peak when you know it.

    python benchmarks/train_throughput.py                         # CPU or GPU, whatever is here
    python benchmarks/train_throughput.py --processes 4 --images 25600 --batch-size 256
    python benchmarks/train_throughput.py --concurrent 2 --repeats 1   # two at once, three thread settings
    python benchmarks/train_throughput.py --variants engine,plain --beside 1   # with another run beside it

``--beside K`` keeps K engine processes (prunebench's default threads) training in the
background while the variants are timed: "with a second run beside it". The timed loops then
all use the thread count that prunebench's start-up measurement picks beside them (the plain
loop too, so that it is not the one to collapse).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunebench import registry
from prunebench.pipeline.metrics import count_macs
from prunebench.results.records import cpu_name
from prunebench.training.engine import DeviceData, train
from prunebench.training.precision import cpu_supports_bf16, resolve_precision
from prunebench.training.steps import Recipe, TrainOptions, optimizer

VARIANTS = ("engine", "plain", "engine-fp32", "engine-no-channels-last", "engine-compile", "engine-cudagraphs")
COMPILED = ("engine-compile", "engine-cudagraphs")
#: dense datasheet peaks in TFLOP/s by device-name fragment: (bf16, fp32 as TF32, plain fp32)
GPU_PEAKS = {"H200": (989.4, 494.7, 66.9), "H100": (989.4, 494.7, 66.9), "A100": (312.0, 156.0, 19.5)}
#: assumed dense FLOP per cycle per CPU core, by the width of its two FMA pipes (bf16: AVX512-BF16
#: dot products, twice the fp32 rate; without them bf16 is emulated at no more than the fp32 rate)
CPU_FLOP_PER_CYCLE = {512: {"fp32": 64, "bf16": 128}, 256: {"fp32": 32, "bf16": 64}}


@dataclass
class Row:
    name: str
    precision: str
    channels_last: bool
    compiled: bool
    rates: list[float] = field(default_factory=list)  # img/s per repeat
    warm: float = 0.0  # seconds of the 2 warm-up steps (with torch.compile: the compilation)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else float("nan")


# --------------------------------------------------------------------------------- data
def load_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, tuple, tuple, str]:
    """``n`` cifar10-jpeg training images (a fixed random subset), else synthetic uint8 ones."""
    from prunebench.datasets import data_root
    from prunebench.errors import DataNotFoundError

    try:
        splits = registry.datasets.get("cifar10-jpeg").load(data_root(None))
        idx = torch.randperm(splits.train_x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
        return splits.train_x[idx], splits.train_y[idx], splits.mean, splits.std, "cifar10-jpeg"
    except DataNotFoundError:
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        return x, y, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "synthetic uint8 (cifar10-jpeg not found)"


def device_data(x, y, mean, std, dev: torch.device) -> DeviceData:
    c = x.shape[1]
    return DeviceData(train_x=x.to(dev), train_y=y.to(dev), test_x=x[:0].to(dev), test_y=y[:0].to(dev),
                      mean=torch.tensor(mean, device=dev).view(1, c, 1, 1),
                      std=torch.tensor(std, device=dev).view(1, c, 1, 1), hflip=True)


def build(arch: str, dev: torch.device, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return registry.architectures.get(arch).build(num_classes=10, in_channels=3).to(dev)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --------------------------------------------------------------------------------- loops
class EngineLoop:
    """``prunebench.training.engine.train`` for whole epochs over the images."""

    def __init__(self, arch: str, data: DeviceData, batch_size: int, options: TrainOptions) -> None:
        self.model = build(arch, data.device)
        self.data, self.bs, self.options = data, batch_size, options
        self.steps_per_epoch = max(1, int(data.train_x.shape[0]) // batch_size)

    def __call__(self, steps: int) -> int:
        recipe = Recipe(epochs=steps / self.steps_per_epoch, lr=0.02, batch_size=self.bs, momentum=0.9,
                        weight_decay=5e-4, schedule="constant")
        train(self.model, self.data, recipe, seed=0, options=self.options)
        return steps * self.bs


class PlainLoop:
    """The usual fp32 loop: torchvision transforms per sample in a DataLoader, ``loss.item()`` per step."""

    def __init__(self, arch: str, x: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int,
                 dev: torch.device, workers: int) -> None:
        from torch.utils.data import DataLoader, Dataset
        from torchvision.transforms import v2

        transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])

        class Images(Dataset):
            def __len__(self) -> int:
                return int(x.shape[0])

            def __getitem__(self, i: int):
                return transform(x[i]), y[i]

        self.loader = DataLoader(Images(), batch_size=batch_size, shuffle=True, drop_last=True,
                                 num_workers=workers, pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
        self.model = build(arch, dev)
        self.dev, self.bs = dev, batch_size
        recipe = Recipe(epochs=1, lr=0.02, batch_size=batch_size, momentum=0.9, weight_decay=5e-4, schedule="constant")
        self.opt = optimizer(self.model, recipe)
        self._it = iter(())

    def _next(self):
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def __call__(self, steps: int) -> int:
        self.model.train()
        running = 0.0
        for _ in range(steps):
            xb, yb = self._next()
            xb, yb = xb.to(self.dev, non_blocking=True), yb.to(self.dev, non_blocking=True)
            loss = F.cross_entropy(self.model(xb), yb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            running += loss.item()
        return steps * self.bs


def timed(loop: Callable[[int], int], steps: int, dev: torch.device) -> float:
    """img/s of ``steps`` steps."""
    sync(dev)
    t0 = time.perf_counter()
    images = loop(steps)
    sync(dev)
    return images / (time.perf_counter() - t0)


# --------------------------------------------------------------------------------- peaks
def peaks(dev: torch.device, bf16: float | None, fp32: float | None) -> tuple[dict[str, float | None], str]:
    """Peak TFLOP/s per precision and where the numbers come from."""
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        known = next((p for key, p in GPU_PEAKS.items() if key in name), None)
        tf32 = torch.backends.cudnn.allow_tf32
        default_bf16 = known[0] if known else None
        default_fp32 = (known[1] if tf32 else known[2]) if known else None
        source = f"{name}: datasheet dense peaks" if known else f"{name}: no default peak, pass --peak-tflops"
    else:
        cores = torch.get_num_threads()
        ghz = _cpu_ghz()
        width, why = _fma_width()
        flop = dict(CPU_FLOP_PER_CYCLE[width])
        if not cpu_supports_bf16():
            flop["bf16"] = flop["fp32"]
        default_bf16 = cores * ghz * flop["bf16"] / 1e3
        default_fp32 = cores * ghz * flop["fp32"] / 1e3
        source = (f"CPU estimate: {cores} threads × {ghz:.2f} GHz (reported clock) × {flop['bf16']} (bf16) / "
                  f"{flop['fp32']} (fp32) FLOP per cycle, assuming two {width}-bit FMA pipes per core ({why})")
    out = {"bf16": bf16 if bf16 is not None else default_bf16, "fp32": fp32 if fp32 is not None else default_fp32}
    if bf16 is not None or fp32 is not None:
        source += "; given on the command line: " + ", ".join(
            f"{k} {v:g}" for k, v in (("bf16", bf16), ("fp32", fp32)) if v is not None)
    return out, source


def _fma_width() -> tuple[int, str]:
    """512 where the cores have full-width AVX-512 FMA pipes (Intel server cores, AMD Zen 5),
    else 256 (AMD Zen 4 runs AVX-512 on 256-bit pipes; AVX2 CPUs)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return 256, "no /proc/cpuinfo"
    if "avx512f" not in info.get("flags", "").split():
        return 256, "no AVX-512"
    if info.get("vendor_id") == "AuthenticAMD" and info.get("cpu family") == "25":
        return 256, "AMD family 25 (Zen 4)"
    return 512, f"AVX-512, {info.get('vendor_id', '?')} family {info.get('cpu family', '?')}"


def _cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        if mhz:
            return max(mhz) / 1e3
    except (OSError, ValueError):
        pass
    return 2.5


# --------------------------------------------------------------------------------- packed processes
#: thread settings of ``--concurrent``: prunebench's default (measured per stage), every core per
#: process (what PyTorch takes by default), one thread per process
THREAD_MODES = {"measured (default)": None, "all cores each": "all", "one thread each": "1"}


def packed(args: argparse.Namespace, processes: int, mode: str | None = "split") -> tuple[float, list[float]]:
    """Aggregate img/s of ``processes`` engine processes training at once (they start together
    after their warm-up), and each one's own img/s. ``mode``: ``split`` (the cores divided
    among the processes, as a sweep does), ``all``, ``1``, or None (prunebench measures)."""
    cores = os.cpu_count() or 1
    threads = {"split": str(max(1, cores // processes)), "all": str(cores), "1": "1", None: None}[mode]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--worker", tmp, "--arch", args.arch, "--batch-size", str(args.batch_size),
               "--images", str(args.images), "--epochs", str(args.epochs), "--device", args.device]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PRUNEBENCH_THREADS")}
        if threads is not None:
            env.update(OMP_NUM_THREADS=threads, PRUNEBENCH_THREADS=threads)
        procs = [subprocess.Popen([*cmd, "--worker-index", str(i)], env=env) for i in range(processes)]
        try:
            deadline = time.monotonic() + 900
            while len(list(Path(tmp).glob("ready.*"))) < processes:
                if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                    raise RuntimeError("a packed worker failed before it was ready")
                time.sleep(0.05)
            (Path(tmp) / "go").touch()
            for p in procs:
                if p.wait() != 0:
                    raise RuntimeError(f"a packed worker exited with status {p.returncode}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        results = [json.loads((Path(tmp) / f"result.{i}").read_text()) for i in range(processes)]
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    total = sum(r["images"] for r in results)
    return total / (end - start), [r["images"] / (r["end"] - r["start"]) for r in results]


def worker(args: argparse.Namespace) -> None:
    """One packed process: warm up, say ready, wait for the others, train, write the result
    (with ``--forever``: train until the file ``stop`` appears, write nothing)."""
    from prunebench.training import threads

    threads.apply_fixed()  # PRUNEBENCH_THREADS, or measured as a prunebench command does by default
    dev = _device(args.device)
    x, y, mean, std, _ = load_images(args.images)
    loop = EngineLoop(args.arch, device_data(x, y, mean, std, dev), args.batch_size, TrainOptions())
    loop(2)
    sync(dev)
    tmp = Path(args.worker)
    (tmp / f"ready.{args.worker_index}").touch()
    if args.forever:
        while not (tmp / "stop").exists():
            loop(1)
        return
    while not (tmp / "go").exists():
        time.sleep(0.01)
    start = time.time()
    images = loop(int(args.epochs * loop.steps_per_epoch))
    sync(dev)
    end = time.time()
    (tmp / f"result.{args.worker_index}").write_text(json.dumps({"images": images, "start": start, "end": end}))


def concurrent(args: argparse.Namespace) -> None:
    """K engine processes started together under each thread setting: wall time of the slowest
    and aggregate img/s. Shows the oversubscription collapse, and that the default avoids it."""
    from tabulate import tabulate

    rows = []
    for name, mode in THREAD_MODES.items():
        for r in range(args.repeats):
            t0 = time.monotonic()
            total, each = packed(args, args.concurrent, mode)
            wall = time.monotonic() - t0
            rows.append([name, r + 1, f"{wall:.1f}", f"{total:.0f}", ", ".join(f"{e:.0f}" for e in each)])
            print(f"{name}, repeat {r + 1}: {wall:.1f} s, {total:.0f} img/s", flush=True)
    print(f"\n{args.concurrent} engine processes at once, {args.arch}, {args.images} images, {args.epochs:g} epoch, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs ({cpu_name()}); wall time includes start-up and warm-up")
    print(tabulate(rows, headers=["threads", "repeat", "wall s", "aggregate img/s", "each img/s"],
                   tablefmt="github", disable_numparse=True))


class Beside:
    """``k`` engine processes training in the background until the block ends."""

    def __init__(self, args: argparse.Namespace, k: int) -> None:
        self.args, self.k, self.procs = args, k, []

    def __enter__(self) -> Beside:
        if self.k < 1:
            return self
        self.tmp = tempfile.TemporaryDirectory()
        a = self.args
        cmd = [sys.executable, __file__, "--worker", self.tmp.name, "--forever", "--arch", a.arch,
               "--batch-size", str(a.batch_size), "--images", str(a.images), "--device", a.device]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PRUNEBENCH_THREADS")}
        self.procs = [subprocess.Popen([*cmd, "--worker-index", str(i)], env=env) for i in range(self.k)]
        while len(list(Path(self.tmp.name).glob("ready.*"))) < self.k:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("a background run failed before it was ready")
            time.sleep(0.05)
        print(f"{self.k} engine process(es) training beside the timed loops", flush=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.k < 1:
            return
        (Path(self.tmp.name) / "stop").touch()
        for p in self.procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        self.tmp.cleanup()


# --------------------------------------------------------------------------------- main
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--arch", default="resnet56")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=1536)
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per timed repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="plain loop's DataLoader workers (default: 0 on a CPU, 8 on CUDA)")
    p.add_argument("--processes", type=int, default=0, help="also time N engine processes at once")
    p.add_argument("--concurrent", type=int, default=0,
                   help="only time K engine processes started together, with prunebench's default threads "
                        "(measured), with every core each, and with one thread each")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    p.add_argument("--peak-tflops-fp32", type=float, default=None, help="the device's fp32 peak")
    p.add_argument("--budget-seconds", type=float, default=None, help="skip variants not started by then")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--forever", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--beside", type=int, default=0,
                   help="keep K engine processes training in the background while timing")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.concurrent:
        concurrent(args)
        return
    unknown = sorted({v.strip() for v in args.variants.split(",") if v.strip()} - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    with Beside(args, args.beside):
        if args.beside:
            from prunebench.training import threads

            threads.apply_fixed()  # the count prunebench's start-up measurement picks beside them
        timings(args)


def timings(args: argparse.Namespace) -> None:
    """The interleaved table of the variants (and packed and compiled rows)."""
    t_start = time.monotonic()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    dev = _device(args.device)
    x, y, mean, std, source = load_images(args.images)
    data = device_data(x, y, mean, std, dev)
    auto = resolve_precision("auto", dev)
    steps = max(1, int(args.epochs * max(1, args.images // args.batch_size)))
    workers = args.loader_workers if args.loader_workers is not None else (8 if dev.type == "cuda" else 0)
    cl_default = auto == "bf16" or dev.type == "cuda"

    def engine_row(name: str, **opts) -> tuple[Row, Callable[[int], int]]:
        o = TrainOptions(**opts)
        prec = resolve_precision(o.precision, dev)
        cl = o.channels_last if o.channels_last is not None else (prec == "bf16" or dev.type == "cuda")
        return Row(name, prec, cl, o.compile), EngineLoop(args.arch, data, args.batch_size, o)

    makers = {
        "engine": lambda: engine_row("engine (default)"),
        "plain": lambda: (Row(f"plain DataLoader loop ({workers} workers)", "fp32", False, False),
                          PlainLoop(args.arch, x, y, mean, std, args.batch_size, dev, workers)),
        "engine-fp32": lambda: engine_row("engine, fp32", precision="fp32"),
        "engine-no-channels-last": lambda: engine_row("engine, channels_last off", channels_last=False),
        "engine-compile": lambda: engine_row("engine, torch.compile", compile=True),
        "engine-cudagraphs": lambda: engine_row("engine, torch.compile reduce-overhead", compile=True,
                                                compile_mode="reduce-overhead"),
    }
    if dev.type != "cuda" and "engine-cudagraphs" in variants:
        variants.remove("engine-cudagraphs")  # CUDA graphs: CUDA only

    def over_budget() -> bool:
        return args.budget_seconds is not None and time.monotonic() - t_start > args.budget_seconds

    def warm_up(v: str) -> tuple[Row, Callable[[int], int]] | None:
        if over_budget():
            print(f"skipped {v}: past --budget-seconds", flush=True)
            return None
        try:
            row, loop = makers[v]()
            t0 = time.perf_counter()
            loop(2)  # warm-up (and, with torch.compile, the compilation)
            sync(dev)
        except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the table
            print(f"failed: {v}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            return None
        row.warm = time.perf_counter() - t0
        if row.compiled:
            row.note = f"first 2 steps {row.warm:.1f}s"
        print(f"ready: {row.name} (warm-up {row.warm:.1f}s)", flush=True)
        return row, loop

    def measure(group: list[tuple[Row, Callable[[int], int]]]) -> None:
        """``args.repeats`` timings of each, interleaved."""
        for r in range(args.repeats):
            if r > 0 and over_budget():
                print(f"stopped after {r} repeats: past --budget-seconds", flush=True)
                return
            for row, loop in group:
                try:
                    row.rates.append(timed(loop, steps, dev))
                except Exception as exc:  # noqa: BLE001
                    row.note = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
                    print(f"{row.name}: {row.note}", flush=True)
            print(f"repeat {r + 1}: " + ", ".join(f"{row.name} {row.rates[-1] if row.rates else float('nan'):.0f}"
                                                 for row, _ in group), flush=True)

    # eager loops first, then packed processes, then the compiled loops (their compilation can
    # take minutes; each is timed beside the default engine, for the pay-off estimate)
    rows = [r for r in (warm_up(v) for v in variants if v not in COMPILED) if r is not None]
    measure(rows)
    macs = count_macs(build(args.arch, torch.device("cpu")), torch.zeros(1, 3, 32, 32))
    peak, peak_source = peaks(dev, args.peak_tflops, args.peak_tflops_fp32)
    plain = next((row.median for row, _ in rows if row.name.startswith("plain")), None)
    extra = []
    if args.processes > 1 and not over_budget():
        try:
            total, each = packed(args, args.processes)
            extra.append(_line(f"engine × {args.processes} processes (aggregate)", auto, cl_default, False, total,
                               plain, macs, peak.get(auto), f"each {', '.join(f'{e:.0f}' for e in each)}"))
        except Exception as exc:  # noqa: BLE001
            print(f"failed: packed processes: {type(exc).__name__}: {exc}", flush=True)
    compiled = [r for r in (warm_up(v) for v in variants if v in COMPILED) if r is not None]
    beside = None
    if compiled:
        default = next(((row, loop) for row, loop in rows if row.name == "engine (default)"), None)
        if default is not None:
            beside = (Row("engine (default), timed beside the compiled loops", default[0].precision,
                          default[0].channels_last, False), default[1])
        measure(([beside] if beside else []) + compiled)
        rows += compiled
    table = [_line(row.name, row.precision, row.channels_last, row.compiled, row.median, plain, macs,
                   peak.get(row.precision), row.note) for row, _ in rows] + extra
    for prec in ("bf16", "fp32"):
        if peak.get(prec):
            limit = peak[prec] * 1e12 / (6 * macs)
            table.append([f"compute-bound limit ({prec} peak {peak[prec]:.4g} TFLOP/s)", prec, "", "", f"{limit:,.0f}",
                          f"{limit / plain:.1f}" if plain else "", f"{peak[prec]:.4g}", "100%", ""])

    compile_note = "\n".join(_compile_payoff(row, beside[0] if beside else None, args.batch_size)
                             for row, _ in compiled)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    if args.beside:
        name += f", {args.beside} engine process(es) training beside"
    print()
    print(f"device {dev.type} ({name}) · torch {torch.__version__} · {args.arch} ({macs / 1e6:.1f}M MACs/image) · "
          f"batch {args.batch_size} · {args.images} images ({source}) · {steps} steps per timing × "
          f"{len(rows[0][0].rates) if rows else 0} repeats, interleaved · peaks: {peak_source}")
    print()
    headers = ["loop", "precision", "channels_last", "compile", "img/s (median)", "× plain", "TFLOP/s", "% of peak",
               "note"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for line in table:
        print("| " + " | ".join(str(c) for c in line) + " |")
    if compile_note:
        print()
        print(compile_note)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "macs": macs, "table": table, "headers": headers}, indent=1))


def _compile_payoff(comp: Row, eager: Row | None, batch_size: int) -> str:
    """How long compiling took, and after how many images of training it pays for itself."""
    if eager is None or not comp.rates or not eager.rates:
        return ""
    overhead = comp.warm - 2 * batch_size / comp.median  # the warm-up's 2 steps at the compiled rate
    saving = 1 / eager.median - 1 / comp.median  # seconds saved per image once compiled
    line = (f"{comp.name}: about {overhead:.0f}s to compile; compiled {comp.median:,.0f} vs eager "
            f"{eager.median:,.0f} img/s (timed alternately)")
    if saving <= 0:
        return line + ": it never pays for its compile time"
    return line + f": pays for itself after {overhead / saving:,.0f} images of training (per model compiled)"


def _line(name, precision, channels_last, compiled, rate, plain, macs, peak, note) -> list[str]:
    tflops = rate * 6 * macs / 1e12
    return [name, precision, "on" if channels_last else "off", "on" if compiled else "off", f"{rate:,.0f}",
            f"{rate / plain:.2f}" if plain else "", f"{tflops:.3g}", f"{100 * tflops / peak:.1f}%" if peak else "n/a",
            note]


if __name__ == "__main__":
    main()
