"""Is the machine quiet enough to time on? Load average and the spread of a fixed probe kernel,
before and after each timing (docs/latency.md). The machine and the clock are injectable."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prunebench.errors import PrunebenchError

#: quiet machine: the 1-minute load average at most our own threads + LOAD_PER_CPU × CPUs ...
LOAD_PER_CPU = 0.25


#: ... and the probe kernel's spread (relative IQR before, after, and the drift between) at most this
PROBE_SPREAD_LIMIT = 0.10

#: a noisy check is not final at once: a blip (a timer interrupt, a neighbour's burst on a shared
#: host) passes. A noisy check before timing is repeated after a pause, and a timing whose check
#: after it is noisy is discarded and measured again, up to this many times in all
QUIET_ATTEMPTS = 5
#: seconds between attempts
QUIET_PAUSE_S = 3.0


class NoisyMachineError(PrunebenchError):
    """The machine is not quiet enough for latency to mean anything."""


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
    pause: Callable[[float], None] = time.sleep  # between attempts (QUIET_PAUSE_S)


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


def default_machine() -> Machine:
    """This machine's load average, CPUs and probe kernel."""
    return Machine()


def default_clock() -> Callable[[], float]:
    return time.perf_counter
