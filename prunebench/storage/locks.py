"""Advisory file locks between processes (``fcntl.flock``), for baselines and sweep runs.

A lock is a file beside the thing it protects (``<checkpoint>.lock``,
``<results>/<run_id>.lock``). The kernel releases a ``flock`` when its holder exits, even on
SIGKILL, so a crashed process never leaves a lock held. The holder deletes the lock file
when it releases it; a process that was waiting on the deleted file notices (the path no
longer names the file it locked) and locks the new one instead, so two processes never
both believe they hold the same lock. A lock file left behind by a killed process is
harmless: the next process locks it and removes it. A symbolic link in a lock file's place
is refused with a one-line error naming it; it is never followed.

Locks are advisory and POSIX only; on platforms without ``fcntl`` they do nothing. On a
shared filesystem (e.g. NFS for a Ray cluster) they work where the filesystem supports
``flock``.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prunebench.errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None  # type: ignore[assignment]


class FileLock:
    """An exclusive lock on ``path``. ``acquire(blocking=False)`` returns False when held elsewhere."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = True) -> bool:
        if self._fd is not None:
            raise RuntimeError(f"lock {self.path} is already held by this object")
        if fcntl is None:  # pragma: no cover - non-POSIX: no locking
            self._fd = -1
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_lock(self.path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            if _same_file(fd, self.path):
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self._fd = fd
                return True
            os.close(fd)  # the previous holder removed this file while we waited: lock the new one

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None or fd == -1:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it, so no one can lock the old file
        finally:
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _open_lock(path: Path) -> int:
    """Open (or create) the lock file; a symbolic link there is refused, never followed (it
    could point at any file, which writing the holder's PID would overwrite)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno is not None and os.path.islink(path)):
            raise ConfigError(f"lock file {path} is a symbolic link; prunebench does not follow it: "
                              "remove the link and run again") from None
        raise


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.lstat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextmanager
def hold(path: str | os.PathLike[str]) -> Iterator[FileLock]:
    """Block until the lock on ``path`` is ours; release (and remove the lock file) on exit."""
    lock = FileLock(path)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


#: what creating a file in a read-only folder (or on a read-only mount) fails with
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextmanager
def hold_unless_read_only(path: str | os.PathLike[str], cached: str | os.PathLike[str]) -> Iterator[bool]:
    """:func:`hold` the lock on ``path`` (yields True); but where the lock file cannot be created
    because its folder is read-only (a cache shared read-only between users, a read-only
    mount) and ``cached`` is already there, go on without it (yields False). Cached files are
    written whole and renamed into place, so one that is there is complete and reading it
    needs no lock. When ``cached`` is not there, a one-line :class:`ConfigError` says so."""
    lock = FileLock(path)
    try:
        lock.acquire()
    except OSError as exc:
        if exc.errno not in _READ_ONLY:
            raise
        if not Path(cached).is_file():
            raise ConfigError(f"cannot create the lock file {path} ({exc.strerror or exc}): its folder is not "
                              f"writable and holds no {Path(cached).name} yet; set PRUNEBENCH_CACHE to a "
                              "writable folder") from None
        yield False
        return
    try:
        yield True
    finally:
        lock.release()
