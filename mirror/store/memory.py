"""A store held in memory: the second implementation of the store interface.

It keeps everything the disk store keeps, under the same bound and LRU rules, within one
process. It is what the contract tests hold the disk store to (and what a later tier, S3,
will have to pass too); the mirror itself serves from disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..reference import Digest, manifest_matches
from .base import (
    BytesBlob,
    Counters,
    DigestMismatch,
    Followed,
    blob_key,
    manifest_key,
)
from .lru import Entry

EVICTION_GRACE = 1.0  # seconds: as the disk store, content used this recently is spared


@dataclass
class _Kept:
    data: bytes
    media_type: str  # "" for a blob
    atime: float
    upstream: str
    repository: str


class BufferReadBack:
    """What a memory temporary holds so far."""

    def __init__(self, buffer: bytearray) -> None:
        self._buffer = buffer

    def pread(self, offset: int, size: int) -> bytes:
        return bytes(self._buffer[offset : offset + size])

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class MemoryTempBlob:
    """A blob being filled into a buffer; kept by `commit` once it verifies."""

    def __init__(self, store: MemoryStore, digest: Digest, upstream: str, repository: str) -> None:
        self._store = store
        self._digest = digest
        self._upstream = upstream
        self._repository = repository
        self._buffer = bytearray()
        self._hasher = digest.hasher()
        self._written = 0
        self._spilled = False
        self._closed = False

    @property
    def written(self) -> int:
        return self._written

    @property
    def spilled(self) -> bool:
        return self._spilled

    def read_back(self) -> BufferReadBack:
        return BufferReadBack(self._buffer)

    def write(self, data: bytes) -> None:
        if not self._spilled:
            self._buffer += data
        self._hasher.update(data)
        self._written += len(data)

    def spill(self) -> None:
        self._spilled = True
        self._buffer.clear()

    def announce(self, size: int | None) -> None:
        pass  # no other process follows a memory fill

    def verify(self) -> None:
        if self._hasher.hexdigest() != self._digest.hex:
            self.discard()
            raise DigestMismatch(f"content does not match {self._digest}")

    def sync(self) -> None:
        pass

    def commit(self, *, keep: bool = True) -> bool:
        self.verify()
        if not keep or self._spilled:
            self.discard()
            return False
        self._store._keep(blob_key(self._digest), bytes(self._buffer), "", self)
        self.discard()
        return True

    def discard(self) -> None:
        if not self._closed:
            self._closed = True
            self._store._filling.discard(str(self._digest))

    @property
    def origin(self) -> tuple[str, str]:
        return self._upstream, self._repository


class MemoryStore:
    """Blobs and manifests in a dict, bounded by an LRU on their exact sizes."""

    def __init__(
        self, max_size: int, *, clock: Callable[[], float] = time.time, **_: object
    ) -> None:
        self.max_size = max_size
        self.counters = Counters()
        self._clock = clock
        self._kept: dict[str, _Kept] = {}
        self._lock = threading.RLock()  # the policy stores from threads
        self._filling: set[str] = set()
        self._evicted = (0, 0)

    def close(self) -> None:
        pass

    # blobs

    def has_blob(self, digest: Digest) -> bool:
        return blob_key(digest) in self._kept

    def blob_size(self, digest: Digest) -> int | None:
        kept = self._kept.get(blob_key(digest))
        return None if kept is None else len(kept.data)

    def open_blob(self, digest: Digest) -> BytesBlob | None:
        kept = self._use(blob_key(digest))
        return None if kept is None else BytesBlob(kept.data)

    def begin_blob(
        self, digest: Digest, upstream: str = "", repository: str = ""
    ) -> MemoryTempBlob | None:
        if str(digest) in self._filling:
            return None
        self._filling.add(str(digest))
        return MemoryTempBlob(self, digest, upstream, repository)

    def follow(self, digest: Digest) -> Followed | None:
        return None  # one process: its own fills coalesce in the policy

    # manifests

    def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        kept = self._use(manifest_key(digest))
        return None if kept is None else (kept.data, kept.media_type)

    def put_manifest(
        self,
        digest: Digest,
        data: bytes,
        media_type: str,
        upstream: str = "",
        repository: str = "",
    ) -> bool:
        if not manifest_matches(digest, data, media_type):
            raise DigestMismatch(f"manifest does not match {digest}")
        with self._lock:
            self._kept[manifest_key(digest)] = _Kept(
                data, media_type, self._clock(), upstream, repository
            )
            self.make_room(keep=manifest_key(digest))
        return True

    def _keep(self, key: str, data: bytes, media_type: str, temp: MemoryTempBlob) -> None:
        upstream, repository = temp.origin
        with self._lock:
            self._kept[key] = _Kept(data, media_type, self._clock(), upstream, repository)
            self.make_room(keep=key)

    def _use(self, key: str) -> _Kept | None:
        kept = self._kept.get(key)
        if kept is not None:
            kept.atime = self._clock()
        return kept

    # the bound

    def _snapshot(self) -> list[tuple[str, _Kept]]:
        with self._lock:
            return list(self._kept.items())

    def usage(self) -> tuple[int, int]:
        kept = self._snapshot()
        return sum(len(k.data) for _, k in kept), len(kept)

    def usage_by(self) -> list[tuple[str, str, int, int]]:
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for _, kept in self._snapshot():
            size, count = totals.get((kept.upstream, kept.repository), (0, 0))
            totals[(kept.upstream, kept.repository)] = (size + len(kept.data), count + 1)
        rows = [(u, r, size, count) for (u, r), (size, count) in totals.items()]
        return sorted(rows, key=lambda row: -row[2])

    def owner(self, key: str) -> tuple[str, str] | None:
        kept = self._kept.get(key)
        return (kept.upstream, kept.repository) if kept is not None else None

    def evictions(self) -> tuple[int, int]:
        return self._evicted

    def oldest(self, limit: int, used_before: float) -> list[Entry]:
        entries = [
            Entry(key, len(k.data), k.atime, k.upstream, k.repository)
            for key, k in self._snapshot()
            if k.atime < used_before
        ]
        return sorted(entries, key=lambda entry: entry.atime)[:limit]

    def evict(self, entry: Entry) -> None:
        with self._lock:
            kept = self._kept.pop(entry.key, None)
            if kept is not None:
                entries, size = self._evicted
                self._evicted = (entries + 1, size + len(kept.data))

    def make_room(self, keep: str | None = None) -> int:
        used, _ = self.usage()
        freed = 0
        while used > self.max_size:
            victims = [e for e in self.oldest(64, self._clock() - EVICTION_GRACE) if e.key != keep]
            if not victims:
                break
            for entry in victims:
                self.evict(entry)
                used -= entry.size
                freed += entry.size
                if used <= self.max_size:
                    break
        return freed

    def state(self) -> str:
        return "ok"

    def flush_uses(self) -> None:
        pass  # uses are noted in place
