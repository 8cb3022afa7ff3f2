"""Writing files and directories atomically, with the permissions the umask asks for, and turning a
failed write (read-only location, no space left, no permission, quota) into a one-line user error.

Every file flowtune writes in place of another goes through :func:`atomic_path` (or
:func:`atomic_write_bytes` / :func:`atomic_write_json`), every directory through
:func:`atomic_dir`: the content is written under a hidden temporary name next to the target and
renamed into place when complete, so a process killed mid-write never leaves a truncated file or a
half-written directory under the real name.

Temporary files and directories are created private (``mkstemp``: 0600, ``mkdtemp``: 0700); before
the rename they get the mode an ordinary ``open``/``mkdir`` would have given them (``0o666`` /
``0o777`` less the umask), so that other users of a shared machine and other tools can read them
exactly when they could read any other file the user writes.

This is a leaf module: it imports nothing from flowtune but :mod:`flowtune.errors`.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import shutil
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flowtune.errors import FlowtuneError

WRITE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})
"""The ``errno`` values of a write refused by the file system rather than a bug: no permission, a
read-only file system, no space left on the device, a disk quota exceeded."""

# torch.save's C++ writer reports a failed write without an errno, in one of these words
# ("unexpected pos": its check that every byte it wrote reached the file).
_TORCH_WRITE_FAILURES = ("basic_ios::clear", "iostream error", "PytorchStreamWriter failed", "unexpected pos")
# Rust's std::io::Error as safetensors prints it: "No space left on device (os error 28)", or
# its debug form ``Os { code: 28, kind: StorageFull, ... }``.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|Os \{ code: (\d+)")
# Below this much free space, a write that failed without an errno is taken for a full disk.
_LOW_SPACE = 16 * 1024 * 1024


class WriteError(FlowtuneError):
    """A file or directory could not be written because of the file system (read-only, full, no
    permission, over quota); the message names the path, the reason and what to do."""


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where the OS allows
    (Linux's ``/proc/self/status``); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory: ``0o777`` less the umask."""
    return 0o777 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, *, what: str | None = None, hint: str | None = None) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success the file gets the umask's mode,
    is synced and renamed to ``path``; on any exception (or kill) ``path`` is untouched and the
    temporary file is removed.  Temporary names look like ``.<name>.<random>.tmp``.

    Args:
        path: The file to write; its parent directories are created.
        what: What the file is, for the error message (e.g. ``"cache shard"``).
        hint: Where else to write, e.g. ``"choose another --out"`` (see :func:`write_errors`).

    Raises:
        WriteError: The file system refused the write (see :func:`write_errors`).
    """
    path = Path(path)
    with write_errors(path, what=what, hint=hint):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, file_mode())
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str | Path, data: bytes, *, what: str | None = None) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, what=what) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: str | Path, obj: Any, *, what: str | None = None) -> None:
    """Write ``obj`` as JSON (indented, UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode(), what=what)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, what: str | None = None, hint: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; on success everything in it gets the umask's
    permissions (:func:`settle_tree`) and it replaces ``path`` (:func:`replace_dir`); on any
    exception it is removed and ``path`` is untouched.

    Args:
        path: The directory to write; its parent directories are created.
        what: What the directory is, for the error message.
        hint: Where else to write, e.g. ``"choose another --out"`` (see :func:`write_errors`).

    Raises:
        WriteError: The file system refused the write (see :func:`write_errors`).
    """
    path = Path(path)
    with write_errors(path, what=what, hint=hint):
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield staging
            replace_dir(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def replace_dir(staging: Path, target: Path, aside: Path | None = None) -> Path:
    """Rename the complete directory ``staging`` to ``target`` after giving its files the umask's
    permissions and syncing them (:func:`settle_tree`).

    Directories cannot be swapped in one step: an existing ``target`` is first moved aside and
    deleted after the rename, so that at every moment either the old or the new complete
    directory exists under ``target``.

    Args:
        aside: Where the old ``target`` goes meanwhile (replaced if it exists; name it so that a
            clean-up after a kill finds it); default: a new hidden ``.<name>.old-<random>/<name>``.
    """
    staging, target = Path(staging), Path(target)
    settle_tree(staging)
    if target.exists():
        if aside is None:
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            aside = retired / target.name
        else:
            retired = aside = Path(aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
        os.replace(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, target)
    _fsync(target.parent)
    return target


def settle_tree(root: str | Path) -> None:
    """Get a freshly written directory ready to be renamed into place: give ``root`` and every
    directory and file under it the mode ``mkdir``/``open`` would give under the current umask
    (execute bits of files kept), undoing the private modes of ``mkdtemp`` and of writers such as
    safetensors (0600 whatever the umask), and sync every file and directory to disk."""
    files, dirs = file_mode(), dir_mode()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                path.chmod(files | (path.stat().st_mode & 0o111 & dirs))
                _fsync(path)
        Path(dirpath).chmod(dirs)
        _fsync(Path(dirpath))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- failed writes


@contextlib.contextmanager
def write_errors(
    path: str | Path,
    *,
    what: str | None = None,
    needed: int | Callable[[], int | None] | None = None,
    needed_as: str = "it needs {}",
    hint: str | None = None,
    then: str | None = None,
    remove: str | Path | None = None,
) -> Iterator[None]:
    """Turn a write the file system refuses, inside the block, into a :class:`WriteError` about
    ``path``; any other exception passes through unchanged.

    Args:
        path: The file or directory being written (named in the message; on a full disk, its
            file system's free space is given).
        what: What is being written, e.g. ``"checkpoint"``: "cannot write checkpoint to PATH".
        needed: Bytes the write needs, when known (given in the message on a full disk), or a
            function computing them, called only on a full disk.
        needed_as: How to say it, ``{}`` standing for the size, e.g. "the last checkpoint took {}".
        hint: Where else to write, e.g. ``"choose another --out"``: the whole advice on a
            read-only file system, the alternative to freeing space or changing permissions
            otherwise.
        then: What to do after that, e.g. ``"resume with train.resume=latest"``.
        remove: A half-written directory or file to delete on such a failure (before the free
            space is measured), e.g. a checkpoint's ``.partial-`` directory.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as exc:
        code = _refused_errno(exc, path)  # judged now: torch's errno-less failures by the free space
        if code is None:
            raise
        # The failed writer's open files (kept alive by the frames of the exception's traceback
        # and of the exceptions it happened during) still hold the space they took: close them
        # and remove what was half written before measuring.
        _release_frames(exc)
        if remove is not None:
            if Path(remove).is_dir():
                shutil.rmtree(remove, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(remove)
        size = needed() if callable(needed) else needed
        message = _message(exc, code, path, what=what, needed=size, needed_as=needed_as, hint=hint)
        raise WriteError(f"{message}, then {then}" if then else message) from exc


def write_failure_message(exc: BaseException, path: str | Path | None = None) -> str | None:
    """The one-line message for ``exc`` if it is a write refused by the file system, else None.

    Recognised: an :class:`OSError` whose errno is in :data:`WRITE_ERRNOS`; safetensors' errors
    carrying such an OS error code; torch.save's errno-less stream failures ("basic_ios::clear:
    iostream error", "PytorchStreamWriter failed", "unexpected pos"), taken for a full disk when
    the file system of ``path`` has less than 16 MB free.

    Args:
        exc: The exception.
        path: The path being written; defaults to the exception's ``filename``.
    """
    if path is None:
        path = getattr(exc, "filename", None)
    code = _refused_errno(exc, path)
    return None if code is None else _message(exc, code, path)


def _release_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in the tracebacks of ``exc`` and of the
    exceptions it was raised from or during, so that the objects they held (open files) go."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        pending += [current.__cause__, current.__context__]
    gc.collect()


def _refused_errno(exc: BaseException, path: str | Path | None) -> int | None:
    """The errno of a write the file system refused, else None; torch's errno-less stream failure
    is ENOSPC when the file system of ``path`` is (nearly) full, else -1."""
    code = _write_errno(exc)
    if code == -1:
        free = _free_bytes(path)
        if free is not None and free < _LOW_SPACE:
            return errno.ENOSPC
    return code


def _message(
    exc: BaseException,
    code: int,
    path: str | Path | None,
    *,
    what: str | None = None,
    needed: int | None = None,
    needed_as: str = "it needs {}",
    hint: str | None = None,
) -> str:
    """``cannot write WHAT to PATH: REASON (free space); ADVICE`` (see :func:`write_errors`)."""
    target = f"{what} to {path}" if what and path else what or (str(path) if path else "a file")
    if code == -1:  # torch's stream writer, with free space left: say what it said
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"cannot write {target}: {detail}; check that it is writable and its disk has free space"
    if code == errno.ENOSPC:
        free = _free_bytes(path)
        space = [f"{format_bytes(free)} free"] if free is not None else []
        if needed:
            space.append(needed_as.format(format_bytes(needed)))
        reason = "no space left on device" + (f" ({'; '.join(space)})" if space else "")
        advice = f"free some space on that disk or {hint or 'write to another one'}"
    elif code == errno.EDQUOT:
        reason, advice = "disk quota exceeded", f"free some of your quota or {hint or 'write elsewhere'}"
    elif code == errno.EROFS:
        reason, advice = "read-only file system", hint or "choose a writable location"
    else:
        reason = "permission denied"
        advice = f"make it writable for you or {hint or 'choose another location'}"
    return f"cannot write {target}: {reason}; {advice}"


def format_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KB"``, ``12_000_000`` -> ``"12 MB"`` (decimal units, 2 significant digits
    from 10 on)."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            break
        value /= 1000
    if unit == "bytes":
        return f"{int(value)} bytes"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def tree_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (0 if it does not exist)."""
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _write_errno(exc: BaseException) -> int | None:
    """The errno of a refused write (-1 for torch's errno-less stream failure), else None."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in WRITE_ERRNOS else None
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        match = _RUST_OS_ERROR.search(text)
        code = int(match.group(1) or match.group(2)) if match else None
        return code if code in WRITE_ERRNOS else None
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILURES):
        return -1
    return None


def _free_bytes(path: str | Path | None) -> int | None:
    """Free bytes (for an unprivileged user) on the file system of ``path`` or its nearest existing
    ancestor; None if unknown."""
    if path is None:
        return None
    candidate = Path(path)
    for folder in (candidate, *candidate.parents):
        with contextlib.suppress(OSError):
            if folder.exists():
                return shutil.disk_usage(folder).free
    return None
