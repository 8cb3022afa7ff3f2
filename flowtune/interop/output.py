"""Where exports go, and writing them without ever leaving half a file or replacing one silently.

Default location: ``<run>/export/`` next to the run's ``checkpoints/`` and ``final/``, not inside
them, so that pruning old checkpoints (``train.keep_last``) or a continued run replacing
``final/`` never deletes an export.  A checkpoint directory outside any run layout gets its own
``export/`` folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flowtune.errors import FlowtuneError
from flowtune.fileio import atomic_dir, atomic_path, write_errors
from flowtune.train.checkpoint import CHECKPOINTS, FINAL

EXPORT_DIR = "export"
_HINT = "choose another --out"


def default_stem(checkpoint: Path) -> tuple[Path, str]:
    """The default export folder of a checkpoint and the stem of its export names.

    ``RUN/final`` -> (``RUN/export``, ``"RUN-final"``); ``RUN/checkpoints/step-000250`` ->
    (``RUN/export``, ``"RUN-step-000250"``); any other directory ``D`` -> (``D/export``, ``"D"``).
    """
    checkpoint = Path(checkpoint).resolve()
    if checkpoint.name == FINAL:
        run = checkpoint.parent
    elif checkpoint.parent.name == CHECKPOINTS:
        run = checkpoint.parent.parent
    else:
        return checkpoint / EXPORT_DIR, checkpoint.name
    return run / EXPORT_DIR, f"{run.name}-{checkpoint.name}"


def check_free_file(path: Path, overwrite: bool) -> None:
    """Refuse to write the file ``path`` over an existing file (unless ``overwrite``) or a directory."""
    if path.is_dir():
        raise FlowtuneError(
            f"{path} is a directory; give --out a file name such as {path / 'lora.safetensors'}"
        )
    if path.exists() and not overwrite:
        raise FlowtuneError(f"{path} already exists; pass --overwrite to replace it or choose another --out")


def check_free_dir(path: Path, overwrite: bool) -> None:
    """Refuse to write the directory ``path`` over a file, or over a non-empty directory unless
    ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise FlowtuneError(f"{path} exists and is not a directory; choose another --out")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FlowtuneError(
            f"output directory {path} is not empty; pass --overwrite to replace it or choose another --out"
        )


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it to ``path``
    (:func:`flowtune.fileio.atomic_path`): a process killed mid-write leaves at most a hidden
    temporary file, never a truncated ``path``; an existing ``path`` is replaced in one step.  The
    file gets the umask's permissions; a write the file system refuses is a one-line
    :class:`~flowtune.fileio.WriteError`."""
    path = Path(path)
    _make_parent(path)
    with atomic_path(path, hint=_HINT) as tmp:
        write(Path(tmp))
    return path


def write_dir_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_dir)`` on a temporary directory next to ``path``, then move it into place
    (:func:`flowtune.fileio.atomic_dir`): an existing ``path`` is moved aside first and deleted
    after the rename, so at every moment either the old or the new complete directory exists.  The
    directory and its files get the umask's permissions; a write the file system refuses is a
    one-line :class:`~flowtune.fileio.WriteError`."""
    path = Path(path)
    _make_parent(path)
    with atomic_dir(path, hint=_HINT) as staging:
        write(staging)
    return path


def _make_parent(path: Path) -> None:
    try:
        with write_errors(path.parent, hint=_HINT):
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # not a file-system refusal: e.g. a file where a folder should be
        raise FlowtuneError(f"cannot create {path.parent}: {exc.strerror or exc}; {_HINT}") from None
