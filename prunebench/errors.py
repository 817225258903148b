"""Errors users see. Each says what was wrong and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrunebenchError(Exception):
    """Base class: errors the CLI prints as a one-line message (no traceback)."""


class ConfigError(PrunebenchError):
    """Bad user input: unknown names, impossible targets, wrong hyper-parameters."""


class DataNotFoundError(PrunebenchError):
    """A dataset's files are missing; the message names the exact paths expected."""


class TargetMissedError(PrunebenchError):
    """Compression could not reach the requested target within tolerance."""


class PluginError(PrunebenchError):
    """A plug-in failed to load or violates the criterion contract."""


class DivergedError(PrunebenchError):
    """Training produced a non-finite loss or non-finite weights; the run's numbers are void."""


class CheckpointError(PrunebenchError):
    """A checkpoint cannot be used: unreadable, truncated, not plain tensors (loading it would
    run code), built for another architecture, or holding non-finite weights. Names the file."""


class RecordError(PrunebenchError):
    """A result record cannot be read or written where it belongs; names the file (and, for a
    write, where the record was saved instead)."""


class RunTimedOut(PrunebenchError):  # noqa: N818 - it names what happened
    """A run went past its time limit (``--timeout``); it is recorded as failed."""


class Terminated(KeyboardInterrupt):  # noqa: N818 - it names what happened, like KeyboardInterrupt
    """SIGTERM asked this process to stop. Handled as Ctrl-C is: the attempt that was running
    is recorded (``failed``), then the process stops."""


class RunFailedError(PrunebenchError):
    """A process of a run over several processes failed; the run is recorded as failed."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean 'x'?' for the closest matches, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"
