"""Console output for runs: a header naming plug-ins and versions, stages, rich progress bars."""

from __future__ import annotations

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

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False)

    def warn(self, message: str) -> None:
        """A line the user sees even with ``--quiet``."""
        self.console.print(f"warning: {message}", highlight=False, markup=False, soft_wrap=True)

    def stage(self, name: str) -> None:
        if not self.quiet:
            self.console.rule(f"[bold]{name}")

    def header(self, record: dict[str, Any]) -> None:
        if self.quiet:
            return
        v = record["versions"]
        self.console.print(
            f"[bold]prunebench {v['prunebench']}[/] run {record['run_id']}\n"
            f"  criterion {record['criterion']} ({record['criterion_kind']}) {record['criterion_params']}\n"
            f"  arch {record['arch']} · dataset {record['dataset']} · budget {record['budget']['name']} · "
            f"target {record['target']['metric']} -{record['target']['ratio']:.0%} · seed {record['seed']}\n"
            f"  device {record['hardware']['device']} · precision {record.get('precision', 'fp32')} · torch {v['torch']} · torch-pruning {v['torch_pruning']} "
            f"· tensorly {v['tensorly']}\n"
            f"  plug-ins: " + ", ".join(f"{k} ({d})" for k, d in record.get("plugins", {}).items()),
            highlight=False,
        )

    def train_callback(self) -> Callable[[str, int, int, float], None]:
        def update(description: str, step: int, total: int, loss: float) -> None:
            if self.quiet:
                return
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
