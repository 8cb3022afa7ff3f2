"""One writer per directory: an exclusive lock held for the lifetime of a run.

``flowtune train`` holds ``train.output_dir/.flowtune.lock`` and ``flowtune preprocess`` holds
``data.cache_dir/.lock`` from start to end, so a second run on the same directory stops at once
with a one-line message naming the holder, instead of both writing into it.

How it works:

- the lock is ``fcntl.flock`` on the lock file, so the kernel releases it when the holding
  process ends in any way (exit, crash, ``kill -9``): a lock left by a killed run never blocks;
- the holder writes its pid, host, command and start time into the file (JSON), which is what a
  second run's message shows; a clean release empties the file (it is never deleted: deleting a
  lock file while another process waits on it would let two processes hold "the" lock);
- a run that gets the lock and still finds a holder recorded in the file knows that holder ended
  without releasing it (killed, crashed) and takes the lock over (:attr:`RunLock.taken_over`;
  callers print a warning).

flock works across processes of one machine and, on Linux, over NFS (emulated with POSIX locks);
in a multi-process run only the main process takes the lock (see ``Trainer``).  On platforms
without ``fcntl`` nothing is locked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from flowtune.errors import FlowtuneError
from flowtune.fileio import write_errors


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as recorded in its file."""

    pid: int
    host: str
    command: str
    started: float

    def describe(self) -> str:
        """``pid 123 on host gpu-1 (flowtune train, since 2025-01-31 12:00:00)``."""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on host {self.host} ({self.command}, since {since})"

    @classmethod
    def current(cls, command: str) -> Holder:
        """This process."""
        return cls(os.getpid(), socket.gethostname(), command, time.time())

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        """The holder recorded in a lock file's text; None when empty or unreadable."""
        try:
            data: dict[str, Any] = json.loads(text)
            return cls(int(data["pid"]), str(data["host"]), str(data["command"]), float(data["started"]))
        except (ValueError, TypeError, KeyError):
            return None


class RunLock:
    """An acquired lock on a directory (from :func:`acquire`); :meth:`release` it when done.

    Attributes:
        path: The lock file.
        taken_over: The holder recorded in the file when it was acquired: a run that ended without
            releasing the lock (killed or crashed); None after a clean release.
    """

    def __init__(
        self,
        path: Path,
        handle: IO[str] | None,
        taken_over: Holder | None,
        created: tuple[Path, ...] = (),
    ):
        self.path = path
        self.taken_over = taken_over
        self._handle = handle
        self._pid = os.getpid()
        self._created = created  # folders acquire() made for the lock, deepest first

    def takeover_warning(self, what: str) -> str | None:
        """A warning line when the lock was taken over from a run that did not release it."""
        if self.taken_over is None:
            return None
        return (
            f"{what} was last used by {self.taken_over.describe()}, which ended without releasing it "
            "(killed or crashed?); the lock was taken over"
        )

    def release(self) -> None:
        """Empty the lock file and release the lock (idempotent; a forked child never releases
        its parent's lock)."""
        handle, self._handle = self._handle, None
        if handle is None or os.getpid() != self._pid:
            return
        import fcntl

        with contextlib.suppress(OSError):
            handle.truncate(0)
            handle.flush()
        self._remove_if_unused()
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()

    def _remove_if_unused(self) -> None:
        """A run that failed before writing anything (a bad recipe, a missing cache) leaves no
        trace: when acquire() made the lock's folder and it still holds only the lock file, both
        go (still under the lock; a process that opened the file meanwhile notices, see
        :func:`acquire`)."""
        if not self._created:
            return
        with contextlib.suppress(OSError):
            if [p.name for p in self.path.parent.iterdir()] != [self.path.name]:
                return
            self.path.unlink()
            for folder in self._created:
                folder.rmdir()


def acquire(path: Path, *, what: str, command: str, hint: str, elsewhere: str | None = None) -> RunLock:
    """Take the exclusive lock ``path`` (created with its folder if needed), without waiting.

    Args:
        path: The lock file, inside the directory it protects.
        what: The directory in words, for messages: ``the output directory /runs/a``.
        command: What holds it, recorded for others' messages: ``flowtune train``.
        hint: What the user can do when it is held: ``wait for it to end, or ...``.
        elsewhere: Where else to work when the folder cannot be written (read-only, full):
            ``set train.output_dir to another directory``.

    Raises:
        FlowtuneError: another process holds it: ``WHAT is in use by pid N on host H (...); HINT``.
    """
    path = Path(path)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        return RunLock(path, None, None)
    created = tuple(p for p in path.parents if not p.exists())  # deepest first
    with write_errors(path, what="the lock file", hint=elsewhere):
        for _ in range(10):
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+")  # noqa: SIM115 - held open for the lifetime of the run
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = Holder.parse(_read(handle))
                handle.close()
                who = holder.describe() if holder is not None else "another flowtune process"
                raise FlowtuneError(f"{what} is in use by {who}; {hint}") from None
            if _same_file(handle, path):
                break
            # The file was removed by a run that released it between our open and our lock
            # (RunLock._remove_if_unused): lock the one now at `path` instead.
            handle.close()
        else:  # pragma: no cover - ten removals in a row
            raise FlowtuneError(f"{what}: its lock file {path} keeps disappearing; {hint}")
        previous = Holder.parse(_read(handle))
        handle.seek(0)
        handle.truncate(0)
        handle.write(json.dumps(Holder.current(command).__dict__))
        handle.flush()
    return RunLock(path, handle, previous, created)


@contextlib.contextmanager
def held(
    path: Path, *, what: str, command: str, hint: str, elsewhere: str | None = None
) -> Iterator[RunLock]:
    """:func:`acquire` for the duration of a ``with`` block."""
    lock = acquire(path, what=what, command=command, hint=hint, elsewhere=elsewhere)
    try:
        yield lock
    finally:
        lock.release()


def _same_file(handle: IO[str], path: Path) -> bool:
    """Whether the open ``handle`` is still the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def _read(handle: IO[str]) -> str:
    try:
        handle.seek(0)
        return handle.read()
    except OSError:
        return ""
