"""Where a pretrained model's files are, and a cheap fingerprint of them.

``model.pretrained`` is either a local directory in diffusers format or a Hugging Face Hub id.
:func:`resolve_pretrained` turns it into a local directory holding (at least) the requested
component subfolders, downloading only those from the Hub when they are not cached yet, so that
preprocessing never fetches the transformer and training never fetches the text encoders.

:func:`fingerprint_components` identifies the exact weights without loading them: it hashes every
file's relative path, size and its first and last 64 KiB.  Changed weights (a re-built tiny model,
another checkpoint copied over the same path, a different Hub revision) change it; re-running on
the same files gives the same value in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from flowtune.errors import FlowtuneError

if TYPE_CHECKING:
    from flowtune.families import FamilySpec

_EDGE_BYTES = 64 * 1024


def _looks_like_path(pretrained: str) -> bool:
    """A value the user clearly meant as a filesystem path rather than a Hub id (``owner/name``)."""
    return (
        pretrained.startswith(("/", "./", "../", "~", "."))
        or pretrained.count("/") != 1
        or "\\" in pretrained
    )


def read_pipeline_class(model_dir: Path, where: str | None = None) -> str | None:
    """The diffusers pipeline class a model folder was saved by: ``_class_name`` of its
    ``model_index.json``, or None when the folder has no such file.

    Args:
        where: How an error names the folder (default: the path).

    Raises:
        FlowtuneError: the file exists but cannot be read or has no ``_class_name``.
    """
    index = Path(model_dir) / "model_index.json"
    if not index.is_file():
        return None
    try:
        class_name = json.loads(index.read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise FlowtuneError(
            f"{where or model_dir}: cannot read the pipeline class from {index} ({reason}); "
            "restore the file from the model's original download"
        ) from None
    return str(class_name)


def check_model_family(model_dir: Path, family: FamilySpec, where: str | None = None) -> None:
    """Refuse a model folder saved by another family's pipeline (its model_index.json names the
    pipeline class) before anything is loaded from it; a folder without model_index.json passes.

    Raises:
        FlowtuneError: one line naming the folder's pipeline class and family and the recipe's.
    """
    from flowtune.families import check_pipeline_family

    where = where or str(model_dir)
    pipeline_class = read_pipeline_class(model_dir, where)
    if pipeline_class is not None:
        check_pipeline_family(family, pipeline_class, where)


def resolve_pretrained(
    pretrained: str,
    revision: str | None,
    components: Iterable[str],
    family: FamilySpec | None = None,
    name: str = "model.pretrained",
) -> Path:
    """The local directory of ``pretrained`` that holds the given component subfolders.

    Args:
        pretrained: ``model.pretrained``: a local diffusers-format directory or a Hub id.
        revision: ``model.revision`` (Hub only; ignored for local directories).
        components: Subfolders needed, e.g. ``("vae", "text_encoder", "tokenizer")``.
        family: The recipe's model family: the folder's ``model_index.json`` (always fetched from
            the Hub) must name one of its pipeline classes (:func:`check_model_family`).
        name: How errors name the value (``model.pretrained``, ``--model``).

    Raises:
        FlowtuneError: one line naming ``model.pretrained`` (``name``), when the directory does not exist,
            holds another family's model, lacks a component, or the Hub id cannot be fetched
            (offline and not cached, unknown, gated, ...).
    """
    components = list(components)
    where = f"{name} {pretrained!r}"
    local = Path(pretrained).expanduser()
    if local.is_dir():
        if family is not None:
            check_model_family(local, family, where)
        missing = [c for c in components if not (local / c).is_dir()]
        if missing:
            raise FlowtuneError(
                f"{where} has no {', '.join(missing)} folder; is it a diffusers-format pipeline directory?"
            )
        return local
    if local.exists() or _looks_like_path(pretrained):
        what = "is not a directory" if local.exists() else "does not exist"
        raise FlowtuneError(
            f"{where} {what}; give a diffusers-format pipeline directory "
            "or a Hugging Face Hub id such as black-forest-labs/FLUX.1-dev"
        )
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", *(f"{c}/*" for c in components)]
    try:
        snapshot = Path(snapshot_download(pretrained, revision=revision, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - every hub failure becomes one actionable line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FlowtuneError(
            f"{where} is not a local directory and could not be fetched from "
            f"the Hugging Face Hub ({reason}); check the id, `huggingface-cli login` for gated "
            "models, or download it first and give its directory"
        ) from None
    if family is not None:
        check_model_family(snapshot, family, where)
    return snapshot


def fingerprint_components(root: Path, components: Iterable[str]) -> str:
    """A hex digest identifying the files of the given component subfolders of ``root``.

    Hashes, for every file in sorted order: its path relative to ``root``, its size, and its
    first and last 64 KiB (symlinks, as in Hub snapshots, are followed).
    """
    digest = hashlib.sha256()
    for component in sorted(components):
        for path in sorted(p for p in (root / component).rglob("*") if p.is_file()):
            size = path.stat().st_size
            digest.update(f"{path.relative_to(root).as_posix()}\0{size}\0".encode())
            with path.open("rb") as handle:
                if size <= 2 * _EDGE_BYTES:
                    digest.update(handle.read())
                else:
                    digest.update(handle.read(_EDGE_BYTES))
                    handle.seek(size - _EDGE_BYTES)
                    digest.update(handle.read(_EDGE_BYTES))
    return digest.hexdigest()
