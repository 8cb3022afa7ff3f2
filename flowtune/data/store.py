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

A shard damaged afterwards (truncated, its header overwritten, deleted) is found by
:meth:`CacheStore.unreadable_shards`: safetensors' own header check (length, JSON, every tensor's
byte range, the data region exactly the rest of the file) without reading tensor data, or with
``full=True`` a read of every tensor.  Preprocess drops such shards and re-encodes what they held
(:meth:`CacheStore.drop_unreadable`); training refuses them, and a read that fails later raises
:class:`CacheReadError`, one line naming the shard.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

from flowtune.errors import FlowtuneError
from flowtune.fileio import atomic_path, atomic_write_bytes, atomic_write_json

FORMAT = "flowtune-cache"
VERSION = 1
MANIFEST_NAME = "manifest.json"
ERRORS_NAME = "errors.jsonl"
SHARDS_DIR = "shards"
LOCK_NAME = ".lock"
_ENTRIES_METADATA = "flowtune.entries"
_REPAIR = "run `flowtune preprocess` with this recipe to re-encode what it held"


class CacheReadError(FlowtuneError):
    """A cache shard could not be read (while training): one line naming the shard and the fix.

    Raised in a data-loader worker process, it reaches the main process rebuilt by torch from a
    message that holds the worker's whole traceback; the constructor keeps only this error's own
    message (the traceback's last line), so the user still sees one line.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__module__}.{type(self).__qualname__}: "
        if "\n" in message and marker in message:
            message = message.rsplit(marker, 1)[1].strip().splitlines()[0]
        super().__init__(message)


def _read_problem(err: OSError | SafetensorError) -> str:
    """What a failed read of a shard says about it, in a few words."""
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, SafetensorError):
        return f"truncated or corrupt ({err})"
    return f"unreadable ({err.strerror or err})"


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shard at ``path``, read with ordinary reads (an I/O error is an
    :class:`OSError`, where a memory map would crash on it) and deserialized by safetensors."""
    return load(path.read_bytes())


def shard_problem(path: Path, keys: Iterable[str] = (), *, full: bool = False) -> str | None:
    """Why the shard at ``path`` would not read back, or None when it would.

    The default check is cheap: safetensors opens the file and validates its header (the 8-byte
    length, the JSON, every tensor's byte range, and that the data region is exactly the rest of
    the file) without reading any tensor data; the tensor names are then checked to include
    every entry of ``keys``.  ``full`` instead reads and deserializes every tensor.

    Returns:
        ``"missing"``, ``"truncated or corrupt (<safetensors' reason>)"``,
        ``"unreadable (<OS error>)"`` or ``"missing entry <key> that the manifest lists in it"``.
    """
    try:
        if full:
            names = set(load_shard(path))
        else:
            with safe_open(path, framework="pt") as handle:
                names = set(handle.keys())
    except (OSError, SafetensorError) as err:
        return _read_problem(err)
    held = {name.rsplit("/", 1)[0] for name in names}
    absent = next((key for key in keys if key not in held), None)
    return None if absent is None else f"missing entry {absent} that the manifest lists in it"


@dataclass(frozen=True)
class DroppedShard:
    """A shard whose entries the store forgot because it would not read back."""

    reason: str
    """:func:`shard_problem`'s reason."""
    keys: tuple[str, ...]
    """The entries the manifest listed in it."""


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
        self.dropped: dict[str, DroppedShard] = {}
        """Shards (relative paths) found missing or damaged, whose entries were forgotten."""
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
        for tmp in shard_dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()
        on_disk = self.forget_missing()
        listed = {ref.shard for ref in self.entries.values()}
        for shard in sorted(on_disk - listed):
            try:
                with safe_open(self.root / shard, framework="pt") as handle:
                    kinds = json.loads((handle.metadata() or {}).get(_ENTRIES_METADATA, "{}"))
            except Exception:  # noqa: BLE001 - an unreadable stray file is not ours to trust
                continue
            for key, kind in kinds.items():
                self.entries.setdefault(key, EntryRef(shard, kind))

    def forget_missing(self) -> set[str]:
        """Drop the entries whose shard file is gone (noted in :attr:`dropped` as ``"missing"``);
        return the shards on disk."""
        shard_dir = self.root / SHARDS_DIR
        on_disk = {f"{SHARDS_DIR}/{p.name}" for p in shard_dir.glob("*.safetensors")}
        for shard, keys in self._keys_by_shard().items():
            if shard not in on_disk:
                self._forget(shard, "missing", keys)
        return on_disk

    def _keys_by_shard(self) -> dict[str, list[str]]:
        """``{shard: [entry key, ...]}`` of the stored entries."""
        by_shard: dict[str, list[str]] = {}
        for key, ref in self.entries.items():
            by_shard.setdefault(ref.shard, []).append(key)
        return by_shard

    def _forget(self, shard: str, reason: str, keys: Iterable[str]) -> None:
        """Drop the entries of ``shard`` and remember why (:attr:`dropped`)."""
        keys = tuple(keys)
        for key in keys:
            self.entries.pop(key, None)
        self._readers.pop(shard, None)
        self.dropped.setdefault(shard, DroppedShard(reason, keys))

    def unreadable_shards(self, *, full: bool = False, strays: bool = False) -> dict[str, str]:
        """``{shard: reason}`` (:func:`shard_problem`) of the shards the entries name that would
        not read back, in name order.

        Args:
            full: Read every tensor instead of checking the headers only.
            strays: Also check the ``shards/*.safetensors`` files that no entry names.
        """
        by_shard = self._keys_by_shard()
        shards = set(by_shard)
        if strays and (self.root / SHARDS_DIR).is_dir():
            shards |= {f"{SHARDS_DIR}/{p.name}" for p in (self.root / SHARDS_DIR).glob("*.safetensors")}
        problems = {}
        for shard in sorted(shards):
            reason = shard_problem(self.root / shard, by_shard.get(shard, ()), full=full)
            if reason is not None:
                problems[shard] = reason
        return problems

    def drop_unreadable(self, *, full: bool = False) -> dict[str, str]:
        """Forget the entries of every shard that would not read back and delete its file, so that
        preprocess encodes them again (:meth:`unreadable_shards` with ``strays``).  Only the
        process that holds :meth:`locked` may call it.

        Returns:
            ``{shard: reason}`` of the shards dropped (also in :attr:`dropped`).
        """
        problems = self.unreadable_shards(full=full, strays=True)
        by_shard = self._keys_by_shard()
        for shard, reason in problems.items():
            self._forget(shard, reason, by_shard.get(shard, ()))
            with contextlib.suppress(OSError):  # one left behind is never read (no entry names it)
                (self.root / shard).unlink()
        return problems

    @contextlib.contextmanager
    def locked(self) -> Iterator[str | None]:
        """Hold an exclusive lock on the cache (one writer at a time); released on exit or death
        (:mod:`flowtune.runlock`).

        Yields:
            A warning when the lock was taken over from a run that ended without releasing it
            (killed or crashed), else None.

        Raises:
            FlowtuneError: another process holds it (the message names its pid and host).
        """
        from flowtune import runlock

        with runlock.held(
            self.root / LOCK_NAME,
            what=f"the cache at {self.root}",
            command="flowtune preprocess",
            hint="wait for it to finish or use another data.cache_dir",
            elsewhere="set data.cache_dir to another directory",
        ) as lock:
            yield lock.takeover_warning(f"the cache at {self.root}")

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
        try:
            handle = self._readers.get(ref.shard)
            if handle is None:
                handle = safe_open(self.root / ref.shard, framework="pt", device="cpu")
                self._readers[ref.shard] = handle
            return {name: handle.get_tensor(f"{key}/{name}") for name in fields}
        except (OSError, SafetensorError) as err:
            raise CacheReadError(
                f"cache shard {self.root / ref.shard} is {_read_problem(err)}; {_REPAIR}"
            ) from None

    def prune(self, live: set[str]) -> int:
        """Delete shards holding no live entry; return how many were deleted."""
        removed = 0
        for shard, keys in self._keys_by_shard().items():
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
