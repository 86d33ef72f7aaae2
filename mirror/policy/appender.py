"""A fill's bytes written to its temporary in a thread, a batch at a time, while the loop
reads the next ones from the upstream.

Writing to the page cache stalls when the kernel throttles dirty pages (a busy disk, a
large blob) and hashing is CPU work; on the loop either stalls every client of the
process. One batch is in the thread at a time, so bytes stay in order; what arrives
meanwhile waits, up to a bound past which reading from the upstream waits too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass

from ..inflight import Transfer, outlast
from ..reference import Digest
from ..store.base import BlobStore, TempBlob

log = logging.getLogger("mirror.proxy")

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write refused for want of space
MAX_PENDING = 2 * 1024 * 1024  # bytes waiting for the thread before reading waits too


@dataclass
class Stop:
    """Where, in a batch, the store stopped keeping the blob, and why."""

    index: int
    why: str
    error: OSError | None = None


class Appender:
    """Appends one fill's chunks to its temporary, then hands them to its readers."""

    def __init__(
        self, store: BlobStore, temp: TempBlob, transfer: Transfer, digest: Digest
    ) -> None:
        self._store = store
        self._temp = temp
        self._transfer = transfer
        self._digest = digest
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writing: asyncio.Task[None] | None = None

    async def add(self, chunk: bytes) -> None:
        """Queue `chunk`; waits only when the thread is that far behind."""
        if self._temp.spilled:
            # Nothing is kept any more: the chunk is only hashed, and readers need it now.
            await self.flush()
            self._temp.write(chunk)
            self._transfer.advance(chunk)
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        writing = self._writing
        if writing is not None and not writing.done():
            if self._pending_bytes < MAX_PENDING:
                return
            await writing
        elif writing is not None:
            writing.result()  # a failed write stops the fill here
        self._writing = asyncio.ensure_future(self._write_pending())

    async def flush(self) -> None:
        """Everything queued is written and handed to the readers."""
        if self._writing is not None:
            await self._writing
            self._writing = None
        if self._pending:
            await self._write_pending()

    async def settle(self) -> None:
        """Wait for the thread to be done with the file (before anything removes or
        closes it), however this fill ends."""
        if self._writing is not None:
            with contextlib.suppress(Exception):  # the fill is failing for its own reason
                await outlast(self._writing)

    async def _write_pending(self) -> None:
        chunks, self._pending, self._pending_bytes = self._pending, [], 0
        stop = await asyncio.to_thread(_append, self._temp, chunks, self._store.max_size)
        for index, chunk in enumerate(chunks):
            if stop is not None and index == stop.index:
                if stop.error is not None:
                    self._store.counters.write_failed(f"writing {self._digest}", stop.error)
                log.warning("streaming %s through without keeping it: %s", self._digest, stop.why)
                self._transfer.spill()
            self._transfer.advance(chunk)


def _append(temp: TempBlob, chunks: list[bytes], max_size: int) -> Stop | None:
    """Write `chunks` to `temp` (blocking); where the store cannot take one (over its
    bound, or the disk is full), stop keeping: the rest is only hashed."""
    stop = None
    for index, chunk in enumerate(chunks):
        if not temp.spilled and temp.written + len(chunk) > max_size:
            temp.spill()
            stop = Stop(index, "over the store's bound")
        try:
            temp.write(chunk)
        except OSError as exc:
            if exc.errno not in FULL:
                raise
            stop = Stop(index, f"the disk is full at byte {temp.written}", exc)
            temp.spill()
            temp.write(chunk)  # once spilled only the hash takes it
    return stop
