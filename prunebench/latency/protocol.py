"""The latency protocol: measured speed-ups, separate from the accuracy run (docs/latency.md).

``prunebench latency RESULTS_DIR`` measures each compressed model of a results directory
against its baseline (the unpruned architecture):

* the compressed model is rebuilt with :func:`prunebench.pipeline.surgery.load_compressed` from its
  model file, or, when the file is gone, from the record's widths on a freshly built
  architecture (latency depends on the architecture, not on the weights);
* per runtime (``torch``: PyTorch eager fp32; ``onnxruntime``: ONNX Runtime on the CPU, after
  an export checked against PyTorch to ``max |Δ logits| <= 1e-4``) and per (batch, threads)
  setting, baseline and compressed model are timed **interleaved** (baseline, compressed,
  baseline, ...) after a warm-up, ``repeats >= 30`` times each, with pinned threads;
* the result is the median latency of each and a 95 % interval of the speed-up, by a seeded
  bootstrap over the paired repeats;
* before and after each timing the machine must be quiet: the load average (others' load
  beside our own threads) and the spread of a fixed probe kernel timed before and after.
  A noisy machine is refused, or with ``allow_noisy`` the result is written marked
  ``unreliable`` with the measured numbers; never silently.

One latency record (JSON, schema ``prunebench-latency/1``) is written atomically per
(digest of the compressed architecture, runtime, batch, threads, hardware) under
``RESULTS_DIR/latency/``; the accuracy records are only read. Each names the run ids whose
models it measured. The clock and the machine probes are injectable (:class:`Machine`,
``clock``) so the protocol's rules are tested without real timing.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunebench.errors import PrunebenchError

SCHEMA = "prunebench-latency/1"
RUNTIMES = ("torch", "onnxruntime", "openvino")
#: runtimes that run the exported ONNX graph, and the extra that installs each
ONNX_RUNTIMES = {"onnxruntime": "onnx", "openvino": "openvino"}
MIN_REPEATS = 30
#: ONNX export check: max |Δ logits| against PyTorch, fp32, on CHECK_IMAGES seeded N(0, 1) inputs
EXPORT_TOLERANCE = 1e-4
CHECK_IMAGES = 8
#: quiet machine: the 1-minute load average at most our own threads + LOAD_PER_CPU × CPUs ...
LOAD_PER_CPU = 0.25
#: ... and the probe kernel's spread (relative IQR before, after, and the drift between) at most this
PROBE_SPREAD_LIMIT = 0.10
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


class NoisyMachineError(PrunebenchError):
    """The machine is not quiet enough for latency to mean anything."""


class ExportError(PrunebenchError):
    """A model does not export to ONNX, or its ONNX graph computes other logits than PyTorch."""


# --- the machine --------------------------------------------------------------------------


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def _load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):
        return 0.0


def probe_kernel(samples: int = 15, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of a fixed kernel (four 256x256 fp32 matrix products on one thread, a few
    milliseconds: long enough that the timer's and the thread pool's jitter do not count),
    ``samples`` times after one untimed call."""
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)) / 16
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for i in range(samples + 1):
                t0 = clock()
                b = a
                for _ in range(4):
                    b = torch.tanh(b @ a)
                if i:
                    out.append(clock() - t0)
    finally:
        torch.set_num_threads(threads)
    return out


@dataclass
class Machine:
    """What the quiet check reads: the load average, the CPUs this process may use, and the
    probe kernel's timings. Tests pass fakes."""

    load: Callable[[], float] = _load_average
    cpus: Callable[[], int] = available_cpus
    probe: Callable[[], list[float]] = probe_kernel


@dataclass
class Quiet:
    """One check of the machine, before (``probe_before``) and after (``probe_after``) a timing."""

    load: float
    cpus: int
    threads: int
    probe_before: list[float]
    probe_after: list[float] | None = None
    load_after: float | None = None

    @property
    def load_limit(self) -> float:
        return self.threads + LOAD_PER_CPU * self.cpus

    @property
    def spread(self) -> float:
        """Largest of the probe's relative IQR before, after, and the drift of its median."""
        parts = [_relative_iqr(self.probe_before)]
        if self.probe_after:
            parts.append(_relative_iqr(self.probe_after))
            before, after = statistics.median(self.probe_before), statistics.median(self.probe_after)
            parts.append(abs(after - before) / max(before, 1e-12))
        return max(parts)

    def problems(self) -> list[str]:
        found = []
        for when, value in (("before", self.load), ("during", self.load_after)):
            if value is not None and value > self.load_limit + 1e-12:
                found.append(f"load average {value:.2f} {when} timing on {self.cpus} CPUs (at most "
                             f"{self.load_limit:.2f} for {self.threads} thread(s))")
        if self.spread > PROBE_SPREAD_LIMIT:
            found.append(f"probe-kernel spread {self.spread:.1%} (at most {PROBE_SPREAD_LIMIT:.0%})")
        return found

    def describe(self) -> dict[str, Any]:
        return {
            "load_before": round(self.load, 3), "load_after": None if self.load_after is None else round(self.load_after, 3),
            "load_limit": round(self.load_limit, 3), "cpus": self.cpus, "threads": self.threads,
            "probe_spread": round(self.spread, 4), "probe_spread_limit": PROBE_SPREAD_LIMIT,
            "problems": self.problems(),
        }


def _relative_iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q1, q3 = np.percentile(np.asarray(values, dtype=float), [25, 75])
    return float((q3 - q1) / max(float(np.median(values)), 1e-12))


def check_quiet(machine: Machine, threads: int) -> Quiet:
    """Read the load and time the probe kernel (before a timing)."""
    return Quiet(load=machine.load(), cpus=machine.cpus(), threads=threads, probe_before=list(machine.probe()))


def finish_quiet(quiet: Quiet, machine: Machine) -> Quiet:
    """Read the load and time the probe again (after a timing)."""
    quiet.load_after = machine.load()
    quiet.probe_after = list(machine.probe())
    return quiet


def refusal(quiet: Quiet) -> str:
    return ("the machine is not quiet enough to measure latency: " + "; ".join(quiet.problems())
            + ". Measure on an idle machine, or pass --allow-noisy to record the result marked unreliable")


# --- timing and the interval --------------------------------------------------------------


def interleaved(first: Callable[[], Any], second: Callable[[], Any], repeats: int, warmup: int,
                clock: Callable[[], float] = time.perf_counter) -> tuple[list[float], list[float]]:
    """Seconds per call of ``first`` and ``second``, timed alternately (first, second, first,
    ...) after ``warmup`` untimed calls of each, also alternated."""
    for _ in range(warmup):
        first()
        second()
    a: list[float] = []
    b: list[float] = []
    for _ in range(repeats):
        for fn, out in ((first, a), (second, b)):
            t0 = clock()
            fn()
            out.append(clock() - t0)
    return a, b


def speedup_interval(baseline: Sequence[float], compressed: Sequence[float], level: float = 0.95,
                     resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Speed-up = median(baseline) / median(compressed), and its ``level`` interval by a seeded
    percentile bootstrap over the *paired* repeats (repeat i of both resampled together)."""
    base = np.asarray(baseline, dtype=float)
    comp = np.asarray(compressed, dtype=float)
    if base.shape != comp.shape or base.size == 0:
        raise ValueError("paired repeats: both lists must have the same, non-zero length")
    point = float(np.median(base) / np.median(comp))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, base.size, size=(resamples, base.size))
    ratios = np.median(base[idx], axis=1) / np.median(comp[idx], axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return {"median": round(point, 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "method": "percentile bootstrap over paired repeats", "resamples": resamples, "seed": seed}


# --- runtimes -----------------------------------------------------------------------------


def installed(runtime: str) -> bool:
    """Is ``runtime`` usable here? ONNX runtimes need ``onnx`` (torch's exporter writes with it),
    ``onnxruntime`` (the export check) and their own package: the ``onnx`` / ``openvino`` extras."""
    if runtime == "torch":
        return True
    import importlib.util

    needed = ["onnx", "onnxruntime"] + (["openvino"] if runtime == "openvino" else [])
    return all(importlib.util.find_spec(name) is not None for name in needed)


def has_onnxruntime() -> bool:
    return installed("onnxruntime")


def runtime_version(runtime: str) -> str:
    if runtime == "torch":
        return torch.__version__
    if runtime == "openvino":
        import openvino

        return openvino.__version__
    import onnxruntime

    return onnxruntime.__version__


@contextlib.contextmanager
def _exporter_silenced():
    """No warnings, and nothing on the process's stdout/stderr: torch's TorchScript exporter
    logs the whole graph there (at C++ level) when an export fails."""
    saved = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                saved.append((fd, os.dup(fd)))
                os.dup2(null.fileno(), fd)
    except OSError:  # no such descriptors (embedded interpreters): export as is
        pass
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        for fd, copy_ in saved:
            os.dup2(copy_, fd)
            os.close(copy_)


def export_onnx(model: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX graph of ``model`` (eval mode) with a dynamic batch dimension."""
    buffer = io.BytesIO()
    with _exporter_silenced():
        torch.onnx.export(model.eval(), (example,), buffer, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    return buffer.getvalue()


def ort_session(graph: bytes, threads: int):
    """An ONNX Runtime CPU session pinned to ``threads`` intra-op threads, one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])


def max_logit_difference(model: nn.Module, graph: bytes, inputs: torch.Tensor) -> float:
    session = ort_session(graph, 1)
    with torch.no_grad():
        expected = model.eval()(inputs).float().numpy()
    if len(session.get_inputs()) != 1:  # the input was folded into a constant: the graph ignores it
        return float("inf")
    got = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})[0]
    if got.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(got - expected)))


def check_inputs(input_shape: Sequence[int], n: int = CHECK_IMAGES) -> torch.Tensor:
    """Calibration-like inputs: normalised images are about N(0, 1); seeded."""
    return torch.randn(n, *input_shape[1:], generator=torch.Generator().manual_seed(1234))


def exported(model: nn.Module, input_shape: Sequence[int]) -> tuple[bytes, float]:
    """Export ``model`` and check it: (graph, max |Δ logits|). Raises :class:`ExportError`
    naming the module type that fails the export or the check."""
    example = torch.zeros(1, *input_shape[1:])
    inputs = check_inputs(input_shape)
    try:
        graph = export_onnx(model, example)
        diff = max_logit_difference(model, graph, inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the exporter is reported the same way
        raise ExportError(f"ONNX export failed in module {culprit(model, example)} "
                          f"({type(exc).__name__}: {_first_line(exc)})") from None
    if not diff <= EXPORT_TOLERANCE:
        how = (f"max |Δ logits| {diff:.3g} > {EXPORT_TOLERANCE:g}" if np.isfinite(diff)
               else "it ignores its input or gives logits of another shape")
        raise ExportError(f"ONNX graph differs from PyTorch ({how}) in module {culprit(model, inputs)}")
    return graph, diff


def openvino_checked(model: nn.Module, graph: bytes, input_shape: Sequence[int]) -> float:
    """OpenVINO's max |Δ logits| against PyTorch; :class:`ExportError` beyond the tolerance."""
    inputs = check_inputs(input_shape)
    try:
        diff = openvino_difference(model, graph, inputs)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"OpenVINO cannot compile the ONNX graph ({type(exc).__name__}: {_first_line(exc)})") from None
    if not diff <= EXPORT_TOLERANCE:
        raise ExportError(f"OpenVINO computes other logits than PyTorch (max |Δ logits| {diff:.3g} > "
                          f"{EXPORT_TOLERANCE:g})")
    return diff


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def culprit(model: nn.Module, example: torch.Tensor) -> str:
    """The type name of the innermost module that fails to export or to match PyTorch on its
    own (each module type tried once, deepest first); the model's own type when none does."""
    captured: dict[str, tuple[torch.Tensor, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            if name not in captured and args and all(isinstance(a, torch.Tensor) for a in args):
                captured[name] = tuple(a.detach().clone() for a in args)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example)
    except Exception:  # noqa: BLE001 - the model itself does not run: name it
        return type(model).__name__
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    tried: set[type] = set()
    for name in sorted(captured, key=lambda n: -n.count(".")):
        module = modules[name]
        if type(module) in tried:
            continue
        tried.add(type(module))
        if not _module_exports(module, captured[name]):
            return type(module).__name__
    return type(model).__name__


def _module_exports(module: nn.Module, args: tuple[torch.Tensor, ...]) -> bool:
    try:
        buffer = io.BytesIO()
        with _exporter_silenced():
            torch.onnx.export(module.eval(), args, buffer, dynamo=False)
        with torch.no_grad():
            expected = module(*args)
        if not isinstance(expected, torch.Tensor):
            return True  # only tensor outputs are compared
        session = ort_session(buffer.getvalue(), 1)
        if len(session.get_inputs()) != len(args):  # an input folded into a constant
            return False
        feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=False)}
        got = session.run(None, feeds)[0]
        return got.shape == tuple(expected.shape) and float(np.max(np.abs(got - expected.float().numpy()),
                                                                   initial=0.0)) <= EXPORT_TOLERANCE
    except Exception:  # noqa: BLE001
        return False


@dataclass
class Runner:
    """One forward pass of a model on a fixed batch in one runtime, threads pinned while it runs."""

    call: Callable[[], Any]
    threads: int


def torch_runner(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    model = model.eval()

    def call() -> None:
        with torch.inference_mode():
            model(x)

    return Runner(call, threads)


def ort_runner(graph: bytes, x: torch.Tensor, threads: int) -> Runner:
    session = ort_session(graph, threads)
    feeds = {session.get_inputs()[0].name: x.numpy()}
    return Runner(lambda: session.run(None, feeds), threads)


def openvino_compiled(graph: bytes, shape: Sequence[int], threads: int):
    """The ONNX graph compiled by OpenVINO for the CPU at a fixed input shape: ``threads``
    inference threads, one stream, fp32 inference precision (no bf16 where the CPU has it)."""
    import tempfile

    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(graph)
        model = core.read_model(str(path))
    model.reshape({0: list(shape)})
    return core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                             "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"})


def openvino_difference(model: nn.Module, graph: bytes, inputs: torch.Tensor) -> float:
    """max |Δ logits| between OpenVINO's compiled graph and PyTorch."""
    compiled = openvino_compiled(graph, inputs.shape, 1)
    got = compiled.create_infer_request().infer({0: inputs.numpy()})[compiled.output(0)]
    with torch.no_grad():
        expected = model.eval()(inputs).float().numpy()
    return float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")


def openvino_runner(graph: bytes, x: torch.Tensor, threads: int) -> Runner:
    compiled = openvino_compiled(graph, x.shape, threads)
    request = compiled.create_infer_request()
    feeds = {0: x.numpy()}
    return Runner(lambda: request.infer(feeds), threads)


# --- models of a results directory -------------------------------------------------------


@dataclass
class Subject:
    """A compressed model of a results directory, its baseline architecture, and where it came from."""

    run_id: str
    model: nn.Module
    baseline: nn.Module
    input_shape: list[int]
    arch: str
    arch_kwargs: dict[str, Any]
    source: str  # "model file" | "record widths"
    digest: str = ""

    def __post_init__(self) -> None:
        self.digest = architecture_digest(self.model, self.arch, self.arch_kwargs, self.input_shape)


def architecture_digest(model: nn.Module, arch: str, arch_kwargs: Mapping[str, Any], input_shape: Sequence[int]) -> str:
    """sha256 of what the latency depends on: the modules (types, hyper-parameters, parameter
    and buffer shapes), the architecture it came from with its arguments, and the input shape
    (batch left out). Two runs that arrive at the same widths share it."""
    structure = {
        "arch": arch, "arch_kwargs": dict(sorted(arch_kwargs.items())), "input_shape": list(input_shape[1:]),
        "modules": repr(model),
        "shapes": [[k, list(v.shape)] for k, v in model.state_dict().items()],
    }
    return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()


class RebuildError(PrunebenchError):
    """A compressed model can be neither loaded nor rebuilt from its record."""


def load_subject(results: Path, record: Mapping[str, Any]) -> Subject:
    """The compressed model of ``record`` and its baseline architecture."""
    from prunebench import registry
    from prunebench.errors import CheckpointError
    from prunebench.pipeline.surgery import load_compressed

    rid = record["run_id"]
    data = record.get("data") or {}
    shape = [1, *data.get("input_shape", [])]
    kwargs = {"num_classes": int(data.get("num_classes", 10)), "in_channels": int(shape[1]) if len(shape) > 1 else 3}
    arch = record["arch"]
    baseline = registry.architectures.get(arch).build(**kwargs)
    path = Path(results) / str(record.get("model_file") or f"models/{rid}.pt")
    if path.is_file():
        try:
            model, info = load_compressed(path)
        except CheckpointError as exc:
            raise RebuildError(str(exc)) from None
        return Subject(rid, model, baseline, shape, info["arch"], kwargs, "model file")
    if len(shape) < 2:
        raise RebuildError(f"{rid}: no model file ({path}) and no input shape in the record")
    if record.get("dense"):  # the smaller-dense control: the smaller architecture as built
        model = registry.architectures.get(record["dense"]).build(**kwargs)
        return Subject(rid, model, baseline, shape, record["dense"], kwargs, "record widths")
    if record.get("criterion_kind") == "transform":
        raise RebuildError(f"{rid}: its model file {path} is gone, and a factorised model ({record['criterion']}) "
                           "cannot be rebuilt from its record; restore the file")
    model = copy.deepcopy(baseline)
    widths = record.get("widths") or {}
    modules = dict(model.named_modules())
    kept = {name: list(range(int(w))) for name, w in widths.items()
            if name in modules and int(w) < getattr(modules[name], "out_channels", int(w))}
    if kept:
        from prunebench.pipeline.surgery import prune_kept

        prune_kept(model, torch.zeros(shape), kept)
    return Subject(rid, model, baseline, shape, arch, kwargs, "record widths")


def measurable(results: Path) -> Iterable[dict[str, Any]]:
    """Complete, compressed runs of ``results`` (records only read)."""
    from prunebench.results.records import RecordProblem, scan_records

    for rec in scan_records(results):
        if isinstance(rec, RecordProblem) or rec.get("status") != "complete":
            continue
        yield rec


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    runtime: str
    batch: int
    threads: int  # resolved (never 0)


def hardware_key() -> dict[str, Any]:
    import platform

    from prunebench.results.records import cpu_name

    return {"cpu": cpu_name(), "cpus": available_cpus(), "machine": platform.machine(), "os": os.uname().sysname
            if hasattr(os, "uname") else platform.system()}


def record_name(digest: str, setting: Setting, hardware: Mapping[str, Any]) -> str:
    hw = hashlib.sha256(json.dumps(dict(hardware), sort_keys=True).encode()).hexdigest()[:8]
    return f"{digest[:16]}-{setting.runtime}-b{setting.batch}-t{setting.threads}-{hw}.json"


def latency_dir(results: Path) -> Path:
    return Path(results) / "latency"


@dataclass
class Outcome:
    run_id: str
    setting: Setting
    status: str  # measured | skipped | failed
    path: Path | None = None
    line: str = ""
    record: dict[str, Any] | None = None


@dataclass
class Options:
    runtimes: Sequence[str] = ("torch",)
    settings: Sequence[tuple[int, int]] = ((1, 1), (64, 0))  # (batch, threads); threads 0: all CPUs
    repeats: int = MIN_REPEATS
    warmup: int = 5
    force: bool = False
    allow_noisy: bool = False
    machine: Machine | None = None  # None: default_machine()
    clock: Callable[[], float] | None = None  # None: default_clock()

    def __post_init__(self) -> None:
        self.machine = self.machine or default_machine()
        self.clock = self.clock or default_clock()


def default_machine() -> Machine:
    """This machine's load average, CPUs and probe kernel."""
    return Machine()


def default_clock() -> Callable[[], float]:
    return time.perf_counter


def resolve_settings(options: Options, cpus: int) -> list[Setting]:
    return [Setting(rt, batch, threads or cpus) for rt in options.runtimes for batch, threads in options.settings]


def _pinned(threads: int):
    class _Pin:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(threads)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Pin()


def measure(subject: Subject, setting: Setting, options: Options, graphs: dict[str, tuple[bytes, float]] | None = None,
            ) -> dict[str, Any]:
    """Time baseline and compressed model interleaved under ``setting``; the record's numbers.
    Raises :class:`NoisyMachineError` on a noisy machine unless ``options.allow_noisy``."""
    x = torch.randn(setting.batch, *subject.input_shape[1:], generator=torch.Generator().manual_seed(0))
    extra: dict[str, Any] = {}
    if setting.runtime == "torch":
        base = torch_runner(subject.baseline, x, setting.threads)
        comp = torch_runner(subject.model, x, setting.threads)
    else:
        assert graphs is not None
        make = ort_runner if setting.runtime == "onnxruntime" else openvino_runner
        base = make(graphs["baseline"][0], x, setting.threads)
        comp = make(graphs["compressed"][0], x, setting.threads)
        extra["onnx_check"] = {"max_abs_logit_diff": graphs["compressed"][1],
                               "baseline_max_abs_logit_diff": graphs["baseline"][1],
                               "tolerance": EXPORT_TOLERANCE, "inputs": CHECK_IMAGES,
                               "checked_with": "onnxruntime"}
        if setting.runtime == "openvino":
            extra["openvino_check"] = {"max_abs_logit_diff": graphs["openvino"][1], "tolerance": EXPORT_TOLERANCE,
                                       "inputs": CHECK_IMAGES}
    with _pinned(setting.threads):
        quiet = check_quiet(options.machine, setting.threads)
        if quiet.problems() and not options.allow_noisy:
            raise NoisyMachineError(refusal(quiet))
        tb, tc = interleaved(base.call, comp.call, options.repeats, options.warmup, options.clock)
        finish_quiet(quiet, options.machine)
    if quiet.problems() and not options.allow_noisy:
        raise NoisyMachineError(refusal(quiet))
    return {
        "baseline_ms": _summary(tb), "compressed_ms": _summary(tc),
        "speedup": speedup_interval(tb, tc),
        "quiet": quiet.describe(), "unreliable": bool(quiet.problems()),
        **extra,
    }


def _summary(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [s * 1000.0 for s in seconds]
    return {"median": round(statistics.median(ms), 5), "repeats_ms": [round(v, 5) for v in ms]}


def run_latency(results: Path, options: Options, log: Callable[[str], None] = lambda line: None) -> list[Outcome]:
    """Measure every complete compressed run of ``results`` under every setting; write one
    latency record per (architecture digest, runtime, batch, threads, hardware)."""
    from prunebench.errors import ConfigError
    from prunebench.results.records import now, versions, write_atomic

    results = Path(results)
    if not results.is_dir():
        raise ConfigError(f"no results directory {results}")
    if options.repeats < MIN_REPEATS:
        raise ConfigError(f"--repeats must be at least {MIN_REPEATS}, got {options.repeats}")
    if options.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {options.warmup}")
    unknown = [r for r in options.runtimes if r not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime {unknown[0]!r}. Available: {', '.join(RUNTIMES)}")
    for runtime in options.runtimes:
        if not installed(runtime):
            extra = ONNX_RUNTIMES[runtime]
            raise ConfigError(f"runtime {runtime!r} needs the {extra} extra: pip install 'prunebench[{extra}]'")
    for batch, threads in options.settings:
        if batch < 1 or threads < 0:
            raise ConfigError(f"--batch must be >= 1 and --threads >= 0 (0: all CPUs), got {batch} and {threads}")
    cpus = options.machine.cpus()
    settings = resolve_settings(options, cpus)
    # refuse a noisy machine before building anything
    first = check_quiet(options.machine, max(s.threads for s in settings) if settings else 1)
    if first.problems() and not options.allow_noisy:
        raise NoisyMachineError(refusal(first))
    hardware = hardware_key()
    folder = latency_dir(results)
    outcomes: list[Outcome] = []
    baseline_graphs: dict[str, tuple[bytes, float]] = {}  # one export per baseline architecture
    for rec in measurable(results):
        rid = rec["run_id"]
        try:
            subject = load_subject(results, rec)
        except (RebuildError, PrunebenchError) as exc:
            outcomes.append(Outcome(rid, settings[0], "failed", line=f"{rid}: {exc}"))
            log(f"error: {rid}: {exc}")
            continue
        graphs: dict[str, tuple[bytes, float]] | None = None
        for setting in settings:
            path = folder / record_name(subject.digest, setting, hardware)
            existing = read_record_file(path)
            if existing is not None and not options.force:
                if rid not in existing.get("run_ids", []):
                    existing["run_ids"] = sorted({*existing.get("run_ids", []), rid})
                    write_atomic(path, existing)
                outcomes.append(Outcome(rid, setting, "skipped", path, f"{rid}: already measured in {path}"))
                continue
            try:
                if setting.runtime in ONNX_RUNTIMES and graphs is None:
                    key = json.dumps([rec["arch"], subject.arch_kwargs, subject.input_shape], sort_keys=True)
                    if key not in baseline_graphs:
                        baseline_graphs[key] = exported(subject.baseline, subject.input_shape)
                    graphs = {"baseline": baseline_graphs[key],
                              "compressed": exported(subject.model, subject.input_shape)}
                if setting.runtime == "openvino" and graphs is not None and "openvino" not in graphs:
                    graphs["openvino"] = (b"", openvino_checked(subject.model, graphs["compressed"][0],
                                                                subject.input_shape))
            except ExportError as exc:
                line = f"{rid}: {exc}; its accuracy record is unchanged"
                log(f"error: {line}")
                outcomes.append(Outcome(rid, setting, "failed", line=line))
                break
            numbers = measure(subject, setting, options, graphs)
            run_ids = sorted({rid, *((existing or {}).get("run_ids", []))})
            record = {
                "schema": SCHEMA, "digest": subject.digest, "run_ids": run_ids,
                "arch": subject.arch, "baseline_arch": rec["arch"], "arch_kwargs": subject.arch_kwargs,
                "input_shape": subject.input_shape[1:], "model_source": subject.source,
                "runtime": setting.runtime, "runtime_version": runtime_version(setting.runtime),
                "batch": setting.batch, "threads": setting.threads, "hardware": hardware,
                "warmup": options.warmup, "repeats": options.repeats, "order": "interleaved: baseline, compressed",
                "precision": "fp32", "measured": now(), "versions": versions(), **numbers,
            }
            write_atomic(path, record)
            flag = " UNRELIABLE (" + "; ".join(record["quiet"]["problems"]) + ")" if record["unreliable"] else ""
            s = record["speedup"]
            line = (f"{rid} [{setting.runtime} batch {setting.batch}, {setting.threads} thread(s)]: "
                    f"{record['baseline_ms']['median']:.3f} → {record['compressed_ms']['median']:.3f} ms, "
                    f"speed-up {s['median']:.2f}× (95% {s['ci95'][0]:.2f}-{s['ci95'][1]:.2f}){flag}")
            log(line)
            outcomes.append(Outcome(rid, setting, "measured", path, line, record))
    return outcomes


def read_record_file(path: Path) -> dict[str, Any] | None:
    """A latency record, or None when absent or not one (then it is measured again)."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return rec if isinstance(rec, dict) and rec.get("schema") == SCHEMA else None
