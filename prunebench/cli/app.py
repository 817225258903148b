"""The command-line application every command registers with, its consoles, and the small
helpers several commands share."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from prunebench.errors import ConfigError

app = typer.Typer(
    pretty_exceptions_enable=False,
    add_completion=False, no_args_is_help=True,
    help="Benchmark neural-network pruning criteria under one protocol.",
)


def _version(value: bool) -> None:
    if value:
        from prunebench import __version__

        out.print(f"prunebench {__version__}", highlight=False, markup=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print prunebench's version and exit")] = False,
) -> None:
    """Benchmark neural-network pruning criteria under one protocol."""


out = Console()


err = Console(stderr=True)


KINDS = ("criteria", "architectures", "datasets", "budgets", "pretrained")


PRECISION_HELP = "training precision: auto (bf16 where the device computes it natively) | bf16 | fp32"
THREADS_HELP = "CPU threads per process (default: measured at the start of each training stage; or PRUNEBENCH_THREADS)"


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    result = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} must look like KEY=VALUE, got {item!r}")
        result[key.strip().replace("-", "_")] = value.strip()
    return result


def _set_threads(value: str | None) -> None:
    """``--threads N`` (or ``PRUNEBENCH_THREADS``), checked before any work, fixes the count."""
    from prunebench.training import threads

    if value is not None:
        os.environ[threads.ENV] = str(threads.check_threads(value))
    threads.apply_fixed()


def _degrade_unencodable_output() -> None:
    """On a terminal or pipe that cannot encode every character (LC_ALL=C, PYTHONIOENCODING=ascii),
    print what it cannot encode as ``?`` instead of failing after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and (getattr(stream, "errors", None) or "strict") == "strict":
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):  # pragma: no cover - a stream that cannot change
                pass


def _one_line(text: str) -> str:
    """``text`` with control characters written as escapes, so that it prints as one line."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
