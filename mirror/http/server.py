"""The app on a TCP port: each connection starts on the fast path and is handed to aiohttp,
for good, at its first request the fast path declines.

A connection on the fast path has no request in progress between two reads: each request
whose head is complete is answered at once, in order, so handing the rest of the bytes to
aiohttp at the first declined one keeps answers in the order of the requests (pipelined
ones too).
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections.abc import Callable
from typing import cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .fastpath import FAST_ANSWERS, FastAnswers

HEAD_LIMIT = 8192  # bytes of a request head the fast path waits for before it declines
KEEPALIVE = 75.0  # seconds an idle connection is kept open (aiohttp's default too)
REQUESTS = (b"GET ", b"HEAD ")  # the only starts the fast path answers
BARE_LF = re.compile(rb"(?<!\r)\n")
FLUSH_CHECK = 0.05  # seconds between looks, at a stop, for requests and answers still going
# What aiohttp's own stop gives a handler still running once the shutdown wait is over:
# it waits that long, tells the request it is cancelled, waits that long again, then
# cancels the handler. (Given the whole shutdown wait, it would take twice that.)
STRAGGLER_WAIT = 1.0


class FastConnection(asyncio.Protocol):
    """One client connection while the fast path answers it."""

    def __init__(
        self,
        answers: FastAnswers,
        aiohttp_protocol: Callable[[], asyncio.Protocol],
        open_connections: set[FastConnection],
    ) -> None:
        self._answers = answers
        self._aiohttp_protocol = aiohttp_protocol
        self._open = open_connections
        self._transport: asyncio.Transport | None = None
        self._remote: str | None = None
        self._pending = b""  # the start of a request head not complete yet
        self._last_read = 0.0
        self._idle: asyncio.TimerHandle | None = None
        self._writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but are ones)
        self._transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._remote = peer[0] if isinstance(peer, tuple) else None
        self._open.add(self)
        loop = asyncio.get_running_loop()
        self._last_read = loop.time()
        self._idle = loop.call_at(self._last_read + KEEPALIVE, self._close_when_idle)

    def data_received(self, data: bytes) -> None:
        self._pending = self._pending + data if self._pending else data
        self._last_read = asyncio.get_running_loop().time()
        self._answer()

    def _answer(self) -> None:
        """Answer the complete requests pending, in order, while the client takes the
        answers; the first one declined, and everything after it, go to aiohttp."""
        transport = self._transport
        assert transport is not None
        pending, start = self._pending, 0
        while start < len(pending) and not self._writing_paused:
            if len(pending) - start >= 5 and not pending.startswith(REQUESTS, start):
                self._hand_over(pending[start:])
                return
            end = pending.find(b"\r\n\r\n", start)
            if end < 0 or end - start > HEAD_LIMIT:
                # A head too long, or with a bare LF (it may have ended already, for a
                # reader that takes LF alone as a line end): aiohttp's to judge.
                if len(pending) - start > HEAD_LIMIT or BARE_LF.search(pending, start):
                    self._hand_over(pending[start:])
                    return
                break
            answered = self._answers.answer(pending[start:end], self._remote)
            if answered is None:
                self._hand_over(pending[start:])
                return
            response, close = answered
            transport.write(response)
            start = end + 4
            if close:
                transport.close()
                start = len(pending)
        self._pending = pending[start:] if start else pending

    def eof_received(self) -> bool:
        return False  # the client is done: so is the connection

    def pause_writing(self) -> None:
        # A client that sends requests and does not read the answers is not read either,
        # and what it sent is answered once it reads: what is held here stays bounded.
        self._writing_paused = True
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()
            self._answer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave()

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    def close(self) -> None:
        """At stop: no request is ever in progress here, so the connection just closes
        (after what was written to it: `Serving.stop` waits for that)."""
        if self._transport is not None:
            self._transport.close()

    def _hand_over(self, data: bytes) -> None:
        """aiohttp serves the connection from here on, starting with `data`."""
        transport = self._transport
        assert transport is not None
        self._leave()
        protocol = self._aiohttp_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        protocol.data_received(data)

    def _leave(self) -> None:
        self._open.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _close_when_idle(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._last_read + KEEPALIVE
        if loop.time() >= due:
            self._idle = None
            self.close()
        else:
            self._idle = loop.call_at(due, self._close_when_idle)


class Handling:
    """How many requests aiohttp's handlers are serving: what a stop waits for first."""

    def __init__(self) -> None:
        self.requests = 0

    def middleware(self) -> Middleware:
        @web.middleware
        async def handling(request: web.Request, handler: Handler) -> web.StreamResponse:
            self.requests += 1
            try:
                return await handler(request)
            finally:
                self.requests -= 1

        return handling


class Serving:
    """`app` listening on a TCP port, with the fast path when the app has one
    (`FAST_ANSWERS`)."""

    def __init__(
        self,
        runner: web.AppRunner,
        server: asyncio.Server,
        fast: set[FastConnection],
        handling: Handling,
        shutdown_timeout: float,
    ) -> None:
        self._runner = runner
        self._server = server
        self._fast = fast
        self._handling = handling
        self._shutdown_timeout = shutdown_timeout

    @classmethod
    async def start(
        cls,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
        shutdown_timeout: float = 60.0,
    ) -> Serving:
        handling = Handling()
        app.middlewares.insert(0, handling.middleware())  # around everything the app does
        runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=KEEPALIVE, shutdown_timeout=STRAGGLER_WAIT
        )
        await runner.setup()
        aiohttp_protocol = runner.server
        assert aiohttp_protocol is not None
        fast: set[FastConnection] = set()
        protocol: Callable[[], asyncio.Protocol] = aiohttp_protocol
        answers = app.get(FAST_ANSWERS)
        if answers is not None:

            def protocol() -> asyncio.Protocol:
                return FastConnection(answers, aiohttp_protocol, fast)

        try:
            server = await asyncio.get_running_loop().create_server(
                protocol, host, port, ssl=ssl_context, reuse_port=reuse_port, backlog=128
            )
        except BaseException:
            await runner.cleanup()
            raise
        return cls(runner, server, fast, handling, shutdown_timeout)

    @property
    def port(self) -> int:
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def app(self) -> web.Application:
        return self._runner.app

    async def stop(self) -> None:
        """No new connections, nor new requests on the open ones; requests in progress
        given the shutdown timeout; then the app's clean-up. Answers already written but
        still held here for a slow reader (a 4 MiB manifest answered at once, the tail of
        any answer) are given until the same deadline to leave: the process ending would
        cut them. Whatever is still going at the deadline is cut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shutdown_timeout
        self._server.close()
        transports = [c.transport for c in self._fast] + [
            handler.transport for handler in self._aiohttp_connections()
        ]
        for connection in list(self._fast):
            connection.close()
        if self._runner.server is not None:
            self._runner.server.pre_shutdown()  # idle ones close; busy ones after this request
        await _until(lambda: not self._handling.requests, deadline)
        await self._runner.cleanup()
        held = [t for t in transports if t is not None]
        if not await _until(lambda: not any(t.get_write_buffer_size() for t in held), deadline):
            for transport in held:  # a client that stopped reading for good
                if transport.get_write_buffer_size():
                    transport.abort()

    def _aiohttp_connections(self) -> list[web.RequestHandler]:
        server = self._runner.server
        return server.connections if server is not None else []


async def _until(condition: Callable[[], bool], deadline: float) -> bool:
    """Whether `condition` came to hold before `deadline` (the loop's clock), looking every
    FLUSH_CHECK seconds: at a stop, nothing tells when a request or a write ends."""
    loop = asyncio.get_running_loop()
    while not condition():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(FLUSH_CHECK)
    return True
