"""The coalescing primitives on their own: one task per key, many readers of one file."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from mirror.inflight import FileRegion, SingleFlight, Transfer, TransferFailed, outlast
from mirror.store.fill import FileReadBack


async def test_single_flight_runs_once_and_survives_a_cancelled_caller() -> None:
    flight: SingleFlight[str, int] = SingleFlight()
    calls = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal calls
        calls += 1
        await release.wait()
        return 42

    first = asyncio.create_task(flight.run("k", work))
    others = [asyncio.create_task(flight.run("k", work)) for _ in range(5)]
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*others) == [42] * 5
    assert calls == 1
    assert "k" not in flight
    assert await flight.run("k", work) == 42 and calls == 2


async def _collect(transfer: Transfer, start: int = 0, end: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in transfer.read(start, end)])


async def test_readers_follow_the_file_and_never_see_the_last_byte_early(tmp_path: Path) -> None:
    path, final = tmp_path / "blob.part", tmp_path / "blob"
    data = bytes(range(256)) * 64
    with path.open("wb") as out:
        transfer = Transfer(FileReadBack(path))
        transfer.start(len(data))
        readers = [asyncio.create_task(_collect(transfer)) for _ in range(3)]
        ranged = asyncio.create_task(_collect(transfer, 100, 200))
        for offset in range(0, len(data), 1000):
            out.write(data[offset : offset + 1000])
            out.flush()
            transfer.advance(data[offset : offset + 1000])
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert not any(r.done() for r in readers)  # all but the last byte, until verified
        assert not ranged.done()  # a range's last byte as well
    path.rename(final)
    transfer.finish()
    assert await asyncio.gather(*readers) == [data] * 3
    assert await ranged == data[100:200]
    assert await _collect(transfer) == data  # a late reader: the file was renamed meanwhile
    final.unlink()
    assert await _collect(transfer, 5, 50) == data[5:50]  # ...or even removed


async def test_failure_reaches_every_reader(tmp_path: Path) -> None:
    path = tmp_path / "blob.part"
    path.write_bytes(b"x" * 10)
    transfer = Transfer(FileReadBack(path))
    transfer.start(100)
    transfer.advance(b"x" * 10)
    reader = asyncio.create_task(_collect(transfer))
    await asyncio.sleep(0.01)
    transfer.fail(RuntimeError("digest mismatch"))
    with pytest.raises(TransferFailed):
        await reader


async def test_spilled_bytes_come_from_memory(tmp_path: Path) -> None:
    path = tmp_path / "blob.part"
    data = bytes(range(200)) * 50
    path.write_bytes(data[:3000] + b"garbage past the last whole chunk")
    transfer = Transfer(FileReadBack(path))
    transfer.start(len(data))
    transfer.advance(data[:3000])
    early = asyncio.create_task(_collect(transfer))
    transfer.spill()  # disk full: the rest arrives in memory
    for offset in range(3000, len(data), 700):
        transfer.advance(data[offset : offset + 700])
        await asyncio.sleep(0)
    transfer.finish()
    assert await early == data
    # Once done, the removed temporary is let go of: what it held is gone for late readers,
    # what is still in the window is served.
    assert await _collect(transfer, 3500, 4000) == data[3500:4000]
    with pytest.raises(TransferFailed):
        await _collect(transfer, 2900, 4000)


async def test_readers_keeping_up_are_served_from_memory(tmp_path: Path) -> None:
    """The newest chunks are not read back from the file; older ones are. (The file's
    bytes are overwritten below to tell the two sources apart.)"""
    path = tmp_path / "blob.part"
    path.touch()
    data = bytes(range(250)) * 1200  # 300,000 bytes
    transfer = Transfer(FileReadBack(path))
    transfer.RECENT_BYTES = 100_000
    transfer.start(len(data))
    with path.open("wb") as out:
        for offset in range(0, len(data), 50_000):
            out.write(b"\0" * 50_000)  # what the file says, unlike what arrived
            out.flush()
            transfer.advance(data[offset : offset + 50_000])
    transfer.finish()
    assert await _collect(transfer, 200_000) == data[200_000:]  # the last two chunks
    assert await _collect(transfer, 150_000, 190_000) == b"\0" * 40_000  # an older one


async def test_a_reader_behind_the_writer_gets_what_is_written_as_one_file_region(
    tmp_path: Path,
) -> None:
    """What a herd behind a fill is sent by the kernel: everything written since the
    reader's last piece in one region of the file (never the unverified last byte), and
    the bytes of the region are the file's."""
    path = tmp_path / "blob.part"
    data = bytes(range(256)) * 4000  # 1,024,000 bytes
    path.write_bytes(data[:600_000])
    transfer = Transfer(FileReadBack(path))
    transfer.start(len(data))
    for offset in range(0, 600_000, 100_000):
        transfer.advance(data[offset : offset + 100_000])
    pieces = transfer.pieces()
    first = await anext(pieces)
    assert isinstance(first, FileRegion)
    assert (first.offset, first.count) == (0, 599_999)  # the last byte waits for the end
    assert os.pread(first.fd, first.count, first.offset) == data[:599_999]
    with path.open("ab") as out:
        out.write(data[600_000:])
    transfer.advance(data[600_000:])
    second = await anext(pieces)
    assert isinstance(second, FileRegion)
    assert (second.offset, second.count) == (599_999, len(data) - 600_000)
    transfer.finish()
    last = await anext(pieces)
    assert isinstance(last, FileRegion) and (last.offset, last.count) == (len(data) - 1, 1)
    with pytest.raises(StopAsyncIteration):
        await anext(pieces)


async def test_outlast_waits_for_the_thread_before_raising_the_cancellation() -> None:
    """A fill stopped while a thread commits its file must not remove the file (or close
    the store) under that thread."""
    release = threading.Event()
    finished: list[str] = []

    def commit() -> bool:
        release.wait(10)
        finished.append("committed")
        return True

    waiter = asyncio.create_task(outlast(asyncio.ensure_future(asyncio.to_thread(commit))))
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0.01)
    assert not waiter.done()  # still waiting for the thread
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert finished == ["committed"]


async def test_a_reader_joining_after_the_window_moved_past_the_spill_is_turned_away(
    tmp_path: Path,
) -> None:
    """A full disk at byte 3,000: a client arriving once the memory window has moved past
    that point could be given neither the spilled bytes nor the rest; it gets a transfer
    of its own instead of a cut answer."""
    path = tmp_path / "blob.part"
    path.write_bytes(b"a" * 3000)
    transfer = Transfer(FileReadBack(path))
    transfer.SPILL_WINDOW = 1000
    transfer.start(10_000)
    transfer.advance(b"a" * 3000)
    transfer.spill()
    transfer.advance(b"b" * 500)
    assert transfer.serves_from(0)  # the window still holds byte 3,000 on
    transfer.advance(b"b" * 2000)
    assert not transfer.serves_from(0)
    assert not transfer.serves_from(3000)
    assert transfer.serves_from(4600)
