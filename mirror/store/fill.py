"""Filling a blob on disk, shared by every process over one store: both sides of the protocol.

The writer of a blob holds an flock on `tmp/<alg>-<hex>.lock` while it writes
`tmp/<alg>-<hex>.part`, so several worker processes never write the same temporary twice.
The lock file also tells the processes following the fill its length (once the upstream
said) and that its content verified (the word `verified`), so followers give their clients
the last byte then, not after the fsync and rename; or that the fill is not being kept
(`spilled`: a full disk, a blob over the bound), so followers fetch for themselves. A
temporary whose lock is free belongs to a writer that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ..inflight import READ_CHUNK, FileRegion, NotKept, Piece, TransferFailed
from ..reference import Digest
from .base import DigestMismatch

VERIFIED = "verified"  # written to a fill's lock file once its content checked out
SPILLED = "spilled"  # written when the fill stopped keeping its bytes: nothing to follow

# Makes a verified temporary of `size` bytes the stored blob; False when it could not.
CommitInto = Callable[[Path, int], bool]


class FileReadBack:
    """A temporary read back through one descriptor opened while it is being written."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def pread(self, offset: int, size: int) -> bytes:
        return os.pread(self._fd, size, offset)

    def fileno(self) -> int | None:
        return self._fd if self._fd >= 0 else None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DiskTempBlob:
    """A temporary file owned by this process (its lock file is flock'd)."""

    def __init__(
        self, digest: Digest, path: Path, lock: Path, fd: int, lock_fd: int, commit: CommitInto
    ) -> None:
        self._digest = digest
        self.path = path
        self._lock = lock
        self._fd = fd
        self._lock_fd = lock_fd
        self._commit_into = commit
        self._hasher = digest.hasher()
        self._written = 0
        self._spilled = False
        self._synced = False
        self._closed = False
        self._verified = False
        self._size: int | None = None

    @property
    def written(self) -> int:
        return self._written

    @property
    def spilled(self) -> bool:
        return self._spilled

    def read_back(self) -> FileReadBack:
        return FileReadBack(self.path)

    def write(self, data: bytes) -> None:
        """Append to the file (once spilled: only hash and count). OSError leaves `written`
        at the last whole chunk, so the file's first `written` bytes stay right."""
        if not self._spilled:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        self._hasher.update(data)
        self._written += len(data)

    def spill(self) -> None:
        """Stop writing the file: the rest is only hashed, nothing is kept, and the
        temporary is removed at once (readers holding it open keep what it had)."""
        if self._spilled:
            return
        self._spilled = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):  # followers then give up at once
            self._tell(SPILLED)

    def announce(self, size: int | None) -> None:
        self._size = size
        self._tell(SPILLED if self._spilled else "")

    def _tell(self, state: str) -> None:
        """What followers read in the lock file: the length (-1 while unknown) and the
        state. Fixed width, written in one piece at offset 0, so it is never half read."""
        size = self._size if self._size is not None else -1
        os.pwrite(self._lock_fd, f"{size:<20}\n{state:<10}\n".encode(), 0)

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
            self._size = self._written
            with contextlib.suppress(OSError):
                self._tell(VERIFIED)

    def sync(self) -> None:
        os.fsync(self._fd)
        self._synced = True

    def commit(self, *, keep: bool = True) -> bool:
        if not self._verified:
            self.verify()
        if not keep or self._spilled:
            self.discard()
            return False
        if not self._synced:
            self.sync()
        kept = self._commit_into(self.path, self._written)
        if not kept:
            self.discard()
        self._release()
        return kept

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
            os.unlink(self._lock)
        os.close(self._lock_fd)  # closing drops the flock


class DiskFills:
    """The fills under one store's `tmp/` folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def temp_path(self, digest: Digest) -> Path:
        return self.folder / f"{digest.algorithm}-{digest.hex}.part"

    def lock_path(self, digest: Digest) -> Path:
        return self.folder / f"{digest.algorithm}-{digest.hex}.lock"

    def begin(self, digest: Digest, commit: CommitInto) -> DiskTempBlob | None:
        """The temporary to fill, or None when another writer holds this digest's lock."""
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
        return DiskTempBlob(digest, temp, lock_path, fd, lock_fd, commit)

    def follow(self, digest: Digest, final: Path) -> FollowedFill | None:
        """The fill of `digest` another process is running, to stream as it grows; None
        when there is none to follow (it finished, failed, or has not created its file).

        The follower stays bound to that one writer: it reads the writer's own lock file
        through a descriptor, and counts the fill finished only by that lock file's word
        or by its own file arriving at `final`. A writer that fails and a new fill of the
        same digest that starts at once must not look like one fill that succeeded."""
        part = self.temp_path(digest)
        try:
            fd = os.open(part, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            lock_fd = os.open(self.lock_path(digest), os.O_RDONLY)
        except FileNotFoundError:
            os.close(fd)
            return None
        inode = os.fstat(fd).st_ino
        try:
            # The file is still at its path once the lock is open: the writer removes its
            # file before its lock, so this lock is that writer's.
            same = os.stat(part).st_ino == inode
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            os.close(lock_fd)
            return None

        def lock_words() -> list[str]:
            """What the writer said: its size (-1 while unknown), then whether verified."""
            return os.pread(lock_fd, 64, 0).decode(errors="replace").split()

        def announced_size() -> int | None:
            words = lock_words()
            return int(words[0]) if words and words[0].isdigit() else None

        def finished() -> bool:
            # Its lock file goes only after the rename: one of the two looks sees it done.
            if VERIFIED in lock_words():
                return True
            try:
                return os.stat(final).st_ino == inode
            except FileNotFoundError:
                return False

        def spilled() -> bool:
            return SPILLED in lock_words()

        def alive() -> bool:
            """Whether the writer still holds its lock."""
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock_fd, fcntl.LOCK_UN)
            return False

        followed = FollowedFill(fd, announced_size, finished, alive, spilled)
        weakref.finalize(followed, os.close, lock_fd)
        return followed

    def remove_stale(self) -> int:
        """Delete temporaries whose writer is gone; returns how many blobs' worth.

        A blob's `.part` goes when its lock is free; a manifest's `.tmp` (named with its
        writer's pid) when that process no longer runs."""
        removed = 0
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".tmp"):
                if not process_alive(_writer_pid(entry.name)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
                continue
            if not entry.name.endswith((".part", ".lock")):
                continue
            stem = entry.name.rsplit(".", 1)[0]
            lock_path = self.folder / f"{stem}.lock"
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
                    os.unlink(self.folder / name)
                    removed += name.endswith(".part")
                except FileNotFoundError:
                    pass
            os.close(lock_fd)
        return removed


def _writer_pid(name: str) -> int:
    """The pid in `<name>.<pid>.tmp`; 0 when there is none."""
    parts = name.rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0


def process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FollowedFill:
    """A file another process is writing, read as it grows by polling its size.

    `size` is read with `announced_size` (None until the writer said); the writer is known
    to have finished when `finished()` is true and to have given up when `alive()` turns
    false first. As with Transfer, the last byte waits until the writer finished.
    """

    POLL_SECONDS = 0.01

    def __init__(
        self,
        fd: int,
        announced_size: Callable[[], int | None],
        finished: Callable[[], bool],
        alive: Callable[[], bool],
        spilled: Callable[[], bool],
    ) -> None:
        self._fd = fd
        self._spilled = spilled
        weakref.finalize(self, os.close, fd)
        self._announced_size = announced_size
        self._finished_now = finished
        self._done = False
        self._alive = alive
        self.size: int | None = None
        self.readers = 0

    def _finished(self) -> bool:
        """Whether the writer finished; once it has, without asking again."""
        self._done = self._done or self._finished_now()
        return self._done

    def size_if_known(self) -> int | None:
        """The length the writer announced, without waiting."""
        if self.size is None:
            self.size = self._announced_size()
        return self.size

    async def wait_started(self, timeout: float) -> None:
        """Wait until the length is known; NotKept when the writer is not keeping the blob
        (there will be nothing to follow), TransferFailed when it gave up."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.size is None:
            self.size = self._announced_size()
            if self.size is None and self._finished():
                self.size = os.fstat(self._fd).st_size
            if self.size is not None:
                break
            if not self._alive() or asyncio.get_running_loop().time() > deadline:
                raise TransferFailed("the process fetching this blob gave up")
            await asyncio.sleep(self.POLL_SECONDS)
        if self._spilled():
            raise NotKept("the process fetching this blob is not keeping it")

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        async for piece in self._follow(start, end, regions=False):
            assert isinstance(piece, bytes)
            yield piece

    def pieces(self, start: int = 0, end: int | None = None) -> AsyncIterator[Piece]:
        """As `read`, but what is already in the file comes as one FileRegion."""
        return self._follow(start, end, regions=True)

    async def _follow(self, start: int, end: int | None, regions: bool) -> AsyncIterator[Piece]:
        assert self.size is not None, "wait_started first"
        size = self.size
        end = size if end is None else min(end, size)
        self.readers += 1
        try:
            offset = start
            while offset < end:
                finished = self._finished()
                written = size if finished else min(os.fstat(self._fd).st_size, size) - 1
                stop = min(written, end if finished else end - 1)  # a range's last byte too
                if offset < stop:
                    if regions:
                        yield FileRegion(self._fd, offset, stop - offset)
                        offset = stop
                        continue
                    data = os.pread(self._fd, min(READ_CHUNK, stop - offset), offset)
                    if not data:
                        raise TransferFailed("file shrank under a reader")
                    offset += len(data)
                    yield data
                    continue
                if not finished and not self._alive():
                    if self._finished():
                        continue  # it finished between the two looks
                    raise TransferFailed("the process fetching this blob gave up")
                if not finished and self._spilled():
                    raise TransferFailed("the process fetching this blob stopped keeping it")
                await asyncio.sleep(self.POLL_SECONDS)
        finally:
            self.readers -= 1
