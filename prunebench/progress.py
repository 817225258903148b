"""Console output for runs: a header naming plug-ins and versions, stages, rich progress bars."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Reporter:
    def __init__(self, console: Console | None = None, quiet: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._progress: Progress | None = None
        self._task: Any = None
        #: wall seconds per stage of the run, in order (the first word of each stage's name)
        self.timings: dict[str, float] = {}
        self._stage: tuple[str, float] | None = None

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        """A line the user sees even with ``--quiet``."""
        self.console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)

    def stage(self, name: str) -> None:
        self.close_stage()
        self._stage = (name.split(" (")[0].split(":")[0], time.perf_counter())
        if not self.quiet:
            self.console.rule(f"[bold]{name}")

    def close_stage(self, name: str | None = None) -> dict[str, float]:
        """End the current stage's timing (or start-and-end ``name``: time since the last one)."""
        if self._stage is not None:
            key, t0 = self._stage
            self.timings[key] = round(self.timings.get(key, 0.0) + time.perf_counter() - t0, 3)
            self._stage = (name, time.perf_counter()) if name else None
        return self.timings

    def header(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        v = record["versions"]
        self.console.print(
            f"[bold]prunebench {v['prunebench']}[/] run {record['run_id']}\n"
            f"  criterion {record['criterion']} ({record['criterion_kind']}) {record['criterion_params']}\n"
            f"  arch {record['arch']} · dataset {record['dataset']} · budget {record['budget']['name']} · "
            f"{_target_text(record)} · seed {record['seed']}\n"
            f"  device {record['hardware']['device']} · precision {record.get('precision', 'fp32')} · torch {v['torch']} · torch-pruning {v['torch_pruning']} "
            f"· tensorly {v['tensorly']}\n"
            f"  plug-ins: " + ", ".join(f"{k} ({d})" for k, d in record.get("plugins", {}).items()),
            highlight=False,
        )

    def train_callback(self, batch: int | None = None) -> Callable[[str, int, int, float], None]:
        """The engine's progress callback: a rich bar on a terminal, plain lines elsewhere (a log
        file, a background job, CI), and one line with the stage's expected duration, measured
        from its first steps, when it will take more than a minute. ``batch``: images per step."""
        plain = PlainProgress(self.log, batch)
        if not self.console.is_terminal:
            return lambda description, step, total, loss: None if self.quiet else plain(description, step, total,
                                                                                         loss)

        def update(description: str, step: int, total: int, loss: float) -> None:
            if self.quiet:
                return
            plain.announce(description, step, total)
            if self._progress is None:
                self._progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn(),
                    console=self.console, transient=False,
                )
                self._progress.start()
                self._task = self._progress.add_task(description, total=total, loss=loss)
            self._progress.update(self._task, completed=step, loss=loss)
            if step >= total:
                self._progress.stop()
                self._progress = None

        return update


def _target_text(record: dict[str, Any]) -> str:
    if record.get("dense"):
        return f"dense control {record['dense']} (no target: its own MACs)"
    return f"target {record['target']['metric']} -{record['target']['ratio']:.0%}"


class PlainProgress:
    """Progress as plain lines: at least every ``every`` seconds and every 10 % of the steps,
    with the step, the mean loss, images (or steps) per second and the remaining time; and,
    once ``probe`` seconds of the stage have run, its expected duration when that exceeds
    ``announce_over`` seconds. ``clock`` is injectable for tests."""

    def __init__(self, log: Callable[[str], None], batch: int | None = None, every: float = 30.0,
                 probe: float = 5.0, announce_over: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.log, self.batch, self.every, self.probe, self.announce_over = log, batch, every, probe, announce_over
        self.clock = clock
        self._start: float | None = None
        self._first_step = 0
        self._last_time = 0.0
        self._last_decile = 0
        self._announced = False

    def _rate(self, step: int, now: float) -> float:
        return (step - self._first_step) / max(now - self._start, 1e-9)

    def announce(self, description: str, step: int, total: int) -> None:
        """Say once how long the stage will take, from the speed of its first steps."""
        now = self.clock()
        if self._start is None:
            self._start, self._first_step, self._last_time = now, step, now
            return
        if self._announced or now - self._start < self.probe or step >= total:
            return
        self._announced = True
        rate = self._rate(step, now)
        expected = total / rate if rate > 0 else float("inf")
        if expected > self.announce_over:
            speed = f"{rate * self.batch:.0f} img/s" if self.batch else f"{rate:.2f} steps/s"
            self.log(f"{description}: {total} steps, expected to take {_duration(expected)} "
                     f"({speed}, measured on its first {step} steps)")

    def __call__(self, description: str, step: int, total: int, loss: float) -> None:
        self.announce(description, step, total)
        now = self.clock()
        decile = int(10 * step / max(total, 1))
        if step < total and decile <= self._last_decile and now - self._last_time < self.every:
            return
        self._last_decile, self._last_time = decile, now
        rate = self._rate(step, now) if self._start is not None else 0.0
        speed = f"{rate * self.batch:.0f} img/s" if self.batch else f"{rate:.2f} steps/s"
        eta = (total - step) / rate if rate > 0 else float("inf")
        self.log(f"{description}: step {step}/{total} ({100 * step / max(total, 1):.0f} %), loss {loss:.3f}, "
                 f"{speed}, " + ("done" if step >= total else f"about {_duration(eta)} left"))
        if step >= total:
            self._start, self._announced, self._last_decile = None, False, 0


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "an unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
