"""The later parts of a large blob fetched ahead, each on a connection of its own, while
the fill reads the blob in order.

A CDN caps each connection (tens of MB/s), and clients unpack layers in order: a layer
fetched over one connection takes its whole length at that rate before the client can
start on it. When the upstream has free transfer slots, a fill of a large blob asks for
its later ranges at once (Range requests), each into a spool file beside the temporary;
the fill itself reads the first range from the upstream, then each spool in turn. The
blob is still written to its temporary in order and verified whole, so followers and the
digest check see nothing different; a range that fails is fetched again in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import Counter

from ..inflight import Transfer, TransferFailed
from ..reference import Digest
from ..store.fill import FileReadBack
from ..upstream.client import Upstream

log = logging.getLogger("mirror.proxy")

SEGMENT_MIN = 8 * 1024 * 1024  # no range is smaller than this
SAMPLE_SECONDS = 0.1  # how long the fill's own stream runs before its speed is judged
WORTH_SECONDS = 1.0  # ranges only when the own stream would need longer than this
MOST_SEGMENTS = 4  # connections for one blob, the fill's own included


@dataclass
class Ahead:
    """One range [start, end) being fetched into its spool file."""

    start: int
    end: int
    path: Path
    transfer: Transfer
    task: asyncio.Task[None] | None = None


class Segments:
    """The ranges of one fill fetched ahead of it."""

    def __init__(
        self,
        upstream: Upstream,
        repository: str,
        digest: Digest,
        beside: Path | None,
        deadline: float,
        fetched: Counter,
        connections: int,
    ) -> None:
        self._upstream = upstream
        self._repository = repository
        self._digest = digest
        self._beside = beside  # the fill's temporary: spools go next to it
        self._deadline = deadline
        self._fetched = fetched
        self._connections = min(connections, MOST_SEGMENTS)
        self._ahead: list[Ahead] = []  # in order: each begins where the one before ends
        self._made = 0
        self._allowed = False  # the upstream said it takes ranges (Accept-Ranges: bytes)

    def allow(self) -> None:
        self._allowed = True

    def could_split(self, position: int, stop: int, began: float) -> bool:
        """Whether `split` would start a range now, having read `position` bytes since
        `began` (monotonic, its first byte): only when, judged over SAMPLE_SECONDS at
        least, the rest would take the stream itself more than WORTH_SECONDS (near the
        upstream, one connection is fastest: ranges would only add the spools' writes).
        Asked at every chunk: what rules a split out for good is looked at first."""
        if not (
            self._allowed
            and self._connections > 1
            and self._beside is not None
            and stop - position >= 2 * SEGMENT_MIN
        ):
            return False
        seconds = time.monotonic() - began
        return (
            seconds >= SAMPLE_SECONDS
            and (stop - position) * seconds > WORTH_SECONDS * position
            and not self._upstream.transfer_slots.locked()
            and self._running() + 1 < self._connections
        )

    async def split(self, position: int, stop: int, began: float) -> int:
        """Fetch the later part of what the fill's own stream still has to read, [position,
        stop), on the upstream's free transfer slots; where the stream should stop now.

        Asked when the size is known, and again whenever a slot frees (another transfer
        ended): a fill that began alone gains connections as others finish."""
        if not self.could_split(position, stop, began):
            return stop
        assert self._beside is not None
        slots = self._upstream.transfer_slots
        parts = 1
        most = min(self._connections - self._running(), (stop - position) // SEGMENT_MIN)
        while parts < most and not slots.locked():
            await slots.acquire()  # free: returns at once
            parts += 1
        bounds = [position + (stop - position) * k // parts for k in range(parts + 1)]
        started: list[Ahead] = []
        for number in range(1, parts):
            self._made += 1
            name = f"{self._beside.name}.range{self._made}.{os.getpid()}.tmp"
            path = self._beside.with_name(name)
            ahead = Ahead(bounds[number], bounds[number + 1], path, Transfer(None))
            started.append(ahead)
            try:
                fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o644)
                try:
                    ahead.transfer = Transfer(FileReadBack(path))
                    # the fill reads a range later, from its spool: no copy kept in memory
                    ahead.transfer.RECENT_BYTES = 0
                except BaseException:
                    os.close(fd)
                    raise
            except OSError as exc:  # (a full disk): this range comes in order instead
                ahead.transfer.fail(exc)
                slots.release()
                continue
            ahead.transfer.start(ahead.end - ahead.start)
            ahead.task = asyncio.create_task(self._fetch(ahead, fd))
        self._ahead[:0] = started  # before the ranges already ahead: they begin at `stop`
        return bounds[1]

    def _running(self) -> int:
        return sum(1 for ahead in self._ahead if ahead.task is not None and not ahead.task.done())

    async def rest(self) -> AsyncIterator[bytes | memoryview]:
        """The bytes of every range, in order, from its spool as it fills. Once a range
        fails, the rest of the blob is read in order from the upstream instead (resumed
        and checked as any transfer is), and the ranges after it are let go."""
        for index, ahead in enumerate(self._ahead):
            got = 0
            try:
                async for data in ahead.transfer.read():
                    got += len(data)
                    yield data
            except TransferFailed as exc:
                log.info("range of %s failed (%s): reading the rest in order", self._digest, exc)
                await self._stop(self._ahead[index:])
                async for chunk in self._upstream.blob_chunks(
                    self._repository,
                    self._digest,
                    deadline=self._deadline,
                    started=lambda size, ranges: None,
                    offset=ahead.start + got,
                ):
                    self._fetched.inc(len(chunk))
                    yield chunk
                return
            self._let_go(ahead)

    async def _stop(self, aheads: list[Ahead]) -> None:
        tasks = [ahead.task for ahead in aheads if ahead.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ahead in aheads:
            self._let_go(ahead)

    @staticmethod
    def _let_go(ahead: Ahead) -> None:
        ahead.transfer.not_kept()  # its spool goes as soon as nobody reads it
        with contextlib.suppress(FileNotFoundError):
            ahead.path.unlink()

    async def close(self) -> None:
        """Stop what is still running and remove the spools."""
        await self._stop(self._ahead)

    async def _fetch(self, ahead: Ahead, fd: int) -> None:
        slots = self._upstream.transfer_slots
        try:
            async for chunk in self._upstream.range_chunks(
                self._repository, self._digest, ahead.start, ahead.end, deadline=self._deadline
            ):
                self._fetched.inc(len(chunk))
                view = memoryview(chunk)
                while view:  # to the page cache, as the fill's own bytes are
                    view = view[os.write(fd, view) :]
                ahead.transfer.advance(chunk)
            ahead.transfer.finish()
        except asyncio.CancelledError:
            ahead.transfer.fail(TransferFailed("stopped"))
            raise
        except Exception as exc:  # the fill fetches this range in order instead
            ahead.transfer.fail(exc)
        finally:
            os.close(fd)
            slots.release()
