"""The content-addressed store: verified blobs and manifests on disk, keyed by digest.

A file under `blobs/` or `manifests/` is always complete and correct: content is written
to a temporary under `tmp/`, and renamed into place only once its length and digest
match. Start-up removes temporaries that no live writer holds.

Writers of one blob coordinate across processes with a lock file per digest
(`tmp/<hex>.lock`, flock'd while the fill runs), so several worker processes over one
store never write the same temporary twice.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Protocol

from .reference import Digest, manifest_matches

log = logging.getLogger("mirror.storage")


class DigestMismatch(Exception):
    """The bytes received do not hash to the digest they were asked for."""


class TempBlob(Protocol):
    """A blob being written; `commit` makes it visible only when it verifies."""

    @property
    def path(self) -> Path: ...

    @property
    def written(self) -> int: ...

    def write(self, data: bytes) -> None: ...

    def commit(self) -> Path: ...

    def discard(self) -> None: ...


class BlobStore(Protocol):
    """What the pull-through policy needs from a store; the contract tests run on each."""

    def blob_path(self, digest: Digest) -> Path | None:
        """The complete blob's file, or None when it is not stored."""

    def final_path(self, digest: Digest) -> Path: ...

    def begin_blob(self, digest: Digest) -> TempBlob | None:
        """A temporary to fill, or None when another process is filling this digest."""

    def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """A stored manifest's exact bytes and media type."""

    def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        """Keep a manifest; raises DigestMismatch when `data` does not hash to `digest`."""


class DiskTempBlob:
    """A temporary file owned by this process (its lock file is flock'd)."""

    def __init__(self, store: DiskStore, digest: Digest, fd: int, lock_fd: int) -> None:
        self._store = store
        self._digest = digest
        self._fd = fd
        self._lock_fd = lock_fd
        self._hasher = digest.hasher()
        self._written = 0
        self._closed = False

    @property
    def path(self) -> Path:
        return self._store.temp_path(self._digest)

    @property
    def written(self) -> int:
        return self._written

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            count = os.write(self._fd, view)
            view = view[count:]
        self._hasher.update(data)
        self._written += len(data)

    def commit(self) -> Path:
        """Verify, flush to disk, and rename into place; DigestMismatch discards the file."""
        if self._hasher.hexdigest() != self._digest.hex:
            self.discard()
            raise DigestMismatch(f"content does not match {self._digest}")
        os.fsync(self._fd)
        final = self._store.final_path(self._digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(self.path, final)
        self._release()
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


class DiskStore:
    """Blobs and manifests as files under one folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._manifests = root / "manifests"
        self._tmp = root / "tmp"
        for folder in (self._blobs, self._manifests, self._tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()

    # layout

    def final_path(self, digest: Digest) -> Path:
        return self._blobs / digest.algorithm / digest.hex[:2] / digest.hex

    def manifest_path(self, digest: Digest) -> Path:
        return self._manifests / digest.algorithm / digest.hex[:2] / digest.hex

    def temp_path(self, digest: Digest) -> Path:
        return self._tmp / f"{digest.algorithm}-{digest.hex}.part"

    def lock_path(self, digest: Digest) -> Path:
        return self._tmp / f"{digest.algorithm}-{digest.hex}.lock"

    # blobs

    def blob_path(self, digest: Digest) -> Path | None:
        path = self.final_path(digest)
        return path if path.exists() else None

    def begin_blob(self, digest: Digest) -> DiskTempBlob | None:
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
        return DiskTempBlob(self, digest, fd, lock_fd)

    def remove_stale_temporaries(self) -> int:
        """Delete temporaries whose writer is gone (their lock is free); returns how many."""
        removed = 0
        for entry in os.scandir(self._tmp):
            if not entry.name.endswith(".part") and not entry.name.endswith(".lock"):
                if entry.name.endswith(".tmp"):
                    os.unlink(entry.path)
                    removed += 1
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

    # manifests

    def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        path = self.manifest_path(digest)
        try:
            data = path.read_bytes()
            media_type = (path.parent / f"{digest.hex}.type").read_text()
        except FileNotFoundError:
            return None
        return data, media_type

    def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        if not manifest_matches(digest, data, media_type):
            raise DigestMismatch(f"manifest does not match {digest}")
        path = self.manifest_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        # The type is written first: a manifest file without its type is never visible.
        self._write_atomically(path.parent / f"{digest.hex}.type", media_type.encode())
        self._write_atomically(path, data)

    def _write_atomically(self, path: Path, data: bytes) -> None:
        temp = self._tmp / f"{path.name}.{os.getpid()}.tmp"
        fd = os.open(temp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(temp)
            if exc.errno == errno.ENOSPC:
                log.error("disk full while storing %s", path.name)
            raise
        os.close(fd)
        os.rename(temp, path)
