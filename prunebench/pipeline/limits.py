"""Ways a run is stopped from outside: its time limit (``--timeout``) and SIGTERM.

Both end the run through the path Ctrl-C takes: an exception is raised where the run is, the
runner records the attempt as ``failed`` with the error, and the exception goes on.

* :func:`time_limit` raises :class:`~prunebench.errors.RunTimedOut` when the run has been
  going for its limit. In the main thread this is a timer signal (``SIGALRM``), which also
  interrupts a blocking sleep; it fires again every second until the run has stopped, so
  code that catches and ignores exceptions cannot hold the run. In another thread the
  exception is raised in that thread from a timer; it interrupts Python code, and a long call
  into C (one torch operation) when that returns. Neither interrupts an import in progress
  (it would leave the module half-initialised): the limit waits until the import is done.
* :func:`sigterm_stops` turns SIGTERM into :class:`~prunebench.errors.Terminated`, a kind of
  ``KeyboardInterrupt``, while a run executes; only where SIGTERM has its default action (a
  handler someone else installed is left alone) and only in the main thread.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prunebench.errors import RunTimedOut, Terminated


def _importing() -> bool:
    """Is a module being imported right now (in any thread)? An exception raised inside an
    import leaves that module half-initialised for the rest of the process, so the time limit
    waits for the import to finish (torch imports parts of itself lazily, on first use)."""
    from importlib import _bootstrap  # type: ignore[attr-defined]

    return any(ref() is not None for ref in list(getattr(_bootstrap, "_module_locks", {}).values()))


def _message(seconds: float | None) -> str:
    limit = f" of {seconds:g} s" if seconds is not None else ""
    return f"the run went past its time limit{limit} (--timeout) and was stopped; it is recorded as failed"


class _ThreadTimedOut(RunTimedOut):  # noqa: N818
    """Raised in a thread other than the main one (an exception raised there has no arguments)."""

    def __init__(self) -> None:
        super().__init__(_message(None))


_ThreadTimedOut.__name__ = "RunTimedOut"  # the name a record's error gives


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`RunTimedOut` in this thread when the block runs longer than ``seconds``."""
    if seconds is None:
        yield
        return
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def expired(signum: int, frame: Any) -> None:
            if not _importing():  # else the timer fires again in a second
                raise RunTimedOut(_message(seconds))

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
        return
    target = ctypes.c_ulong(threading.get_ident())
    lock = threading.Lock()
    state = {"done": False, "fired": False}

    def expire() -> None:
        with lock:
            if state["done"]:
                return
            if _importing():  # try again shortly, once the import has finished
                timers.append(threading.Timer(0.1, expire))
                timers[-1].daemon = True
                timers[-1].start()
                return
            state["fired"] = True
            ctypes.pythonapi.PyThreadState_SetAsyncExc(target, ctypes.py_object(_ThreadTimedOut))

    timers = [threading.Timer(seconds, expire)]
    timers[0].daemon = True
    timers[0].start()
    try:
        yield
    finally:
        with lock:
            state["done"] = True
            for timer in timers:
                timer.cancel()
            if state["fired"]:  # an exception not raised yet must not escape past the block
                ctypes.pythonapi.PyThreadState_SetAsyncExc(target, None)


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def sigterm_stops() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` (as Ctrl-C raises
    ``KeyboardInterrupt``), so the run records its attempt before the process stops."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM") \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
