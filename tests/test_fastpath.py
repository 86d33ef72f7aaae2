"""The fast path: cached manifests answered from the raw request, before aiohttp.

What a client must not be able to tell: the answer's bytes, status and fields are the
handler's; requests on one connection are answered in order, whichever path answers
them; a request in pieces, a pipelined burst, `Connection: close` and a client that stops
reading are all served as aiohttp serves them. And it is counted and logged as any answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import subprocess
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from mirror.app import PROXY
from mirror.http import server
from mirror.http.fastpath import FAST_ANSWERS
from tests.conftest import Mirror, MirrorFactory, RelayFactory, Seeded
from tests.support.images import Image
from tests.support.registry import Registry

pytestmark = pytest.mark.in_process  # looks at which path answered


def _request(method: str, path: str, *fields: str) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: mirror", *fields]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


async def _response(reader: asyncio.StreamReader, method: str) -> tuple[str, dict[str, str], bytes]:
    """One response off the connection: status line, fields (lowercased names), body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status, *lines = head.decode().split("\r\n")[:-2]
    fields = {}
    for line in lines:
        name, _, value = line.partition(":")
        fields[name.lower()] = value.strip()
    length = 0 if method == "HEAD" else int(fields.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 10)
    return status, fields, body


def _serialized(response: tuple[str, dict[str, str], bytes]) -> bytes:
    """The response's length on the wire (field names as the mirror spells them aside)."""
    status, fields, body = response
    lines = [status, *(f"{name}: {value}" for name, value in fields.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _spy(mirror: Mirror) -> list[bool]:
    """Whether each request the fast path looked at was answered by it."""
    answers = mirror.app[FAST_ANSWERS]
    seen: list[bool] = []
    look = answers.answer

    def answer(head: bytes, remote: str | None) -> tuple[bytes, bool] | None:
        answered = look(head, remote)
        seen.append(answered is not None)
        return answered

    answers.answer = answer  # type: ignore[method-assign]
    return seen


async def _warm(mirror: Mirror, path: str, accept: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(mirror.url + path, headers={"Accept": accept}) as response,
    ):
        assert response.status == 200, await response.text()
        await response.read()


async def _warmed(mirror: Mirror, image: Image) -> str:
    """The image's tag, known to the mirror and trusted: its path."""
    by_tag = f"/v2/{image.repository}/manifests/{image.reference}"
    await _warm(mirror, by_tag, image.media_type)
    return by_tag


async def _connect(mirror: Mirror) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = mirror.host.split(":")
    return await asyncio.open_connection(host, int(port))


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_answers_are_the_handlers_byte_for_byte(
    mirror: Mirror, seeded: Seeded, method: str
) -> None:
    image = seeded.oci
    by_tag = f"/v2/{image.repository}/manifests/{image.reference}"
    by_digest = f"/v2/{image.repository}/manifests/{image.digest}"
    accept = f"Accept: {image.media_type}"
    await _warm(mirror, by_tag, image.media_type)
    seen = _spy(mirror)
    # A fresh connection: the fast path answers. One whose first request it declined
    # (the API check with a query) is aiohttp's from there on.
    fast_reader, fast_writer = await _connect(mirror)
    slow_reader, slow_writer = await _connect(mirror)
    try:
        slow_writer.write(_request("GET", "/v2/?slow"))
        assert (await _response(slow_reader, "GET"))[0] == "HTTP/1.1 200 OK"
        for path in (by_tag, by_digest):
            fast_writer.write(_request(method, path, accept, "User-Agent: test"))
            slow_writer.write(_request(method, path, accept, "User-Agent: test"))
            fast = await _response(fast_reader, method)
            slow = await _response(slow_reader, method)
            fast[1].pop("date"), slow[1].pop("date")
            assert fast == slow
            assert fast[0] == "HTTP/1.1 200 OK"
            assert fast[1]["docker-content-digest"] == image.digest
            assert fast[1]["content-length"] == str(len(image.manifest))
            assert fast[1]["content-type"] == image.media_type
            assert fast[1]["x-mirror-cache"] == "hit"
            assert fast[2] == (b"" if method == "HEAD" else image.manifest)
    finally:
        fast_writer.close()
        slow_writer.close()
    assert seen == [False, True, True]  # /v2/?slow declined; the slow connection's never looked at


async def test_the_api_check_is_answered_fast_and_the_manifests_after_it_too(
    mirror: Mirror, seeded: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    """dockerd and podman open each connection with `GET /v2/`: answered here as the
    handler answers it, counted and logged, so the manifests asked next on the connection
    are the fast path's too."""
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    seen = _spy(mirror)
    fast_reader, fast_writer = await _connect(mirror)
    slow_reader, slow_writer = await _connect(mirror)
    try:
        with caplog.at_level(logging.INFO, logger="mirror.access"):
            for method in ("GET", "HEAD"):
                fast_writer.write(_request(method, "/v2/", "User-Agent: docker/20.10"))
                slow_writer.write(_request(method, "/v2/?slow", "User-Agent: docker/20.10"))
                fast = await _response(fast_reader, method)
                slow = await _response(slow_reader, method)
                fast[1].pop("date"), slow[1].pop("date")
                assert fast == slow
                assert fast[0] == "HTTP/1.1 200 OK"
                assert fast[1]["docker-distribution-api-version"] == "registry/2.0"
                assert fast[2] == (b"" if method == "HEAD" else b"{}")
            fast_writer.write(_request("GET", by_tag, f"Accept: {image.media_type}"))
            assert (await _response(fast_reader, "GET"))[2] == image.manifest
            fast_writer.write(_request("GET", "/v2/", "Connection: close"))
            closing = await _response(fast_reader, "GET")
            assert closing[1]["connection"] == "close" and closing[2] == b"{}"
            assert await asyncio.wait_for(fast_reader.read(), 10) == b""  # then closed
            # aiohttp closes after Proxy-Connection: close too: its to answer
            slow_writer.write(_request("GET", "/v2/", "Proxy-Connection: close"))
            closing = await _response(slow_reader, "GET")
            assert closing[1]["connection"] == "close" and closing[2] == b"{}"
            assert await asyncio.wait_for(slow_reader.read(), 10) == b""
            proxied_reader, proxied_writer = await _connect(mirror)
            proxied_writer.write(_request("GET", "/v2/", "Proxy-Connection: close"))
            proxied = await _response(proxied_reader, "GET")
            proxied[1].pop("date"), closing[1].pop("date")
            assert proxied == closing
            assert await asyncio.wait_for(proxied_reader.read(), 10) == b""
            proxied_writer.close()
    finally:
        fast_writer.close()
        slow_writer.close()
    # the slow connection's first declined; Proxy-Connection declined
    assert seen == [True, False, True, True, True, False]
    lines = [r.getMessage() for r in caplog.records if r.name == "mirror.access"]
    pings = [line for line in lines if '"GET /v2/"' in line or '"HEAD /v2/"' in line]
    # each path's line alike (aiohttp's leaves out the query), then the closing ones
    assert len(pings) == 7 and all(" 200 " in line and " ping -" in line for line in pings)
    async with aiohttp.ClientSession() as http, http.get(mirror.url + "/metrics") as response:
        text = await response.text()
    wanted = 'mirror_requests_total{kind="other",method="HEAD",result="ping",status="2xx"}'
    assert any(line.startswith(wanted) for line in text.splitlines()), text[:2000]


async def test_pipelined_requests_are_answered_in_order_across_both_paths(
    mirror: Mirror, seeded: Seeded
) -> None:
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    config = next(iter(image.blobs))
    seen = _spy(mirror)
    reader, writer = await _connect(mirror)
    accept = f"Accept: {image.media_type}"
    burst = [
        ("GET", by_tag),  # fast
        ("HEAD", by_tag),  # fast
        ("GET", f"/v2/{image.repository}/blobs/{config}"),  # aiohttp, and so on after it
        ("GET", by_tag),
        ("GET", f"/v2/{image.repository}/manifests/nosuchtag"),
        ("HEAD", by_tag),
    ]
    writer.write(b"".join(_request(method, path, accept) for method, path in burst))
    try:
        answers = [await _response(reader, method) for method, _ in burst]
    finally:
        writer.close()
    statuses = [status.split()[1] for status, _, _ in answers]
    assert statuses == ["200", "200", "200", "200", "404", "200"]
    assert answers[0][2] == answers[3][2] == image.manifest
    assert hashlib.sha256(answers[2][2]).hexdigest() == config.split(":")[1]
    assert answers[1][1]["content-length"] == answers[5][1]["content-length"]
    assert seen == [True, True, False]


async def test_a_request_in_pieces_is_answered(mirror: Mirror, seeded: Seeded) -> None:
    image = seeded.docker
    by_tag = await _warmed(mirror, image)
    seen = _spy(mirror)
    reader, writer = await _connect(mirror)
    try:
        for _ in range(2):
            for byte in _request("GET", by_tag, f"Accept: {image.media_type}"):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0)
            status, _, body = await _response(reader, "GET")
            assert status == "HTTP/1.1 200 OK"
            assert body == image.manifest
    finally:
        writer.close()
    assert seen == [True, True]


async def test_connection_close_is_honoured(mirror: Mirror, seeded: Seeded) -> None:
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    seen = _spy(mirror)
    reader, writer = await _connect(mirror)
    writer.write(_request("GET", by_tag, f"Accept: {image.media_type}", "Connection: close"))
    try:
        status, fields, body = await _response(reader, "GET")
        assert (status, fields["connection"], body) == ("HTTP/1.1 200 OK", "close", image.manifest)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the mirror
    finally:
        writer.close()
    assert seen == [True]


async def test_what_memory_cannot_answer_goes_to_aiohttp(
    make_mirror: MirrorFactory, make_relay: RelayFactory, upstream: Registry, seeded: Seeded
) -> None:
    """A tag not known, known but of a type the client does not take, a conditional
    request, HTTP/1.0, a query: answered as before (by aiohttp), the upstream asked where
    it has to be."""
    relay = await make_relay(upstream.url)
    mirror = await make_mirror({"docker.io": relay.url})
    image = seeded.docker
    by_tag = f"/v2/{image.repository}/manifests/{image.reference}"
    seen = _spy(mirror)
    accept = f"Accept: {image.media_type}"

    def manifest(status: str, body: bytes) -> bool:
        return body == image.manifest

    cases: list[tuple[bytes, Callable[[str, bytes], bool]]] = [
        (_request("GET", by_tag, accept), manifest),  # not known yet
        (
            _request("GET", by_tag, accept, f'If-None-Match: "{image.digest}"'),
            lambda s, b: "304" in s,
        ),
        (_request("GET", by_tag, accept).replace(b"HTTP/1.1", b"HTTP/1.0"), manifest),
        (_request("GET", by_tag + "?ns=docker.io", accept), manifest),
        (_request("GET", by_tag.replace("/v2/", "/v2/docker.io/"), accept), manifest),
        # Known, but of a type this client does not take: the upstream is asked.
        (
            _request("GET", by_tag, "Accept: application/vnd.oci.image.index.v1+json"),
            lambda s, b: True,
        ),
    ]
    for raw, right in cases:
        reader, writer = await _connect(mirror)
        writer.write(raw)
        try:
            status, _, body = await _response(reader, "GET")
        finally:
            writer.close()
        assert right(status, body), (raw, status)
    # Only the fifth, a trusted tag by another spelling of its route, was the fast path's.
    assert seen == [False, False, False, False, True, False]
    assert relay.count("GET", "/manifests/") == 2


async def test_fast_answers_are_counted_and_logged(
    mirror: Mirror, seeded: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    seen = _spy(mirror)

    async def hits() -> float:
        async with (
            aiohttp.ClientSession() as http,
            http.get(mirror.url + "/metrics") as response,
        ):
            text = await response.text()
        wanted = 'mirror_requests_total{kind="manifest",method="GET",result="hit",status="2xx"}'
        lines = [line for line in text.splitlines() if line.startswith(wanted)]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = await hits()
    reader, writer = await _connect(mirror)
    with caplog.at_level(logging.INFO, logger="mirror.access"):
        for _ in range(5):
            writer.write(
                _request("GET", by_tag, f"Accept: {image.media_type}", "User-Agent: fleet/1")
            )
            assert (await _response(reader, "GET"))[2] == image.manifest
    writer.close()
    assert seen == [False] + [True] * 5  # (/metrics is aiohttp's)
    assert await hits() == before + 5
    lines = [r for r in caplog.records if r.name == "mirror.access" and by_tag in r.getMessage()]
    assert len(lines) == 5
    assert f'"GET {by_tag}" 200 {len(image.manifest)}' in lines[0].getMessage()
    assert lines[0].__dict__["agent"] == "fleet/1" and lines[0].__dict__["result"] == "hit"


async def test_a_client_that_stops_reading_is_not_read_either(
    mirror: Mirror, seeded: Seeded
) -> None:
    """Requests pipelined without reading the answers: the mirror stops reading once the
    answers are not taken, so what it holds stays bounded; every answer arrives once the
    client reads."""
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    reader, writer = await _connect(mirror)
    one = _request("GET", by_tag, f"Accept: {image.media_type}")
    sent = 0
    try:
        with pytest.raises(TimeoutError):
            while True:  # until the mirror stops reading: the client's writes block
                writer.write(one * 100)
                await asyncio.wait_for(writer.drain(), 2)
                sent += 100
        first = await _response(reader, "GET")
        assert first[2] == image.manifest
        size = len(_serialized(first))
        rest = await asyncio.wait_for(reader.readexactly(size * (sent - 1)), 30)
        assert rest.count(b"HTTP/1.1 200 OK\r\n") == rest.count(image.manifest) == sent - 1
    finally:
        writer.close()


async def test_an_idle_connection_is_closed_after_the_keepalive(
    mirror: Mirror, seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "KEEPALIVE", 0.5)
    reader, writer = await _connect(mirror)
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        writer.close()


def _field_lines(count: int) -> str:
    return "\r\n".join(f"X-Field-{n}: {n}" for n in range(count))


@pytest.mark.parametrize(
    "extra",
    [
        "Host: other",  # a second Host
        "X-A: a\x00b",  # a NUL in a value
        "X-A: a\x01b",
        "X-A: a\rTransfer-Encoding: chunked",  # a bare CR
        "User-Agent: a\x1bb",  # an escape in a value
        "X-Long: " + "a" * 10_000,
        _field_lines(200),
    ],
    ids=["two-hosts", "nul", "control", "bare-cr", "escape", "long-field", "200-fields"],
)
async def test_heads_aiohttp_refuses_are_refused_alike(
    mirror: Mirror, seeded: Seeded, extra: str
) -> None:
    """What aiohttp refuses with 400 is declined by the fast path, so aiohttp refuses it
    there too: the two paths never disagree about a request."""
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    seen = _spy(mirror)
    reader, writer = await _connect(mirror)
    writer.write(_request("GET", by_tag, f"Accept: {image.media_type}", extra))
    try:
        status, _, _ = await _response(reader, "GET")
    finally:
        writer.close()
    assert status.split()[1] == "400"
    assert True not in seen


async def test_a_body_hidden_behind_a_bare_lf_is_never_read_as_a_request(
    mirror: Mirror, seeded: Seeded
) -> None:
    """`X-A: a<LF>Content-Length: n`: a reader that takes LF alone as a line end sees a
    body; the mirror must not answer that body as a second request (a front proxy and
    the mirror would disagree about where requests start)."""
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    inner = _request("GET", by_tag + "?smuggled", f"Accept: {image.media_type}")
    outer = _request(
        "GET", by_tag, f"Accept: {image.media_type}", f"X-A: a\nContent-Length: {len(inner)}"
    )
    reader, writer = await _connect(mirror)
    writer.write(outer + inner)
    try:
        status, _, _ = await _response(reader, "GET")
        rest = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    assert status.split()[1] == "400"
    assert b"200 OK" not in rest


async def test_a_head_ended_by_bare_lfs_is_answered_at_once(mirror: Mirror, seeded: Seeded) -> None:
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    reader, writer = await _connect(mirror)
    writer.write(f"GET {by_tag} HTTP/1.1\nHost: mirror\n\n".encode())
    try:
        status, _, _ = await _response(reader, "GET")  # (not after the keep-alive)
    finally:
        writer.close()
    assert status.startswith("HTTP/1.")


async def test_connection_options_are_whole_tokens(mirror: Mirror, seeded: Seeded) -> None:
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    seen = _spy(mirror)
    reader, writer = await _connect(mirror)
    try:
        for option in ("x-closed-thing", "keep-alive, x-upgraded"):
            writer.write(
                _request("GET", by_tag, f"Accept: {image.media_type}", f"Connection: {option}")
            )
            status, fields, body = await _response(reader, "GET")
            assert (status, body) == ("HTTP/1.1 200 OK", image.manifest)
            assert "connection" not in fields  # kept open: the next request is answered
    finally:
        writer.close()
    assert seen == [True, True]


async def test_a_utf8_user_agent_is_logged_as_aiohttp_logs_it(
    mirror: Mirror, seeded: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    reader, writer = await _connect(mirror)
    with caplog.at_level(logging.INFO, logger="mirror.access"):
        for path in (by_tag, by_tag + "?ns=docker.io"):  # the fast path, then aiohttp
            writer.write(
                _request("GET", path, f"Accept: {image.media_type}", "User-Agent: dockér/1")
            )
            await _response(reader, "GET")
    writer.close()
    agents = [r.__dict__["agent"] for r in caplog.records if r.name == "mirror.access"]
    assert agents[-2:] == ["dockér/1", "dockér/1"]


async def test_long_accept_lists_are_not_kept(mirror: Mirror, seeded: Seeded) -> None:
    """A client sending ever new long Accept lists must not grow the mirror's memory."""
    image = seeded.oci
    by_tag = await _warmed(mirror, image)
    manifests = mirror.app[PROXY]._manifests
    kept = len(manifests._accepted)
    reader, writer = await _connect(mirror)
    try:
        for n in range(20):
            accept = f"{image.media_type}, application/x-{n}-" + "a" * 2000
            writer.write(_request("GET", by_tag, f"Accept: {accept}"))
            assert (await _response(reader, "GET"))[2] == image.manifest
    finally:
        writer.close()
    assert len(manifests._accepted) == kept


async def test_with_access_rules_only_what_anyone_may_pull_is_answered_fast(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone on this machine may pull docker.io; ghcr.io takes a login. A request without
    credentials that the rules let through is the fast path's (logged as the gate logs
    it); one they refuse, and any with credentials, are the gate's (401, or its check)."""
    users = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-B", "-b", "-c", str(users), "ci", "secret"], check=True)
    access = {
        "users_file": str(users),
        "rules": [
            {"repositories": ["docker.io/*"], "anonymous": True, "networks": ["127.0.0.0/8"]},
            {"repositories": ["ghcr.io/*"], "users": ["ci"]},
        ],
    }
    mirror = await make_mirror({"docker.io": upstream.url, "ghcr.io": upstream.url}, access=access)
    image = seeded.oci
    accept = f"Accept: {image.media_type}"
    login = "Authorization: Basic " + base64.b64encode(b"ci:secret").decode()
    hub = f"/v2/{image.repository}/manifests/{image.reference}"
    ghcr = f"/v2/ghcr.io/{image.repository}/manifests/{image.reference}"
    seen = _spy(mirror)
    reader, writer = await _connect(mirror)
    statuses = []
    with caplog.at_level(logging.INFO, logger="mirror.access"):
        writer.write(_request("GET", hub, accept))  # a miss: aiohttp's from here on
        statuses.append((await _response(reader, "GET"))[0].split()[1])
        writer.close()
        for raw in (
            _request("GET", hub, accept),  # anyone may: fast
            _request("GET", ghcr, accept),  # a login needed: the gate's 401
            _request("GET", ghcr, accept, login),  # credentials: the gate checks them
            _request("GET", ghcr, accept),  # known now, still not for anyone
            _request("GET", hub, accept, login),  # credentials, even where not needed
        ):
            reader, writer = await _connect(mirror)
            writer.write(raw)
            statuses.append((await _response(reader, "GET"))[0].split()[1])
            writer.close()
    assert statuses == ["200", "200", "401", "200", "401", "200"]
    assert seen == [False, True, False, False, False, False]
    fast = [r for r in caplog.records if r.name == "mirror.access"][1]
    assert "user=- access=allowed" in fast.getMessage()
    assert (fast.__dict__["user"], fast.__dict__["access"]) == ("-", "allowed")
