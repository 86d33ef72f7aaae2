"""What a store is to the rest of the mirror: the interfaces every implementation honours
(disk, memory; the contract tests run on each), and what they share.

A store keeps verified blobs and manifests by digest under a byte bound. The handler gets
something it can send (`StoredBlob`: a file region or bytes), never a path; the policy fills
blobs through a `TempBlob` that becomes visible only once its digest matches.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from ..inflight import Piece, ReadBack
from ..reference import Digest, parse_digest
from .lru import Entry

log = logging.getLogger("mirror.storage")

# What a store write raises when the disk (or the index beside it) cannot take it.
WRITE_ERRORS = (OSError, sqlite3.Error)
READ_CHUNK = 1024 * 1024


class DigestMismatch(Exception):
    """The bytes received do not hash to the digest they were asked for."""


@dataclass
class Counters:
    """What the store did that it cannot count in its index: writes it could not make.

    `full` is set by a write that failed for want of space and cleared by one that
    succeeded: while it is set, the store serves what it has but keeps nothing new."""

    disk_full: int = 0
    full: bool = False

    def write_failed(self, what: str, exc: BaseException) -> None:
        """Count a write that could not happen; warn once per stretch of failures."""
        self.disk_full += 1
        if not self.full:
            log.warning("cannot write to the store (%s): %s; serving without keeping", what, exc)
        self.full = True

    def write_succeeded(self) -> None:
        if self.full:
            log.warning("the store takes writes again")
        self.full = False


class StoredBlob:
    """A complete blob a handler can send: a file to sendfile from, or bytes in chunks."""

    def __init__(self, size: int) -> None:
        self.size = size

    def fileno(self) -> int | None:
        """A descriptor to send the blob from with sendfile, or None (send `chunks`)."""
        return None

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes | memoryview]:
        """Bytes [start, end) of the blob."""
        raise NotImplementedError
        yield b""  # pragma: no cover (makes this an async generator)

    def close(self) -> None:
        pass


class FileBlob(StoredBlob):
    """A stored blob as an open file: eviction may unlink its path, not this."""

    def __init__(self, fd: int, size: int) -> None:
        super().__init__(size)
        self._fd: int | None = fd

    def fileno(self) -> int | None:
        return self._fd

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes | memoryview]:
        offset = start
        while offset < end and self._fd is not None:
            data = os.pread(self._fd, min(READ_CHUNK, end - offset), offset)
            if not data:
                raise OSError(f"stored file ended at byte {offset} of {self.size}")
            offset += len(data)
            yield data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class BytesBlob(StoredBlob):
    """A stored blob held in memory."""

    def __init__(self, data: bytes) -> None:
        super().__init__(len(data))
        self._data = data

    async def chunks(self, start: int, end: int) -> AsyncIterator[bytes | memoryview]:
        view = memoryview(self._data)
        for offset in range(start, end, READ_CHUNK):
            yield view[offset : min(offset + READ_CHUNK, end)]


class TempBlob(Protocol):
    """A blob being written; `commit` keeps it only when it verifies."""

    @property
    def written(self) -> int: ...

    @property
    def spilled(self) -> bool: ...

    def read_back(self) -> ReadBack | None:
        """A reader of what was written so far (None: nothing is kept to read back)."""

    def write(self, data: bytes) -> None: ...

    def spill(self) -> None:
        """Stop keeping the bytes (disk full, or larger than the store): only hash them."""

    def announce(self, size: int | None) -> None:
        """Tell whoever follows this fill (another process) how long the blob is."""

    def verify(self) -> None:
        """Raise DigestMismatch (and discard) unless the content is right."""

    def sync(self) -> None:
        """Make the content durable; blocking, so run it in a thread, before `commit`."""

    def commit(self, *, keep: bool = True) -> bool:
        """Verify, then make the blob visible (True), or, not kept, drop it (False)."""

    def discard(self) -> None: ...


class BlobStore(Protocol):
    """What the mirror needs from a store; the contract tests run on each implementation."""

    max_size: int
    counters: Counters

    def has_blob(self, digest: Digest) -> bool:
        """Whether the complete blob is stored (its use is not noted)."""

    def blob_size(self, digest: Digest) -> int | None:
        """The stored blob's length, or None."""

    def open_blob(self, digest: Digest) -> StoredBlob | None:
        """The complete blob, to send (its use noted for the LRU); the caller closes it."""

    def begin_blob(
        self, digest: Digest, upstream: str = "", repository: str = ""
    ) -> TempBlob | None:
        """A temporary to fill, or None when another writer is filling this digest."""

    def follow(self, digest: Digest) -> Followed | None:
        """Another process's fill of `digest`, to stream as it grows (None: there is none)."""

    def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """A stored manifest's exact bytes and media type."""

    def put_manifest(
        self,
        digest: Digest,
        data: bytes,
        media_type: str,
        upstream: str = "",
        repository: str = "",
    ) -> bool:
        """Keep a manifest; False when the store cannot take it (full), DigestMismatch
        when `data` is not what `digest` names."""

    def usage(self) -> tuple[int, int]:
        """(bytes, entries) kept."""

    def usage_by(self) -> list[tuple[str, str, int, int]]:
        """(upstream, repository, bytes, entries) kept, largest first."""

    def owner(self, key: str) -> tuple[str, str] | None:
        """The (upstream, repository) an entry was fetched for (blocking on a disk store:
        run it in a thread); None when it is not kept."""

    def evictions(self) -> tuple[int, int]:
        """(entries, bytes) evicted to keep the bound, by every process on the store."""

    def oldest(self, limit: int, used_before: float) -> list[Entry]:
        """The least recently used entries, last used before `used_before`."""

    def evict(self, entry: Entry) -> None:
        """Drop an entry to make room (counted as an eviction)."""

    def make_room(self, keep: str | None = None) -> int:
        """Evict the least recently used until the store is under its bound (blocking: run
        it in a thread); returns the bytes freed."""

    def state(self) -> str:
        """ "ok", "degraded" (full: serving, keeping nothing new) or "unavailable"."""

    def flush_uses(self) -> None:
        """Write the uses noted for the LRU when due (blocking: run it in a thread)."""

    def close(self) -> None: ...


class Followed(Protocol):
    """A fill another process runs, streamed as it grows."""

    size: int | None

    @property
    def readers(self) -> int: ...

    def size_if_known(self) -> int | None: ...

    async def wait_started(self, timeout: float) -> None: ...

    def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]: ...

    def pieces(self, start: int = 0, end: int | None = None) -> AsyncIterator[Piece]: ...


class PassThroughBlob:
    """A blob streamed through and checked but never kept (the store could not even
    begin a temporary for it)."""

    def __init__(self, digest: Digest) -> None:
        self._digest = digest
        self._hasher = digest.hasher()
        self._written = 0

    spilled = True

    @property
    def written(self) -> int:
        return self._written

    def read_back(self) -> ReadBack | None:
        return None

    def write(self, data: bytes) -> None:
        self._hasher.update(data)
        self._written += len(data)

    def spill(self) -> None:
        pass

    def announce(self, size: int | None) -> None:
        pass

    def verify(self) -> None:
        if self._hasher.hexdigest() != self._digest.hex:
            raise DigestMismatch(f"content does not match {self._digest}")

    def sync(self) -> None:
        pass

    def commit(self, *, keep: bool = True) -> bool:
        self.verify()
        return False

    def discard(self) -> None:
        pass


def blob_key(digest: Digest) -> str:
    return f"blob:{digest}"


def manifest_key(digest: Digest) -> str:
    return f"manifest:{digest}"


def parse_key(key: str) -> tuple[str, Digest] | None:
    kind, _, text = key.partition(":")
    digest = parse_digest(text)
    if kind not in ("blob", "manifest") or digest is None:
        return None
    return kind, digest
