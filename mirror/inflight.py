"""Coalescing: one piece of work per key, however many callers; one file, many readers.

Generic on purpose: nothing here knows about registries. `SingleFlight` shares the result of
one coroutine among concurrent callers; `Transfer` lets many readers follow a file while
one writer fills it, each reader getting bytes as they land.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

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


class TransferFailed(Exception):
    """The writer gave up; readers must abort what they were sending."""


class Transfer:
    """A file being written by one task and read, as it grows, by many.

    Until the writer calls `finish` (after verifying the content), readers never see the
    last byte: a body that turns out wrong can never reach a client complete.
    """

    def __init__(self, path: Path, final_path: Path) -> None:
        self.path = path
        self.final_path = final_path
        self.size: int | None = None  # total length, once the writer knows it
        self.written = 0
        self.complete = False
        self.error: BaseException | None = None
        self.readers = 0
        self._started = asyncio.Event()
        self._changed = asyncio.Event()

    # the writer's side

    def start(self, size: int | None) -> None:
        self.size = size
        self._started.set()

    def advance(self, count: int) -> None:
        self.written += count
        self._notify()

    def finish(self) -> None:
        self.complete = True
        self._started.set()
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._started.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # the readers' side

    async def wait_started(self) -> None:
        """Wait until the size is known (or the transfer failed, which raises)."""
        await self._started.wait()
        if self.error is not None and not self.complete:
            raise self.error

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return os.open(self.final_path, os.O_RDONLY)  # finished and renamed meanwhile

    async def read(self, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) as the writer provides them; raises TransferFailed on failure."""
        self.readers += 1
        fd = self._open()
        try:
            offset = start
            while True:
                stop = self.written if self.complete else self.written - 1
                if end is not None:
                    stop = min(stop, end)
                if offset < stop:
                    data = os.pread(fd, min(READ_CHUNK, stop - offset), offset)
                    if not data:
                        raise TransferFailed("file shrank under a reader")
                    offset += len(data)
                    yield data
                    continue
                if self.complete or (end is not None and offset >= end):
                    return
                if self.error is not None:
                    raise TransferFailed(str(self.error)) from self.error
                await self._changed.wait()
        finally:
            os.close(fd)
            self.readers -= 1
