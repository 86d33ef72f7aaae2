"""A region of a file sent on a client connection by the kernel (os.sendfile), on any loop.

asyncio's `loop.sendfile` is native only on asyncio's own loop; uvloop has none, and aiohttp
then reads the file through a thread pool chunk by chunk, which halves the speed of a hit.
So the mirror drives os.sendfile on the connection's socket itself. When the socket is full,
one small piece goes through the transport instead, with the transport's write limit at
zero: its flush completing is the signal that the socket has room again.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

PIECE = 64 * 1024  # what goes through the transport when the socket is full, or over TLS
STRETCH = 4 * 1024 * 1024  # at most this much per sendfile call, then other requests' turn


class FileShrank(Exception):
    """The file ended before the bytes promised to the client: abort the connection."""


async def send_file(
    response: web.StreamResponse,
    writer: AbstractStreamWriter,
    transport: asyncio.Transport,
    fd: int,
    offset: int,
    count: int,
    sent: Callable[[int], None],
) -> None:
    """Send `count` bytes of `fd` from `offset` as (part of) a prepared response's body,
    telling `sent` how many bytes went as they go."""
    if transport.get_extra_info("sslcontext") is not None:
        await _copy(response, fd, offset, count, sent)  # TLS: the bytes pass through Python
        return
    sock = transport.get_extra_info("socket")
    if sock is None or transport.is_closing():
        raise ConnectionResetError("the client left")
    sock_fd = sock.fileno()
    low, high = transport.get_write_buffer_limits()
    transport.set_write_buffer_limits(high=0, low=0)
    try:
        await writer.drain()  # the headers are out before the kernel sends the body
        while count > 0:
            if transport.is_closing():
                raise ConnectionResetError("the client left")
            try:
                done = os.sendfile(sock_fd, fd, offset, min(count, STRETCH))
            except BlockingIOError:
                piece = os.pread(fd, min(PIECE, count), offset)
                if not piece:
                    raise FileShrank(f"file ended at byte {offset}") from None
                await response.write(piece)
                await writer.drain()  # returns once the socket took it all: room again
                done = len(piece)
            else:
                await asyncio.sleep(0)  # a fast client must not keep the others waiting
            if done == 0:
                raise FileShrank(f"file ended at byte {offset}")
            sent(done)
            offset += done
            count -= done
    finally:
        if not transport.is_closing():
            transport.set_write_buffer_limits(high=high, low=low)


async def _copy(
    response: web.StreamResponse, fd: int, offset: int, count: int, sent: Callable[[int], None]
) -> None:
    while count > 0:
        piece = os.pread(fd, min(PIECE * 4, count), offset)
        if not piece:
            raise FileShrank(f"file ended at byte {offset}")
        await response.write(piece)
        sent(len(piece))
        offset += len(piece)
        count -= len(piece)
