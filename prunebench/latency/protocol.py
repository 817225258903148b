"""The latency protocol: measured speed-ups, separate from the accuracy run (docs/latency.md).

``prunebench latency RESULTS_DIR`` measures each compressed model of a results directory
against its baseline (the unpruned architecture):

* the compressed model is rebuilt with :func:`prunebench.pipeline.surgery.load_compressed` from its
  model file, or, when the file is gone, from the record's widths on a freshly built
  architecture (latency depends on the architecture, not on the weights);
* per runtime (``torch``: PyTorch eager fp32; ``onnxruntime``: ONNX Runtime on the CPU, after
  an export checked against PyTorch to ``max |Δ logits| <= 1e-4``; ``openvino`` likewise;
  ``torch-cuda``: PyTorch eager fp32 on the CUDA device, each call synchronised) and per (batch, threads)
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

import hashlib
import json
import os
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunebench.errors import PrunebenchError
from prunebench.latency.export import (
    CHECK_IMAGES,
    CUDA_RUNTIMES,
    ONNX_RUNTIMES,
    RUNTIMES,
    ExportError,
    exported,
    installed,
    openvino_checked,
    runtime_version,
)
from prunebench.latency.quiet import (
    QUIET_ATTEMPTS,
    QUIET_PAUSE_S,
    Machine,
    NoisyMachineError,
    Quiet,
    available_cpus,
    check_quiet,
    default_clock,
    default_machine,
    finish_quiet,
    refusal,
)
from prunebench.latency.subjects import RebuildError, Subject, load_subject, measurable
from prunebench.latency.timing import (
    Runner,
    _pinned,
    interleaved,
    openvino_runner,
    ort_runner,
    speedup_interval,
    torch_runner,
)

SCHEMA = "prunebench-latency/1"
MIN_REPEATS = 30


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    runtime: str
    batch: int
    threads: int  # resolved (never 0)


def hardware_key(runtime: str = "torch") -> dict[str, Any]:
    """What the timing ran on: the CPU, and for a CUDA runtime the GPU too."""
    import platform

    from prunebench.results.records import cpu_name

    key = {"cpu": cpu_name(), "cpus": available_cpus(), "machine": platform.machine(), "os": os.uname().sysname
           if hasattr(os, "uname") else platform.system()}
    if runtime in CUDA_RUNTIMES:
        key["gpu"] = torch.cuda.get_device_name()
    return key


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


def resolve_settings(options: Options, cpus: int) -> list[Setting]:
    return [Setting(rt, batch, threads or cpus) for rt in options.runtimes for batch, threads in options.settings]


def measure(subject: Subject, setting: Setting, options: Options, graphs: dict[str, tuple[bytes, dict[str, Any]]] | None = None,
            ) -> dict[str, Any]:
    """Time baseline and compressed model interleaved under ``setting``; the record's numbers.
    Raises :class:`NoisyMachineError` on a noisy machine unless ``options.allow_noisy``."""
    x = torch.randn(setting.batch, *subject.input_shape[1:], generator=torch.Generator().manual_seed(0))
    extra: dict[str, Any] = {}
    if setting.runtime in ("torch", *CUDA_RUNTIMES):
        device = "cuda" if setting.runtime in CUDA_RUNTIMES else "cpu"
        base = torch_runner(subject.baseline, x, setting.threads, device)
        comp = torch_runner(subject.model, x, setting.threads, device)
    else:
        assert graphs is not None
        make = ort_runner if setting.runtime == "onnxruntime" else openvino_runner
        base = make(graphs["baseline"][0], x, setting.threads)
        comp = make(graphs["compressed"][0], x, setting.threads)
        extra["onnx_check"] = {**graphs["compressed"][1],
                               "baseline_max_abs_logit_diff": graphs["baseline"][1]["max_abs_logit_diff"],
                               "inputs": CHECK_IMAGES, "checked_with": "onnxruntime"}
        if "float64_reference" in graphs["baseline"][1]:
            extra["onnx_check"]["baseline_float64_reference"] = graphs["baseline"][1]["float64_reference"]
        if setting.runtime == "openvino":
            extra["openvino_check"] = {**graphs["openvino"][1], "inputs": CHECK_IMAGES}
    tb, tc, quiet, attempts = _timed_when_quiet(base, comp, setting, options)
    return {
        "baseline_ms": _summary(tb), "compressed_ms": _summary(tc),
        "speedup": speedup_interval(tb, tc),
        "quiet": {**quiet.describe(), "attempts": attempts}, "unreliable": bool(quiet.problems()),
        **extra,
    }


def _timed_when_quiet(base: Runner, comp: Runner, setting: Setting, options: Options
                      ) -> tuple[list[float], list[float], Quiet, int]:
    """The interleaved timing, made when the machine is quiet before it and kept when it was still
    quiet after it: up to QUIET_ATTEMPTS checks and timings, a pause between. On a machine that
    stays noisy, :class:`NoisyMachineError`, or with ``allow_noisy`` the last timing (marked)."""
    machine = options.machine
    with _pinned(setting.threads):
        for attempt in range(1, QUIET_ATTEMPTS + 1):
            last = attempt == QUIET_ATTEMPTS
            quiet = check_quiet(machine, setting.threads)
            if quiet.problems() and not last:
                machine.pause(QUIET_PAUSE_S)
                continue
            if quiet.problems() and not options.allow_noisy:
                raise NoisyMachineError(refusal(quiet))
            tb, tc = interleaved(base.call, comp.call, options.repeats, options.warmup, options.clock)
            finish_quiet(quiet, machine)
            if not quiet.problems() or last:
                break
            machine.pause(QUIET_PAUSE_S)  # a timing with a noisy check after it is measured again
    if quiet.problems() and not options.allow_noisy:
        raise NoisyMachineError(refusal(quiet))
    return tb, tc, quiet, attempt


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
        if runtime in CUDA_RUNTIMES and not installed(runtime):
            raise ConfigError(f"runtime {runtime!r} needs a CUDA device, and torch sees none here")
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
    hardware = {rt: hardware_key(rt) for rt in options.runtimes}
    folder = latency_dir(results)
    outcomes: list[Outcome] = []
    baseline_graphs: dict[str, tuple[bytes, dict[str, Any]]] = {}  # one export per baseline architecture
    records = list(measurable(results))
    for rec in records:
        rid = rec["run_id"]
        try:
            subject = load_subject(results, rec, records)
        except (RebuildError, PrunebenchError) as exc:
            outcomes.append(Outcome(rid, settings[0], "failed", line=f"{rid}: {exc}"))
            log(f"error: {rid}: {exc}")
            continue
        graphs: dict[str, tuple[bytes, dict[str, Any]]] | None = None
        for setting in settings:
            path = folder / record_name(subject.digest, setting, hardware[setting.runtime])
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
                "batch": setting.batch, "threads": setting.threads, "hardware": hardware[setting.runtime],
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
