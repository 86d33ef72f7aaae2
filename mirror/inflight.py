"""Coalescing: one piece of work per key, however many callers; one file, many readers.

Generic on purpose: nothing here knows about registries. `SingleFlight` shares the result of
one coroutine among concurrent callers; `Transfer` lets many readers follow a file while
one writer fills it, each reader getting bytes as they land, or, where the bytes are in a
file, the region of the file to hand to the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

READ_CHUNK = 1024 * 1024


class SingleFlight(Generic[K, V]):
    """Run one task per key; concurrent callers of the same key await that one task.

    The task is not tied to any caller: a caller that is cancelled (a client hanging up)
    stops waiting, but the work goes on for the others.
    """

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Task[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._tasks

    async def run(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._tasks[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(task)

    def _forget(self, key: K, task: asyncio.Task[V]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: callers may all have gone

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class FileRegion:
    """Bytes [offset, offset + count) of an open file, for the kernel to send (sendfile):
    a reader behind a fill gets what is already written this way, in one call, instead of
    chunk by chunk through Python. The descriptor stays open while the reader holds it."""

    fd: int
    offset: int
    count: int


Piece = bytes | memoryview | FileRegion


async def outlast(task: asyncio.Future[V]) -> V:
    """The result of `task`, which is not abandoned midway: work a thread is doing on a
    file (writing it, committing it) must end before the file is removed or the store
    closed. A cancellation waits for the task, then is raised."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            cancelled = True
        except BaseException:
            break
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the caller is going away
        raise asyncio.CancelledError
    return task.result()


class ReadBack(Protocol):
    """The bytes of a blob being written, read back for readers that fell behind."""

    def pread(self, offset: int, size: int) -> bytes: ...

    def fileno(self) -> int | None:
        """The descriptor the bytes are read from, when they are in a file."""
        ...

    def close(self) -> None: ...


class BlobStream(Protocol):
    """What a handler streams from: a Transfer in this process, or a fill another process
    runs (followed through the store)."""

    size: int | None

    @property
    def readers(self) -> int: ...

    def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes | memoryview]: ...

    def pieces(self, start: int = 0, end: int | None = None) -> AsyncIterator[Piece]: ...


class TransferFailed(Exception):
    """The writer gave up; readers must abort what they were sending."""


class NotKept(TransferFailed):
    """The fill being followed does not keep its bytes: there is nothing to follow."""


class Transfer:
    """A blob being written by one task and read, as it grows, by many.

    Readers share one `ReadBack` of what the writer keeps (for a file: one descriptor
    opened at the start, so the file may be renamed or removed under them). Until the
    writer calls `finish` (after verifying the content), readers never see the last
    byte of what they asked for (the blob's, or their range's): a body that turns out
    wrong never reaches a client complete. The newest chunks
    stay in memory too, so readers keeping up with the writer (the usual case) are served
    without reading the file back.

    If the writer can no longer keep the bytes (disk full, or a blob larger than the
    store), it `spill`s: from there on chunks live only in memory, in a window the writer
    keeps bounded with `drain` (it waits for the slowest reader, and drops a reader that
    stays too far behind). A reader that asks for bytes no longer held fails.
    """

    RECENT_BYTES = 1024 * 1024
    SPILL_WINDOW = 8 * 1024 * 1024  # bytes held for readers once spilled

    def __init__(self, back: ReadBack | None) -> None:
        self._back = back
        if back is not None:
            self._closer = weakref.finalize(self, back.close)
        self.size: int | None = None  # total length, once the writer knows it
        self.written = 0
        self.complete = False
        self.error: BaseException | None = None
        self._recent: deque[tuple[int, bytes]] = deque()  # (offset, chunk), newest last
        self._recent_bytes = 0
        self._spilled_from: int | None = None if back is not None else 0
        self._spilled: deque[tuple[int, bytes]] = deque()  # (offset, chunk), oldest first
        self._positions: dict[int, int] = {}  # reader -> next offset it will read
        self._dropped: set[int] = set()  # readers that fell too far behind a spill
        self._next_reader = 0
        self._dropped_file = False
        self._started = asyncio.Event()
        self._changed = asyncio.Event()
        # Set when the fill is over (kept, not kept, or failed): after the last byte,
        # the fsync and rename still run; a reader that needs the blob stored waits here.
        self.settled = asyncio.Event()

    @property
    def readers(self) -> int:
        return len(self._positions)

    @property
    def spilled(self) -> bool:
        return self._spilled_from is not None

    # the writer's side

    def start(self, size: int | None) -> None:
        self.size = size
        self._started.set()

    def spill(self) -> None:
        """From now on the bytes are only in memory, not in the file."""
        if self._spilled_from is None:
            self._spilled_from = self.written
            self._recent.clear()
            self._recent_bytes = 0

    def advance(self, data: bytes) -> None:
        """`data` was appended to the file (or, once spilled, only arrived)."""
        if self._spilled_from is not None:
            self._spilled.append((self.written, data))
        else:
            self._recent.append((self.written, data))
            self._recent_bytes += len(data)
            while self._recent_bytes > self.RECENT_BYTES and len(self._recent) > 1:
                self._recent_bytes -= len(self._recent.popleft()[1])
        self.written += len(data)
        self._trim()
        self._notify()

    async def drain(self, timeout: float) -> None:
        """Once spilled: wait until no reader is more than SPILL_WINDOW behind the writer;
        readers still that far behind after `timeout` seconds are dropped (they fail)."""
        if self._spilled_from is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._lagging():
            remaining = deadline - loop.time()
            if remaining <= 0:
                self._dropped.update(self._lagging())
                self._trim()
                self._notify()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _lagging(self) -> list[int]:
        floor = self.written - self.SPILL_WINDOW
        return [r for r, o in self._positions.items() if o < floor and r not in self._dropped]

    def _trim(self) -> None:
        """Forget spilled chunks every live reader has passed, but always keep the last
        SPILL_WINDOW bytes (a client joining now can still start from the beginning of a
        transfer that began a moment ago)."""
        if self._spilled_from is None:
            return
        live = [o for r, o in self._positions.items() if r not in self._dropped]
        keep_from = min([*live, self.written - self.SPILL_WINDOW])
        while self._spilled and self._spilled[0][0] + len(self._spilled[0][1]) <= keep_from:
            self._spilled.popleft()

    def finish(self) -> None:
        self.complete = True
        self._started.set()
        self._notify()
        self._close_when_unread()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._started.set()
        self._notify()
        self._close_when_unread()

    def not_kept(self) -> None:
        """The writer removed what it wrote (it could not keep it): let go of it as soon
        as no reader needs it."""
        self._dropped_file = True
        self._close_when_unread()

    def _close_when_unread(self) -> None:
        """Once failed, or spilled (either way its temporary is removed), close the shared
        reader as soon as no reader is left, so the space returns to the disk now, not at
        some garbage collection. (A kept blob's reader may serve a late reader still.)"""
        gone = self.error is not None or (self.complete and (self.spilled or self._dropped_file))
        if gone and not self._positions and self._back is not None:
            self._back = None
            self._closer()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # the readers' side

    async def wait_started(self) -> None:
        """Wait until the size is known (or the transfer failed, which raises)."""
        await self._started.wait()
        if self.error is not None and not self.complete:
            raise self.error

    def serves_from(self, offset: int) -> bool:
        """Whether a new reader starting at `offset` can still be given every byte."""
        spilled_from = self._spilled_from
        if spilled_from is None:
            return True
        if offset < spilled_from and self._back is None:
            return False
        # From the file up to the spill, then from memory: the memory must still hold the
        # bytes from there (a reader joining late finds the window moved on).
        first = self._spilled[0][0] if self._spilled else self.written
        return max(offset, spilled_from) >= first

    def _chunk(self, offset: int, stop: int, regions: bool) -> Piece:
        spilled_from = self._spilled_from
        if spilled_from is not None and offset >= spilled_from:
            for start, data in self._spilled:
                if start <= offset < start + len(data):
                    return _window(data, start, offset, stop)
            raise TransferFailed("fell too far behind a transfer that is not being kept")
        if spilled_from is not None:
            stop = min(stop, spilled_from)
        fd = self._back.fileno() if regions and self._back is not None else None
        if fd is not None:
            return FileRegion(fd, offset, stop - offset)
        for start, data in reversed(self._recent):
            if start <= offset:
                if offset < start + len(data):
                    return _window(data, start, offset, stop)
                break
        if self._back is None:
            raise TransferFailed("came after a transfer that was not kept had ended")
        return self._back.pread(offset, min(READ_CHUNK, stop - offset))

    async def read(
        self, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes | memoryview]:
        """Bytes [start, end) as the writer provides them; raises TransferFailed on failure."""
        async for piece in self._follow(start, end, regions=False):
            assert not isinstance(piece, FileRegion)
            yield piece

    def pieces(self, start: int = 0, end: int | None = None) -> AsyncIterator[Piece]:
        """As `read`, but what is already in the file comes as one FileRegion: everything
        written since the reader's last piece, however far behind the writer it is."""
        return self._follow(start, end, regions=True)

    async def _follow(self, start: int, end: int | None, regions: bool) -> AsyncIterator[Piece]:
        reader = self._next_reader
        self._next_reader += 1
        self._positions[reader] = start
        try:
            offset = start
            while True:
                if reader in self._dropped:
                    raise TransferFailed("fell too far behind a transfer that is not being kept")
                stop = self.written if self.complete else self.written - 1
                if end is not None:
                    # A range's last byte waits for the verification too: bytes that turn
                    # out wrong never reach a client as a complete answer.
                    stop = min(stop, end if self.complete else end - 1)
                if offset < stop:
                    data = self._chunk(offset, stop, regions)
                    size = data.count if isinstance(data, FileRegion) else len(data)
                    if not size:
                        raise TransferFailed("file shrank under a reader")
                    yield data
                    offset += size
                    self._positions[reader] = offset
                    if self._spilled_from is not None:
                        self._trim()
                        self._notify()  # the writer may be waiting in drain
                    continue
                if self.complete or (end is not None and offset >= end):
                    return
                if self.error is not None:
                    raise TransferFailed(str(self.error)) from self.error
                await self._changed.wait()
        finally:
            del self._positions[reader]
            self._dropped.discard(reader)
            if self._spilled_from is not None:
                self._trim()
                self._notify()
            self._close_when_unread()


def _window(data: bytes, start: int, offset: int, stop: int) -> memoryview:
    """The part of `data` (which begins at file offset `start`) from `offset` to `stop`,
    without a copy."""
    return memoryview(data)[offset - start : min(len(data), stop - start)]
