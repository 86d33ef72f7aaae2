"""The store on disk: verified blobs and manifests as files keyed by digest, bounded by an
LRU on their exact sizes.

A file under `blobs/` or `manifests/` is always complete and correct: content is written
to a temporary under `tmp/` (see diskfill), and renamed into place only once its length and
digest match. Every change is recorded in the LRU index as pending before the file
operation and confirmed after it, so start-up repairs a crash by checking the pending rows
only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from ..reference import Digest, manifest_matches, parse_digest
from .base import (
    WRITE_ERRORS,
    Counters,
    DigestMismatch,
    FileBlob,
    blob_key,
    manifest_key,
    parse_key,
)
from .fill import DiskFills, DiskTempBlob, FollowedFill
from .lru import Entry, UsageIndex
from .removals import RemovalMark

log = logging.getLogger("mirror.storage")

MANIFEST_MEMORY_BYTES = 64 * 1024 * 1024  # manifests also kept in memory, up to this much
RECHECK_SECONDS = 1.0  # how long a manifest in memory is trusted to be on disk, at most
EVICTION_GRACE = 1.0  # seconds: content used this recently is not evicted (it is being sent)
HASH_CHUNK = 1024 * 1024
ROOM_BYTES = 64 * 1024 * 1024  # free space (or 5% of a small disk) that counts as room again


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
        self._seen: dict[str, float] = {}  # when each was last known to be on disk
        self._lock = threading.Lock()  # stores and evictions run in threads

    def seen(self, key: str) -> float:
        return self._seen.get(key, 0.0)

    def forget_seen(self) -> None:
        self._seen.clear()

    def saw(self, key: str, when: float) -> None:
        if key in self._entries:
            self._seen[key] = when

    def get(self, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: str, value: tuple[bytes, str]) -> None:
        with self._lock:
            self._drop(key)
            self._entries[key] = value
            self._seen[key] = time.monotonic()  # it was just read or written
            self._bytes += len(value[0])
            while self._bytes > self._max_bytes and self._entries:
                dropped, (data, _) = self._entries.popitem(last=False)
                self._seen.pop(dropped, None)
                self._bytes -= len(data)

    def drop(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: str) -> None:
        self._seen.pop(key, None)
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= len(found[0])


class DiskStore:
    """Blobs and manifests as files under one folder, with an LRU index beside them.

    `repair` settles what a crash left (pending rows, dead writers' temporaries): the
    server does it once at start; maintenance commands beside a live server do not, so
    they never touch another process's work in progress.
    """

    def __init__(
        self,
        root: Path,
        max_size: int,
        *,
        repair: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self.max_size = max_size
        self.counters = Counters()
        self._clock = clock
        self._blobs = root / "blobs"
        self._manifests = root / "manifests"
        self._manifests_folder = str(self._manifests)
        self._tmp = root / "tmp"
        for folder in (self._blobs, self._manifests, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._removals = RemovalMark(root / "removals")
        self._removals_seen = self._removals.read()
        self._fills = DiskFills(self._tmp)
        self.index = UsageIndex(root / "lru.sqlite", clock)
        self._manifests_in_memory = MemoryLru(MANIFEST_MEMORY_BYTES)
        self._missing: set[str] = set()  # index keys whose file was found gone
        self._lock = threading.Lock()
        self._evicting = threading.Lock()
        if repair:  # worker processes leave it to the parent, which repairs once
            self.recover()

    def close(self) -> None:
        self.index.close()
        self._removals.close()

    # layout

    def final_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex[:2] / digest.hex

    def _type_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex[:2] / f"{digest.hex}.type"

    def path_of(self, key: str) -> Path | None:
        parsed = parse_key(key)
        if parsed is None:
            return None
        kind, digest = parsed
        return self.final_path(digest) if kind == "blob" else self.manifest_path(digest)

    # blobs

    def has_blob(self, digest: Digest) -> bool:
        return self.final_path(digest).exists()

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.final_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open_blob(self, digest: Digest, *, use: bool = True) -> FileBlob | None:
        """The blob's file, open; `use=False` for a look that is not a use (listing the
        cached images must not make them all recently used)."""
        try:
            fd = os.open(self.final_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            self._forget_missing(blob_key(digest))
            return None
        if use:
            self.index.touch(blob_key(digest))
        return FileBlob(fd, os.fstat(fd).st_size)

    def _forget_missing(self, key: str) -> None:
        """An index entry whose file went away (removed by hand): dropped with the next
        flush of uses, off the loop."""
        with self._lock:
            self._missing.add(key)

    def _drop_missing(self) -> None:
        with self._lock:
            missing, self._missing = self._missing, set()
        for key in missing:
            if self.has_file(key) or self.index.is_pending(key):
                continue  # put back since, or being put back now
            with contextlib.suppress(*WRITE_ERRORS):
                self.index.remove(key)

    def begin_blob(
        self, digest: Digest, upstream: str = "", repository: str = ""
    ) -> DiskTempBlob | None:
        def commit(temp: Path, size: int) -> bool:
            return self._commit_blob(digest, temp, size, upstream, repository)

        return self._fills.begin(digest, commit)

    def _commit_blob(
        self, digest: Digest, temp: Path, size: int, upstream: str, repository: str
    ) -> bool:
        """Rename a verified, synced temporary into place, recorded in the index."""
        final = self.final_path(digest)
        key = blob_key(digest)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self.index.begin(key, size, upstream, repository)
        except WRITE_ERRORS as exc:
            self.counters.write_failed(f"indexing {digest}", exc)
            return False
        os.rename(temp, final)
        self.index.confirm(key)
        self.counters.write_succeeded()
        self.make_room(keep=key)
        return True

    def follow(self, digest: Digest) -> FollowedFill | None:
        return self._fills.follow(digest, self.final_path(digest))

    # manifests

    def get_manifest(self, digest: Digest, *, use: bool = True) -> tuple[bytes, str] | None:
        key = manifest_key(digest)
        found = self._manifests_in_memory.get(key)
        mark = self._removals.read()
        if mark != self._removals_seen:
            self._removals_seen = mark  # something was removed: look at the disk again
            self._manifests_in_memory.forget_seen()
        now = time.monotonic()
        if found is not None and now - self._manifests_in_memory.seen(key) > RECHECK_SECONDS:
            # Removed by another process (`mirror gc`, a worker): gone for us too. Looked
            # for again after a removal anywhere, and every RECHECK_SECONDS (a file removed
            # by hand).
            where = f"{self._manifests_folder}/{digest.algorithm}/{digest.hex[:2]}/{digest.hex}"
            if os.path.exists(where):
                self._manifests_in_memory.saw(key, now)
            else:
                self._manifests_in_memory.drop(key)
                found = None
        if found is None:
            path = self.manifest_path(digest)
            try:
                found = path.read_bytes(), self._type_path(digest).read_text()
            except FileNotFoundError:
                self._forget_missing(key)
                return None
            if use:  # a look (a listing) does not push hot manifests out of memory
                self._manifests_in_memory.put(key, found)
        if use:
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
        if path.exists() and self._type_path(digest).exists():
            self.index.touch(key)  # kept already (asked under another tag): nothing to write
            return True
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
        return True  # the room it takes is made by the caller's make_room, not in its wait

    def _write_atomically(self, path: Path, data: bytes) -> None:
        # Unique to this write (two threads may keep one manifest at once, for two tags),
        # and ending with the pid: see remove_stale.
        temp = self._tmp / f"{path.name}.{secrets.token_hex(4)}.{os.getpid()}.tmp"
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

    def usage(self) -> tuple[int, int]:
        return self.index.total()

    def usage_by(self) -> list[tuple[str, str, int, int]]:
        return self.index.usage_by()

    def owner(self, key: str) -> tuple[str, str] | None:
        entry = self.index.get(key)
        return (entry.upstream, entry.repository) if entry is not None else None

    def evictions(self) -> tuple[int, int]:
        return self.index.evictions()

    def oldest(self, limit: int, used_before: float) -> list[Entry]:
        return self.index.oldest(limit, used_before)

    def flush_uses(self) -> None:
        self._drop_missing()
        if self.index.flush_due():
            self.index.flush()

    def state(self) -> str:
        if not self.root.is_dir() or not os.access(self._tmp, os.W_OK):
            return "unavailable"
        if self.counters.full and not self._has_room():
            return "degraded"  # serving what it has; keeping nothing new until space returns
        return "ok"

    def _has_room(self) -> bool:
        """Whether the disk has space for writes again (a full store's writes are retried
        as they come; this lets /readyz tell before one does)."""
        try:
            stats = os.statvfs(self.root)
        except OSError:
            return False
        total = stats.f_blocks * stats.f_frsize
        return stats.f_bavail * stats.f_frsize >= min(ROOM_BYTES, total // 20)

    def make_room(self, keep: str | None = None, need: int = 0) -> int:
        """Evict least recently used content until `need` more bytes fit under the bound.

        Content used within EVICTION_GRACE seconds is spared (a response may be opening
        it); an open file that is unlinked goes on being read by whoever has it open.
        Returns the bytes evicted.
        """
        try:
            with self._evicting:  # one eviction at a time: two would pick the same victims
                freed, count = self._make_room(keep, need)
        except WRITE_ERRORS as exc:
            self.counters.write_failed("evicting", exc)
            return 0
        if count:
            log.info("evicted %d entries (%d bytes) to stay under the bound", count, freed)
        return freed

    def _make_room(self, keep: str | None, need: int) -> tuple[int, int]:
        used, _ = self.index.total()
        freed = count = 0
        while used + need > self.max_size:
            victims = [
                e
                for e in self.index.oldest(64, used_before=self._clock() - EVICTION_GRACE)
                if e.key != keep
            ]
            if not victims:
                break
            for entry in victims:
                self.evict(entry)
                used -= entry.size
                freed += entry.size
                count += 1
                if used + need <= self.max_size:
                    break
        return freed, count

    def evict(self, entry: Entry) -> None:
        self.index.mark_pending(entry.key)
        self._unlink(entry.key)
        self.index.remove(entry.key, evicted=True)
        log.debug("evicted %s (%d bytes)", entry.key, entry.size)

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
        if kind == "manifest":
            self._removals.removed()  # after the unlink: whoever looks then finds it gone

    # start-up repair and maintenance

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

    def remove_stale_temporaries(self) -> int:
        """Delete temporaries whose writer is gone; returns how many."""
        return self._fills.remove_stale()

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

    def check(self, key: str, progress: Callable[[int], None] | None = None) -> str:
        """For `mirror verify` beside a live server: "ok", "gone" (evicted or replaced
        since it was listed: not corrupt), or "corrupt" (still the same file, and wrong)."""
        path = self.path_of(key)
        if path is None:
            return "gone"
        try:
            before = path.stat()
        except FileNotFoundError:
            return "gone"
        try:
            right = self.verify(key, progress)
        except FileNotFoundError:
            return "gone"
        if right:
            return "ok"
        try:
            after = path.stat()
        except FileNotFoundError:
            return "gone"
        same = (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        return "corrupt" if same else "gone"

    def remove_if_unchanged(self, key: str, inode: int) -> bool:
        """Remove a corrupt entry, unless its file was replaced meanwhile (a live server
        put the right content in place): then leave it."""
        path = self.path_of(key)
        try:
            if path is None or path.stat().st_ino != inode:
                return False
        except FileNotFoundError:
            return False
        self.remove(key)
        return True

    def inode(self, key: str) -> int | None:
        path = self.path_of(key)
        try:
            return None if path is None else path.stat().st_ino
        except FileNotFoundError:
            return None

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

    def indexed_keys(self) -> set[str]:
        """Every key the index holds as done (not a change a live process is making)."""
        pending = {entry.key for entry in self.index.pending()}
        return {entry.key for entry in self.index.entries()} - pending

    def has_file(self, key: str) -> bool:
        path = self.path_of(key)
        return path is not None and path.exists()

    def forget(self, key: str) -> None:
        """Drop an index entry whose file is gone."""
        self.index.remove(key)
