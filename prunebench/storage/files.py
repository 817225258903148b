"""Atomic file writes that respect the umask.

Every file prunebench writes (records, compressed models, cached baselines, decoded
datasets) is first written in full to a temporary file in the destination's folder,
flushed to disk, given the mode a plain ``open()`` would have given it (``0o666`` minus
the umask; ``mkstemp`` alone would leave ``0o600``, which breaks results directories
and caches shared between users) and only then moved into place with ``os.replace``. A
reader therefore sees the old file or the new one, never half of one.

:func:`staged` splits the two steps for callers that must commit several files together
(see :mod:`prunebench.results.store`): it returns the finished temporary file, to be moved into
place later with ``os.replace``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

_UMASK_LOCK = threading.Lock()


def umask() -> int:
    """The process umask (read from /proc where possible, so no other thread sees it change)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the umask."""
    return 0o666 & ~umask()


def temp_path(path: Path) -> Path:
    """A new, empty temporary file beside ``path`` (``.<name>.<random>.tmp``), mode per umask."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
    except OSError:  # a filesystem that does not take modes (some network mounts): keep its own
        pass
    finally:
        os.close(fd)
    return Path(tmp)


def staged(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write a temporary file beside ``path`` with ``write(f)``, flush it to disk and return it.

    Nothing at ``path`` changes; the caller moves the file into place with ``os.replace``
    (or deletes it). On any error the temporary file is removed and the error re-raised.
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def replace_atomically(path: Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Write ``path`` atomically: :func:`staged`, then ``os.replace``."""
    tmp = staged(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(path)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) and SIGTERM until the block is done, so a few renames that
    belong together are not split by a signal. A held-back SIGTERM is then delivered to the
    handler it would have met. Only the main thread can do this; elsewhere the block runs as is."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        if signal.SIGINT in received:
            raise KeyboardInterrupt
        if received:
            signal.raise_signal(received[0])
