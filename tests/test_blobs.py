"""Blob misses: one upstream transfer per digest, streamed to every waiting client; hits by
sendfile with Range; wrong bytes never kept nor delivered whole."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import time
from typing import Any

import aiohttp
import pytest

from tests.conftest import BIG_LAYER, Mirror, MirrorFactory, RelayFactory, Seeded
from tests.support.registry import Registry
from tests.support.tokens import TokenServer
from tests.support.waiting import until


def _big_blob(seeded: Seeded) -> tuple[str, bytes]:
    digest = seeded.big.layers[0]
    return digest, seeded.big.blobs[digest]


async def _fetch(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    """GET a URL, noting when the first and last bytes arrived and the body's sha256."""
    hasher = hashlib.sha256()
    size = 0
    first = None
    async with session.get(url) as response:
        status = response.status
        async for chunk in response.content.iter_any():
            if first is None:
                first = time.monotonic()
            hasher.update(chunk)
            size += len(chunk)
    return {
        "status": status,
        "sha256": "sha256:" + hasher.hexdigest(),
        "size": size,
        "first": first,
        "done": time.monotonic(),
    }


@pytest.mark.slow
async def test_sixteen_clients_one_upstream_transfer_streamed_to_all(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
) -> None:
    relay = await make_relay(upstream.url, rate=50 * 1024 * 1024)  # ~2 s for 100 MB
    # one connection: this is about clients sharing a transfer (ranges: test_ranges.py)
    mirror = await make_mirror({"docker.io": {"url": relay.url, "range_connections": 1}})
    digest, data = _big_blob(seeded)
    mark = upstream.mark()
    url = f"{mirror.url}/v2/big/layer/blobs/{digest}"
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(_fetch(session, url) for _ in range(16)))
    elapsed = time.monotonic() - started
    for result in results:
        assert result["status"] == 200
        assert result["size"] == len(data) > BIG_LAYER  # the whole gzip'd tar of 100 MB
        assert result["sha256"] == digest
    # every client had bytes before any client had the whole blob: streamed, not stored first
    assert max(r["first"] for r in results) < min(r["done"] for r in results)
    gets = [h for h in upstream.hits(mark) if h.method == "GET" and digest in h.path]
    assert len(gets) == 1
    assert relay.count("GET", digest) == 1
    print(f"16 clients x {len(data)} bytes through one transfer in {elapsed:.2f}s")


@pytest.mark.slow
async def test_client_hanging_up_does_not_stop_the_fill(
    make_mirror: MirrorFactory, make_relay: RelayFactory, upstream: Registry, seeded: Seeded
) -> None:
    relay = await make_relay(upstream.url, rate=100 * 1024 * 1024)
    # one connection: this is about clients sharing a transfer (ranges: test_ranges.py)
    mirror = await make_mirror({"docker.io": {"url": relay.url, "range_connections": 1}})
    digest, data = _big_blob(seeded)
    url = f"{mirror.url}/v2/big/layer/blobs/{digest}"
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        await response.content.readexactly(4 * 1024 * 1024)
        # leaving the block closes the connection mid-body
    stored = mirror.storage / "blobs" / "sha256" / digest[7:9] / digest[7:]
    for _ in range(200):
        if stored.exists():
            break
        await asyncio.sleep(0.05)
    assert stored.exists(), "the fill stopped when its client left"
    async with aiohttp.ClientSession() as session:
        result = await _fetch(session, url)
    assert result["sha256"] == digest and result["size"] == len(data)
    assert relay.count("GET", digest) == 1


async def _attempt(url: str) -> tuple[int, bytes, bool]:
    """GET url; returns (status, bytes received, whether the body was cut off)."""
    received = bytearray()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        try:
            async for chunk in response.content.iter_any():
                received += chunk
        except aiohttp.ClientPayloadError:
            return response.status, bytes(received), True
        return response.status, bytes(received), False


@pytest.mark.parametrize("big", [False, True], ids=["small-blob", "streamed-100MB"])
async def test_corrupt_upstream_blob_is_never_delivered_whole_nor_kept(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    big: bool,
) -> None:
    relay = await make_relay(upstream.url, corrupt_blobs=True, rate=200 * 1024 * 1024)
    mirror = await make_mirror({"docker.io": relay.url})
    image = seeded.big if big else seeded.oci
    digest = image.layers[0]
    data = image.blobs[digest]
    url = f"{mirror.url}/v2/{image.repository}/blobs/{digest}"
    status, received, cut = await _attempt(url)
    if status == 200:
        # the transfer had begun: the client is cut off before the last byte
        assert cut and len(received) < len(data), (cut, len(received), len(data))
    else:
        assert status == 502  # failed before the answer began: an OCI error
    if big:
        assert status == 200 and cut and len(received) >= len(data) // 2
    assert not any((mirror.storage / "blobs").rglob(digest[7:]))
    assert not any((mirror.storage / "tmp").iterdir())
    relay.faults.corrupt_blobs = False
    async with aiohttp.ClientSession() as session:
        result = await _fetch(session, url)
    assert result["sha256"] == digest


async def test_head_and_range_on_hit_and_miss(
    mirror: Mirror, upstream: Registry, seeded: Seeded
) -> None:
    digest = seeded.docker.layers[0]
    data = seeded.docker.blobs[digest]
    url = f"{mirror.url}/v2/team/app/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        async with session.head(url) as response:  # miss: asks the upstream, keeps nothing
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(data))
            assert response.headers["Docker-Content-Digest"] == digest
        async with session.get(url, headers={"Range": "bytes=10-99"}) as response:  # miss
            assert response.status == 206
            assert await response.read() == data[10:100]
            assert response.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
            assert response.headers["ETag"] == f'"{digest}"'
        mark = upstream.mark()
        async with session.head(url) as response:  # hit: answered locally
            assert response.status == 200
            assert response.headers["Content-Length"] == str(len(data))
        async with session.get(url, headers={"Range": "bytes=100-"}) as response:
            assert response.status == 206
            assert await response.read() == data[100:]
            assert response.headers["ETag"] == f'"{digest}"'  # as on the miss above
        async with session.get(url, headers={"If-None-Match": f'"{digest}"'}) as response:
            assert response.status == 304
        assert upstream.hits(mark) == []


async def test_redirect_to_another_host_drops_the_registry_authorization(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    auth_upstream: Registry,
    auth_pusher: Any,
    token_server: TokenServer,
    tmp_path: Any,
) -> None:
    image = auth_pusher.image("public/redirected", "1")
    relay = await make_relay(auth_upstream.url, redirect_blobs=True)
    relay.cdn_authorization = token_server.admin_authorization
    mirror = await make_mirror({"docker.io": relay.url})
    async with aiohttp.ClientSession() as session:
        for digest, data in image.blobs.items():
            async with session.get(f"{mirror.url}/v2/public/redirected/blobs/{digest}") as r:
                assert r.status == 200
                assert await r.read() == data
    assert len(relay.redirected_headers) == len(image.blobs)
    assert all("Authorization" not in h for h in relay.redirected_headers)
    # ...while the registry itself was sent a Bearer token
    assert relay.count("GET", "/blobs/") == len(image.blobs)


async def test_unsatisfiable_range_is_an_oci_416_on_hit_and_miss(
    mirror: Mirror, seeded: Seeded
) -> None:
    digest = seeded.docker.layers[1]
    size = len(seeded.docker.blobs[digest])
    url = f"{mirror.url}/v2/team/app/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        for _ in ("miss", "hit"):
            # past the end; and the last 0 bytes, which is no byte (RFC 9110 14.1.1)
            for wanted in (f"bytes={size + 10}-", "bytes=-0"):
                async with session.get(url, headers={"Range": wanted}) as response:
                    assert response.status == 416, wanted
                    assert response.headers["Content-Range"] == f"bytes */{size}"
                    body = await response.json()
                    assert body["errors"][0]["code"] == "RANGE_INVALID"
            async with session.get(url) as response:  # fetched, then kept
                assert await response.read() == seeded.docker.blobs[digest]
            await _until_kept(mirror, digest)


async def _until_kept(mirror: Mirror, digest: str) -> None:
    """Wait (up to 5 s, then fail) until the fill of `digest` is in the store."""
    folder = mirror.storage / "blobs"
    await until(lambda: any(folder.rglob(digest[7:])), f"{digest} is kept", seconds=5)


async def _cached_big_blob(mirror: Mirror, seeded: Seeded) -> tuple[str, bytes, str]:
    """The big blob, fetched once so it is a hit now: digest, bytes, path."""
    digest, data = _big_blob(seeded)
    path = f"/v2/big/layer/blobs/{digest}"
    async with aiohttp.ClientSession() as session:
        assert (await _fetch(session, mirror.url + path))["sha256"] == digest
    await _until_kept(mirror, digest)
    return digest, data, path


async def _slow_connection(mirror: Mirror) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw connection with a 64 KiB receive buffer: the mirror's socket fills up soon."""
    host, port = mirror.host.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), limit=1024 * 1024)
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    return reader, writer


async def _raw_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, extra: str = ""
) -> tuple[int, dict[str, str]]:
    """Send a keep-alive GET on a raw connection; return its status and headers."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: mirror\r\n{extra}\r\n".encode())
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:] if line)
    return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}


@pytest.mark.slow
async def test_big_hit_to_a_slow_reader_then_more_on_the_same_connection(
    mirror: Mirror, seeded: Seeded
) -> None:
    """A hit goes out with sendfile; a client reading slowly fills its socket (the
    mirror waits for room, then goes on), and the connection stays usable after."""
    digest, data, path = await _cached_big_blob(mirror, seeded)
    reader, writer = await _slow_connection(mirror)
    try:
        status, headers = await _raw_get(reader, writer, path)
        assert status == 200 and headers["x-mirror-cache"] == "hit"
        assert int(headers["content-length"]) == len(data)
        hasher, received = hashlib.sha256(), 0
        while received < len(data):
            chunk = await reader.read(min(256 * 1024, len(data) - received))
            assert chunk, f"connection closed after {received} bytes"
            hasher.update(chunk)
            received += len(chunk)
            if received < 4 * 1024 * 1024:
                await asyncio.sleep(0.02)  # slow at first: the mirror's socket fills up
        assert "sha256:" + hasher.hexdigest() == digest
        status, headers = await _raw_get(reader, writer, path, "Range: bytes=5-104\r\n")
        assert status == 206 and headers["content-range"] == f"bytes 5-104/{len(data)}"
        assert await reader.readexactly(100) == data[5:105]
    finally:
        writer.close()


@pytest.mark.slow
async def test_clients_hanging_up_during_a_hit_leave_no_error(
    mirror: Mirror, seeded: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that close (FIN) or reset (RST) mid-hit, with the mirror waiting on a full
    socket: nothing is logged as an error, and the next clients get the whole blob."""
    digest, data, path = await _cached_big_blob(mirror, seeded)
    for reset in (False, True, False, True):
        reader, writer = await _slow_connection(mirror)
        status, _ = await _raw_get(reader, writer, path)
        assert status == 200
        await reader.readexactly(3 * 1024 * 1024)
        if reset:
            linger = struct.pack("ii", 1, 0)
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        writer.close()
    await asyncio.sleep(0.3)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(_fetch(session, mirror.url + path) for _ in range(3)))
    assert [r["sha256"] for r in results] == [digest] * 3
    assert all(r["size"] == len(data) for r in results)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    if mirror.process is not None:
        errors += [x for x in mirror.process.log.read_text().splitlines() if " ERROR " in x]
    assert errors == []
