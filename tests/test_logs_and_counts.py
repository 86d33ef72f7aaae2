"""What the mirror writes down is true: log lines nobody can forge, one line per malformed
request, bytes counted as sent (not as promised), a status tally junk cannot freeze."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mirror.tally import BUCKET_SECONDS, MAX_NAMES, WINDOW_SECONDS, RecentTally
from tests.conftest import Seeded
from tests.support.process import MirrorProcess
from tests.support.registry import Registry


async def _serve(tmp_path: Path, upstream: Registry, **settings: object) -> MirrorProcess:
    return await MirrorProcess(
        tmp_path,
        {
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": upstream.url}},
            **settings,
        },
    ).start()


def _raw(host: str, request: bytes) -> bytes:
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass  # the server closed with our bytes unread: the kernel resets
        return answer


async def test_control_characters_in_a_path_cannot_forge_log_lines(
    tmp_path: Path, upstream: Registry
) -> None:
    mirror = await _serve(tmp_path, upstream)
    forged = '/v2/x%0a2026-12-02 06:00:00,000 [1] INFO mirror.access: 10.0.0.1 "GET /v2/"%1b[31m'
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{mirror.url}{forged}/manifests/1") as response,
        ):
            assert response.status in (400, 404)
    finally:
        await mirror.stop()
    lines = mirror.log.read_text().splitlines()
    access = [line for line in lines if "mirror.access" in line and "/manifests/1" in line]
    assert len(access) == 1
    assert "\\n2026-12-02" in access[0] and "\\x1b[31m" in access[0]
    assert not any(line.startswith("2026-12-02 06:00:00,000") for line in lines)


async def test_a_malformed_request_is_one_log_line(tmp_path: Path, upstream: Registry) -> None:
    mirror = await _serve(tmp_path, upstream)
    try:
        long_header = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n"
        for _ in range(20):
            answer = await asyncio.to_thread(_raw, mirror.host, long_header)
            assert answer == b"" or answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4"))
    finally:
        await mirror.stop()
    text = mirror.log.read_text()
    assert "Traceback" not in text
    malformed = [line for line in text.splitlines() if "malformed request" in line]
    assert len(malformed) == 20
    assert all(len(line) < 1200 for line in malformed)  # not the 20 KB header


def _served(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "mirror_served_bytes_total":
                return sum(s.value for s in family.samples if s.name == "mirror_served_bytes_total")
    return 0.0


async def test_served_bytes_count_what_clients_were_sent(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    """A client that reads 1 MiB of a 100 MB hit and leaves is counted for what was sent,
    and its access line says the answer was incomplete."""
    mirror = await _serve(tmp_path, upstream)
    layer = seeded.big.layers[0]
    url = f"{mirror.url}/v2/big/layer/blobs/{layer}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(url) as response:
                await response.read()  # cached now
            async with http.get(f"{mirror.url}/metrics") as response:
                before = _served(await response.text())
            host, port = mirror.host.split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            path = url.removeprefix(mirror.url)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {mirror.host}\r\n\r\n".encode())
            await reader.readexactly(1024 * 1024)
            writer.transport.abort()
            await asyncio.sleep(1)
            async with http.get(f"{mirror.url}/metrics") as response:
                after = _served(await response.text())
    finally:
        await mirror.stop()
    assert 1024 * 1024 <= after - before < 20 * 1024 * 1024  # not the 100 MB promised
    lines = [line for line in mirror.log.read_text().splitlines() if "mirror.access" in line]
    assert sum(line.endswith("incomplete") for line in lines) == 1


def test_the_status_tally_keeps_the_most_requested_despite_junk() -> None:
    now = [0.0]
    tally = RecentTally(clock=lambda: now[0])
    for _ in range(50):
        tally.count("docker.io/library/alpine")
    for number in range(MAX_NAMES * 5):  # junk names, each asked once
        tally.count(f"docker.io/junk/{number}")
    tally.count("docker.io/library/new-and-busy")
    for _ in range(30):
        tally.count("docker.io/library/new-and-busy")
    top = dict(tally.most_common(2))
    assert top == {"docker.io/library/alpine": 50, "docker.io/library/new-and-busy": 31}
    now[0] += BUCKET_SECONDS
    tally.count("docker.io/library/later")
    assert dict(tally.most_common(3))["docker.io/library/alpine"] == 50
    now[0] += WINDOW_SECONDS  # the window slid past everything but the newest bucket
    tally.count("docker.io/library/latest")
    assert tally.most_common(5) == [("docker.io/library/latest", 1)]
