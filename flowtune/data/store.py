"""The on-disk cache format: content-addressed tensors in safetensors shards, and a manifest.

Layout of a cache directory (``data.cache_dir``)::

    manifest.json          what made the cache, the items, and where every entry is
    shards/<id>.safetensors  entries: tensors named "<entry key>/<field>"
    errors.jsonl           the problems of the last preprocess run (one JSON object per line)

An *entry* is the encoding of one input: an image entry (e.g. ``image_latents``) or a text entry
(e.g. ``text_embeddings``, ``pooled_prompt_embeds``), keyed by a hash of the input's content and
of everything that affects its encoding.  An *item* pairs one image entry with one text entry; the
manifest lists the items of the dataset, so an image can only ever be read with its own caption.

Every file is written to a temporary name and renamed into place (atomic on POSIX), shards before
the manifest that names them.  A shard also lists its entries in its safetensors metadata, so a
shard written just before a kill is recovered on the next open even though the manifest never
named it.  A killed run therefore loses at most the entries that were not yet in a shard.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flowtune.errors import FlowtuneError

FORMAT = "flowtune-cache"
VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
SHARDS_DIR = "shards"
LOCK_NAME = ".lock"
_ENTRIES_METADATA = "flowtune.entries"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success it is synced and renamed to
    ``path``, on any exception (or kill) ``path`` is untouched.  Temporary names look like
    ``.<name>.<random>.tmp``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(obj, indent=1, ensure_ascii=False).encode())


@dataclass(frozen=True)
class EntryRef:
    """Where an entry lives: its shard (relative to the cache root) and kind ("image" | "text")."""

    shard: str
    kind: str


class CacheStore:
    """A cache directory opened for reading or for adding entries.

    Attributes:
        root: The cache directory.
        manifest: The manifest as a dict (everything but ``entries``, which is :attr:`entries`).
        entries: ``{entry key: EntryRef}`` for every entry in a shard on disk.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], entries: dict[str, EntryRef]):
        self.root = root
        self.manifest = manifest
        self.entries = entries
        self._pending: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        self._readers: dict[str, Any] = {}
        # False on the helper processes of a sharded preprocess: they write shards only, and the
        # main process adds them to the manifest (recover_shards) once all are done.
        self.writes_manifest = True

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without open shard handles (data-loader workers reopen them lazily)."""
        state = dict(self.__dict__)
        state["_readers"] = {}
        return state

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path, *, create: bool = False) -> CacheStore:
        """Open the cache at ``root``, recovering shards that the manifest does not list yet.

        Args:
            root: The cache directory.
            create: Allow a missing or empty directory (a new cache). Otherwise a missing manifest
                raises :class:`FlowtuneError`.
        """
        root = Path(root)
        manifest_path = root / MANIFEST_NAME
        manifest: dict[str, Any] = {}
        if manifest_path.is_file():
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, ValueError) as err:
                if not create:
                    raise FlowtuneError(f"the cache manifest {manifest_path} is unreadable ({err})") from None
                manifest = {}  # rebuilt from the shards below
            if manifest and manifest.get("format") != FORMAT:
                raise FlowtuneError(f"{root} is not a flowtune cache (its manifest.json has another format)")
            if manifest.get("version", VERSION) > VERSION:
                raise FlowtuneError(
                    f"the cache at {root} was written by a newer flowtune (format version "
                    f"{manifest['version']}); upgrade flowtune or use another data.cache_dir"
                )
        elif not create:
            raise FlowtuneError(f"no cache at {root}")
        entries = {key: EntryRef(**ref) for key, ref in manifest.pop("entries", {}).items()}
        store = cls(root, manifest, entries)
        if create:
            store.recover_shards()
        return store

    def recover_shards(self) -> None:
        """Add entries of shards missing from the manifest; drop entries whose shard is gone."""
        shard_dir = self.root / SHARDS_DIR
        if not shard_dir.is_dir():
            self.entries = {}
            return
        for tmp in shard_dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        on_disk = {f"{SHARDS_DIR}/{p.name}" for p in shard_dir.glob("*.safetensors")}
        self.entries = {k: ref for k, ref in self.entries.items() if ref.shard in on_disk}
        listed = {ref.shard for ref in self.entries.values()}
        for shard in sorted(on_disk - listed):
            try:
                with safe_open(self.root / shard, framework="pt") as handle:
                    kinds = json.loads((handle.metadata() or {}).get(_ENTRIES_METADATA, "{}"))
            except Exception:  # noqa: BLE001 - an unreadable stray file is not ours to trust
                continue
            for key, kind in kinds.items():
                self.entries.setdefault(key, EntryRef(shard, kind))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the cache (one writer at a time); released on exit or death."""
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no locking
            yield
            return
        with open(self.root / LOCK_NAME, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise FlowtuneError(
                    f"the cache at {self.root} is in use by another flowtune preprocess; wait for it "
                    "to finish or use another data.cache_dir"
                ) from None
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- entries ------------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        """Whether the entry is stored (in a shard or waiting to be flushed)."""
        return key in self.entries or key in self._pending

    def add(self, key: str, kind: str, tensors: dict[str, torch.Tensor]) -> None:
        """Queue one entry for the next shard. Tensors are copied to contiguous CPU memory."""
        stored = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        self._pending[key] = (kind, stored)
        self._pending_bytes += sum(t.numel() * t.element_size() for t in stored.values())

    @property
    def pending_bytes(self) -> int:
        """Bytes of tensors queued but not yet in a shard."""
        return self._pending_bytes

    def seconds_since_flush(self) -> float:
        """Seconds since the last shard was written (or the store was opened)."""
        return time.monotonic() - self._last_flush

    def flush(self) -> None:
        """Write the queued entries as one shard, then the manifest (marked incomplete) unless
        :attr:`writes_manifest` is off."""
        if not self._pending:
            return
        shard = f"{SHARDS_DIR}/{uuid.uuid4().hex[:16]}.safetensors"
        tensors = {f"{key}/{name}": t for key, (_, ts) in self._pending.items() for name, t in ts.items()}
        kinds = {key: kind for key, (kind, _) in self._pending.items()}
        with atomic_path(self.root / shard) as tmp:
            save_file(tensors, tmp, metadata={_ENTRIES_METADATA: json.dumps(kinds)})
        for key, kind in kinds.items():
            self.entries[key] = EntryRef(shard, kind)
        self._pending.clear()
        self._pending_bytes = 0
        self._last_flush = time.monotonic()
        if self.writes_manifest:
            self.write_manifest(complete=False)

    def read(self, key: str, fields: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors of one stored entry: ``{field: tensor}`` (CPU, as stored)."""
        ref = self.entries[key]
        handle = self._readers.get(ref.shard)
        if handle is None:
            handle = safe_open(self.root / ref.shard, framework="pt", device="cpu")
            self._readers[ref.shard] = handle
        return {name: handle.get_tensor(f"{key}/{name}") for name in fields}

    def prune(self, live: set[str]) -> int:
        """Delete shards holding no live entry; return how many were deleted."""
        by_shard: dict[str, list[str]] = {}
        for key, ref in self.entries.items():
            by_shard.setdefault(ref.shard, []).append(key)
        removed = 0
        for shard, keys in by_shard.items():
            if not live.intersection(keys):
                for key in keys:
                    del self.entries[key]
                self._readers.pop(shard, None)
                with contextlib.suppress(FileNotFoundError):
                    (self.root / shard).unlink()
                removed += 1
        return removed

    def size_bytes(self) -> int:
        """Total size of the shards on disk."""
        shards = {ref.shard for ref in self.entries.values()}
        return sum((self.root / s).stat().st_size for s in shards if (self.root / s).exists())

    # -- manifest -----------------------------------------------------------------------------

    def write_manifest(self, *, complete: bool) -> None:
        """Write the manifest (with the entry table) atomically."""
        body = {
            **self.manifest,
            "format": FORMAT,
            "version": VERSION,
            "complete": complete,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "entries": {
                key: {"shard": ref.shard, "kind": ref.kind} for key, ref in sorted(self.entries.items())
            },
        }
        self.manifest["complete"] = complete
        atomic_write_json(self.root / MANIFEST_NAME, body)

    def write_errors(self, problems: Iterable[dict[str, Any]]) -> Path:
        """Replace ``errors.jsonl`` with one JSON object per problem; return its path."""
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in problems)
        path = self.root / ERRORS_NAME
        atomic_write_bytes(path, lines.encode())
        return path
