"""The content-addressed store: verified blobs and manifests on disk, keyed by digest,
bounded by an LRU on their exact sizes.

A file under `blobs/` or `manifests/` is always complete and correct: content is written
to a temporary under `tmp/`, and renamed into place only once its length and digest
match. Every change is recorded in the LRU index as pending before the file operation
and confirmed after it, so start-up repairs a crash by checking the pending rows only.

Writers of one blob coordinate across processes with a lock file per digest
(`tmp/<alg>-<hex>.lock`, flock'd while the fill runs), so several worker processes over
one store never write the same temporary twice. The lock file also tells the processes
following a fill its length (once the upstream said) and that its content verified.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .inflight import Followed
from .lru import Entry, UsageIndex
from .reference import Digest, manifest_matches, parse_digest

log = logging.getLogger("mirror.storage")

MANIFEST_MEMORY_BYTES = 64 * 1024 * 1024  # manifests also kept in memory, up to this much
EVICTION_GRACE = 1.0  # seconds: content used this recently is not evicted (it is being sent)
HASH_CHUNK = 1024 * 1024
ROOM_BYTES = 64 * 1024 * 1024  # free space (or 5% of a small disk) that counts as room again
VERIFIED = "verified"  # written to a fill's lock file once its content checked out


class DigestMismatch(Exception):
    """The bytes received do not hash to the digest they were asked for."""


@dataclass
class Counters:
    """What the store did, for metrics: evictions and writes it could not make.

    `full` is set by a write that failed for want of space and cleared by one that
    succeeded: while it is set, the store serves what it has but keeps nothing new."""

    evictions: int = 0
    evicted_bytes: int = 0
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


# What a store write raises when the disk (or the index beside it) cannot take it.
WRITE_ERRORS = (OSError, sqlite3.Error)


class TempBlob(Protocol):
    """A blob being written; `commit` keeps it only when it verifies."""

    @property
    def path(self) -> Path | None: ...

    @property
    def written(self) -> int: ...

    @property
    def spilled(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def spill(self) -> None: ...

    def announce(self, size: int | None) -> None: ...

    def verify(self) -> None: ...

    def sync(self) -> None: ...

    def commit(self, *, keep: bool = True) -> Path | None: ...

    def discard(self) -> None: ...


class BlobStore(Protocol):
    """What the pull-through policy needs from a store; the contract tests run on each."""

    max_size: int
    counters: Counters

    def blob_path(self, digest: Digest) -> Path | None:
        """The complete blob's file (its use noted for the LRU), or None."""

    def begin_blob(
        self, digest: Digest, upstream: str = "", repository: str = ""
    ) -> TempBlob | None:
        """A temporary to fill, or None when another writer is filling this digest."""

    def follow(self, digest: Digest) -> Followed | None:
        """Another writer's fill of `digest`, to stream as it grows."""

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

    def close(self) -> None: ...


def hash_file(path: Path, digest: Digest, progress: Callable[[int], None] | None = None) -> bool:
    """Whether the file's content hashes to `digest`."""
    hasher = digest.hasher()
    with path.open("rb") as file:
        while chunk := file.read(HASH_CHUNK):
            hasher.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return hasher.hexdigest() == digest.hex


class MemoryLru:
    """Manifests kept in memory, least recently used dropped past a byte bound: a manifest
    hit never reads the disk."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, tuple[bytes, str]] = OrderedDict()

    def get(self, key: str) -> tuple[bytes, str] | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: str, value: tuple[bytes, str]) -> None:
        self.drop(key)
        self._entries[key] = value
        self._bytes += len(value[0])
        while self._bytes > self._max_bytes and self._entries:
            _, (data, _) = self._entries.popitem(last=False)
            self._bytes -= len(data)

    def drop(self, key: str) -> None:
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= len(found[0])


class DiskTempBlob:
    """A temporary file owned by this process (its lock file is flock'd)."""

    def __init__(
        self,
        store: DiskStore,
        digest: Digest,
        fd: int,
        lock_fd: int,
        upstream: str,
        repository: str,
    ) -> None:
        self._store = store
        self._digest = digest
        self._fd = fd
        self._lock_fd = lock_fd
        self._upstream = upstream
        self._repository = repository
        self._hasher = digest.hasher()
        self._written = 0
        self._spilled = False
        self._synced = False
        self._closed = False
        self._verified = False

    @property
    def path(self) -> Path:
        return self._store.temp_path(self._digest)

    @property
    def written(self) -> int:
        return self._written

    @property
    def spilled(self) -> bool:
        return self._spilled

    def write(self, data: bytes) -> None:
        """Append to the file (once spilled: only hash and count). OSError leaves `written`
        at the last whole chunk, so the file's first `written` bytes stay right."""
        if not self._spilled:
            view = memoryview(data)
            while view:
                count = os.write(self._fd, view)
                view = view[count:]
        self._hasher.update(data)
        self._written += len(data)

    def spill(self) -> None:
        """Stop writing the file (disk full, or larger than the store): the rest is only
        hashed, nothing is kept, and the temporary is removed at once (readers holding it
        open keep what it had)."""
        if self._spilled:
            return
        self._spilled = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def announce(self, size: int | None) -> None:
        """Tell other processes following this fill how long the blob is (in the lock file)."""
        os.pwrite(self._lock_fd, f"{size if size is not None else -1}\n".encode(), 0)

    def verify(self) -> None:
        """Raise DigestMismatch (and discard the file) unless the content is right.

        Right content is marked so in the lock file at once: processes following this fill
        give their clients the last byte now, not after the fsync and rename."""
        if self._hasher.hexdigest() != self._digest.hex:
            self.discard()
            raise DigestMismatch(f"content does not match {self._digest}")
        self._verified = True
        if not self._spilled and not self._closed:
            # Not marked (a full disk): followers see the fill done at its rename instead.
            with contextlib.suppress(OSError):
                os.pwrite(self._lock_fd, f"{self._written}\n{VERIFIED}\n".encode(), 0)

    def sync(self) -> None:
        """Flush the file to disk; safe to run in another thread, before `commit`."""
        os.fsync(self._fd)
        self._synced = True

    def commit(self, *, keep: bool = True) -> Path | None:
        """Verify (unless `verify` already passed); then rename into place (or, not kept,
        remove). DigestMismatch discards."""
        if not self._verified:
            self.verify()
        if not keep or self._spilled:
            self.discard()
            return None
        if not self._synced:
            self.sync()
        final = self._store.final_path(self._digest)
        key = blob_key(self._digest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._store.index.begin(key, self._written, self._upstream, self._repository)
        except WRITE_ERRORS as exc:
            self._store.counters.write_failed(f"indexing {self._digest}", exc)
            self.discard()
            return None
        os.rename(self.path, final)
        self._store.index.confirm(key)
        self._release()
        self._store.counters.write_succeeded()
        self._store.make_room(keep=key)
        return final

    def discard(self) -> None:
        if self._closed:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._store.lock_path(self._digest))
        os.close(self._lock_fd)  # closing drops the flock


class PassThroughBlob:
    """A blob streamed through and checked but never kept (the store could not even
    begin a temporary for it)."""

    def __init__(self, digest: Digest) -> None:
        self._digest = digest
        self._hasher = digest.hasher()
        self._written = 0

    path = None
    spilled = True

    @property
    def written(self) -> int:
        return self._written

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

    def commit(self, *, keep: bool = True) -> Path | None:
        self.verify()
        return None

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


class DiskStore:
    """Blobs and manifests as files under one folder, with an LRU index beside them."""

    def __init__(self, root: Path, max_size: int, *, repair: bool = True) -> None:
        self.root = root
        self.max_size = max_size
        self.counters = Counters()
        self._blobs = root / "blobs"
        self._manifests = root / "manifests"
        self._tmp = root / "tmp"
        for folder in (self._blobs, self._manifests, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.index = UsageIndex(root / "lru.sqlite")
        self._manifests_in_memory = MemoryLru(MANIFEST_MEMORY_BYTES)
        if repair:  # worker processes leave it to the parent, which repairs once
            self.recover()

    def close(self) -> None:
        self.index.close()

    # layout

    def final_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex[:2] / digest.hex

    def _type_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex[:2] / f"{digest.hex}.type"

    def temp_path(self, digest: Digest) -> Path:
        return self._tmp / f"{digest.algorithm}-{digest.hex}.part"

    def lock_path(self, digest: Digest) -> Path:
        return self._tmp / f"{digest.algorithm}-{digest.hex}.lock"

    def path_of(self, key: str) -> Path | None:
        parsed = parse_key(key)
        if parsed is None:
            return None
        kind, digest = parsed
        return self.final_path(digest) if kind == "blob" else self.manifest_path(digest)

    # blobs

    def blob_path(self, digest: Digest) -> Path | None:
        path = self.final_path(digest)
        if not path.exists():
            self._forget_missing(blob_key(digest))
            return None
        self.index.touch(blob_key(digest))
        return path

    def _forget_missing(self, key: str) -> None:
        """An index entry whose file went away (removed by hand): drop it when met."""
        if self.index.get(key) is not None and not self.index.is_pending(key):
            with contextlib.suppress(*WRITE_ERRORS):
                self.index.remove(key)

    def begin_blob(
        self, digest: Digest, upstream: str = "", repository: str = ""
    ) -> DiskTempBlob | None:
        lock_path = self.lock_path(digest)
        lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            return None
        try:
            # The lock is ours only if the file we locked is still the one at the path:
            # a finishing writer unlinks it before letting go.
            if os.fstat(lock_fd).st_ino != os.stat(lock_path).st_ino:
                os.close(lock_fd)
                return None
        except FileNotFoundError:
            os.close(lock_fd)
            return None
        temp = self.temp_path(digest)
        # A temporary left here is a dead writer's: its lock was free.
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        try:
            fd = os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except OSError:
            os.close(lock_fd)
            raise
        return DiskTempBlob(self, digest, fd, lock_fd, upstream, repository)

    def follow(self, digest: Digest) -> Followed | None:
        """The fill of `digest` another process is running, to stream as it grows; None
        when there is none to follow (it finished, failed, or has not created its file)."""
        try:
            fd = os.open(self.temp_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        final = self.final_path(digest)
        lock_path = self.lock_path(digest)

        def lock_words() -> list[str]:
            """What the writer said: its size (-1 while unknown), then whether verified."""
            try:
                return lock_path.read_text().split()
            except FileNotFoundError:
                return []

        def announced_size() -> int | None:
            words = lock_words()
            return int(words[0]) if words and words[0].isdigit() else None

        def finished() -> bool:
            # The lock file goes only after the rename: one of the two looks sees it done.
            return VERIFIED in lock_words() or final.exists()

        def alive() -> bool:
            """Whether the writer still holds its lock."""
            try:
                probe = os.open(lock_path, os.O_RDONLY)
            except FileNotFoundError:
                return False
            try:
                fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            finally:
                os.close(probe)  # also drops the shared lock, if we got it
            return False

        return Followed(fd, announced_size, finished, alive)

    # manifests

    def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        key = manifest_key(digest)
        found = self._manifests_in_memory.get(key)
        if found is None:
            try:
                found = self.manifest_path(digest).read_bytes(), self._type_path(digest).read_text()
            except FileNotFoundError:
                self._forget_missing(key)
                return None
            self._manifests_in_memory.put(key, found)
        self.index.touch(key)
        return found

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
        path = self.manifest_path(digest)
        key = manifest_key(digest)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.index.begin(key, len(data), upstream, repository)
            # The type is written first: a manifest file without its type is never visible.
            self._write_atomically(self._type_path(digest), media_type.encode())
            self._write_atomically(path, data)
            self.index.confirm(key)
        except WRITE_ERRORS as exc:
            with contextlib.suppress(*WRITE_ERRORS):
                self._unlink(key)
                self.index.remove(key)  # a pending row left would count against the bound
            self.counters.write_failed(f"storing manifest {digest}", exc)
            return False
        self.counters.write_succeeded()
        self._manifests_in_memory.put(key, (data, media_type))
        self.make_room(keep=key)
        return True

    def _write_atomically(self, path: Path, data: bytes) -> None:
        temp = self._tmp / f"{path.name}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            os.unlink(temp)
            raise
        os.close(fd)
        os.rename(temp, path)

    # the bound

    def has_room(self) -> bool:
        """Whether the disk under the store has space for writes again (a full store's
        writes are retried as they come; this lets /readyz tell before one does)."""
        try:
            stats = os.statvfs(self.root)
        except OSError:
            return False
        total = stats.f_blocks * stats.f_frsize
        return stats.f_bavail * stats.f_frsize >= min(ROOM_BYTES, total // 20)

    def usage(self) -> tuple[int, int]:
        return self.index.total()

    def make_room(self, keep: str | None = None, need: int = 0) -> int:
        """Evict least recently used content until `need` more bytes fit under the bound.

        Content used within EVICTION_GRACE seconds is spared (a response may be opening
        it); an open file that is unlinked goes on being read by whoever has it open.
        Returns the bytes evicted.
        """
        try:
            return self._make_room(keep, need)
        except WRITE_ERRORS as exc:
            self.counters.write_failed("evicting", exc)
            return 0

    def _make_room(self, keep: str | None, need: int) -> int:
        used, _ = self.index.total()
        freed = 0
        while used + need > self.max_size:
            victims = [
                e
                for e in self.index.oldest(64, used_before=time.time() - EVICTION_GRACE)
                if e.key != keep
            ]
            if not victims:
                break
            for entry in victims:
                self.evict(entry)
                used -= entry.size
                freed += entry.size
                if used + need <= self.max_size:
                    break
        return freed

    def evict(self, entry: Entry) -> None:
        self.index.mark_pending(entry.key)
        self._unlink(entry.key)
        self.index.remove(entry.key)
        self.counters.evictions += 1
        self.counters.evicted_bytes += entry.size
        log.info("evicted %s (%d bytes)", entry.key, entry.size)

    def remove(self, key: str) -> None:
        """Drop one entry and its file (a corrupt one, found by verify)."""
        self.index.mark_pending(key)
        self._unlink(key)
        self.index.remove(key)

    def _unlink(self, key: str) -> None:
        self._manifests_in_memory.drop(key)
        parsed = parse_key(key)
        if parsed is None:
            return
        kind, digest = parsed
        paths = [self.final_path(digest)]
        if kind == "manifest":
            paths = [self.manifest_path(digest), self._type_path(digest)]
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # start-up repair

    def recover(self) -> None:
        """Make files and index agree after any stop, a crash included.

        Temporaries whose writer is gone are removed; pending rows are settled against
        their files (a file that verifies is confirmed, anything else removed). Only a new
        index over existing files (the index lost) makes it walk the whole store.
        """
        removed = self.remove_stale_temporaries()
        settled = 0
        for entry in self.index.pending():
            self._settle(entry.key, entry.size)
            settled += 1
        adopted = self.adopt_unindexed() if self.index.created else 0
        if removed or settled or adopted:
            log.warning(
                "store repaired: %d temporaries removed, %d pending entries settled, "
                "%d files adopted",
                removed,
                settled,
                adopted,
            )

    def verify(self, key: str, progress: Callable[[int], None] | None = None) -> bool:
        """Whether the file behind `key` exists and holds exactly what its digest names."""
        parsed = parse_key(key)
        path = self.path_of(key)
        if parsed is None or path is None or not path.is_file():
            return False
        kind, digest = parsed
        if kind == "blob":
            return hash_file(path, digest, progress)
        try:
            data, media_type = path.read_bytes(), self._type_path(digest).read_text()
        except FileNotFoundError:
            return False
        if progress is not None:
            progress(len(data))
        return manifest_matches(digest, data, media_type)

    def _settle(self, key: str, size: int) -> None:
        path = self.path_of(key)
        fits = path is not None and path.is_file() and path.stat().st_size == size
        if fits and self.verify(key):
            self.index.confirm(key)
            return
        self.remove(key)

    def adopt_unindexed(self) -> int:
        """Index files that have no entry, once each verifies; remove those that do not."""
        adopted = 0
        for key, path in self.walk_files():
            if self.index.get(key) is not None:
                continue
            if self.verify(key):
                self.index.add(key, path.stat().st_size)
                adopted += 1
            else:
                log.warning("removing %s: its content does not match its name", path)
                self._unlink(key)
        return adopted

    def walk_files(self) -> Iterator[tuple[str, Path]]:
        """Every content file in the store, as (index key, path)."""
        for kind, folder in (("blob", self._blobs), ("manifest", self._manifests)):
            for path in folder.glob("*/*/*"):
                if path.suffix == ".type":
                    continue
                digest = parse_digest(f"{path.parent.parent.name}:{path.name}")
                if digest is not None:
                    yield f"{kind}:{digest}", path

    def remove_stale_temporaries(self) -> int:
        """Delete temporaries whose writer is gone (their lock is free); returns how many."""
        removed = 0
        for entry in os.scandir(self._tmp):
            if entry.name.endswith(".tmp"):
                os.unlink(entry.path)
                removed += 1
                continue
            if not entry.name.endswith((".part", ".lock")):
                continue
            stem = entry.name.rsplit(".", 1)[0]
            lock_path = self._tmp / f"{stem}.lock"
            try:
                lock_fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock_fd)
                continue  # a live writer in another process
            for name in (f"{stem}.part", f"{stem}.lock"):
                try:
                    os.unlink(self._tmp / name)
                    removed += name.endswith(".part")
                except FileNotFoundError:
                    pass
            os.close(lock_fd)
        return removed
