"""The fake upstream itself: each misbehaviour really reaches the wire as it says, so tests
built on it fail for the mirror's faults, not the helper's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.fake_upstream import Body, FakeUpstream, manifest_of_size, sha256_digest

MANIFEST = "/v2/team/app/manifests/v1"
BLOB = "/v2/team/app/blobs/sha256:" + "a" * 64


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = await FakeUpstream().start()
    yield upstream
    started = time.monotonic()
    await upstream.close()
    assert time.monotonic() - started < 5  # hanging answers do not hold the shutdown


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def read_until_cut(response: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """The bytes that arrived, and whether the body ended early."""
    received = b""
    try:
        async for chunk in response.content.iter_any():
            received += chunk
    except aiohttp.ClientPayloadError:
        return received, True
    return received, False


async def test_base_not_found_and_request_log(
    fake: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    async with client.get(fake.url + "/v2/") as response:
        assert response.status == 200
        assert await response.json() == {}
    async with client.get(fake.url + MANIFEST + "?x=1", headers={"Authorization": "Bearer t"}):
        pass
    async with client.get(fake.url + MANIFEST) as response:
        assert response.status == 404
        assert (await response.json())["errors"][0]["code"] == "NOT_FOUND"
    assert [(m, p) for m, p, _ in fake.requests] == [
        ("GET", "/v2/"),
        ("GET", MANIFEST + "?x=1"),
        ("GET", MANIFEST),
    ]
    assert fake.requests[1][2]["Authorization"] == "Bearer t"
    assert fake.count("GET", "/manifests/") == 2
    assert fake.count("GET", "x=1") == 1
    assert fake.count("HEAD") == 0


async def test_default_answer_and_digest_headers(
    fake: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    fake.default = Body(b"anything", content_type="text/plain", status=500, digest_header=False)
    fake.set("GET", MANIFEST, Body(b"{}"))
    fake.set("GET", BLOB, Body(b"blob", claimed_digest="sha256:" + "0" * 64))
    async with client.get(fake.url + "/v2/other/manifests/x") as response:
        assert response.status == 500
        assert "Docker-Content-Digest" not in response.headers
        assert await response.read() == b"anything"
    async with client.get(fake.url + MANIFEST) as response:
        assert response.headers["Docker-Content-Digest"] == sha256_digest(b"{}")
        assert response.content_type == "application/vnd.oci.image.manifest.v1+json"
    async with client.get(fake.url + BLOB) as response:
        assert response.headers["Docker-Content-Digest"] == "sha256:" + "0" * 64


async def test_chunked_has_no_length(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data, media_type = manifest_of_size(100_000)
    fake.set("GET", MANIFEST, Body(data, content_type=media_type, length_header=False))
    async with client.get(fake.url + MANIFEST) as response:
        assert "Content-Length" not in response.headers
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.headers["Docker-Content-Digest"] == sha256_digest(data)
        assert await response.read() == data


async def test_pieces_arrive_apart(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    fake.set("GET", BLOB, Body(b"a" * 10, piece=3, pause=0.1))
    started = time.monotonic()
    arrivals: list[bytes] = []
    async with client.get(fake.url + BLOB) as response:
        assert response.content_length == 10
        async for chunk in response.content.iter_any():
            arrivals.append(chunk)
    assert time.monotonic() - started >= 0.3  # three pauses between four pieces
    assert b"".join(arrivals) == b"a" * 10
    assert len(arrivals) >= 2


@pytest.mark.parametrize("length_header", [True, False])
async def test_cut_after(
    fake: FakeUpstream, client: aiohttp.ClientSession, length_header: bool
) -> None:
    fake.set("GET", BLOB, Body(b"b" * 1000, cut_after=100, piece=64, length_header=length_header))
    async with client.get(fake.url + BLOB) as response:
        received, cut = await read_until_cut(response)
    assert cut
    assert received == b"b" * 100


async def test_generated_body(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    size = 50 * 1024 * 1024 + 7
    fake.set("GET", BLOB, Body(generated=size, content_type="application/octet-stream"))
    hasher = hashlib.sha256()
    count = 0
    async with client.get(fake.url + BLOB) as response:
        assert response.content_length == size
        async for chunk in response.content.iter_chunked(1024 * 1024):
            count += len(chunk)
            hasher.update(chunk)
        assert response.headers["Docker-Content-Digest"] == "sha256:" + hasher.hexdigest()
    assert count == size


async def test_list_of_answers_advances(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    challenge = {"WWW-Authenticate": 'Bearer realm="http://auth/token",service="fake"'}
    fake.set("GET", MANIFEST, [Body(status=401, headers=challenge), Body(b"first"), Body(b"last")])
    seen = []
    for _ in range(4):
        async with client.get(fake.url + MANIFEST) as response:
            seen.append((response.status, await response.read()))
    assert seen[0][0] == 401
    assert seen[1:] == [(200, b"first"), (200, b"last"), (200, b"last")]
    assert fake.count("GET", MANIFEST) == 4
    fake.set("GET", MANIFEST, [Body(status=503), Body(b"again")])  # a new list starts over
    async with client.head(fake.url + MANIFEST) as response:  # HEAD takes from the GET list
        assert response.status == 503
    async with client.get(fake.url + MANIFEST) as response:
        assert await response.read() == b"again"


async def test_head_gives_headers_only(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    data, media_type = manifest_of_size(10_000)
    fake.set("GET", MANIFEST, Body(data, content_type=media_type))
    fake.set("GET", BLOB, Body(b"z" * 10, length_header=False))
    async with client.head(fake.url + MANIFEST) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(data))
        assert response.headers["Docker-Content-Digest"] == sha256_digest(data)
        assert response.content_type == media_type
        assert await response.read() == b""
    async with client.head(fake.url + BLOB) as response:
        assert "Content-Length" not in response.headers
    async with client.get(fake.url + MANIFEST) as response:  # the connection is still sound
        assert await response.read() == data
    assert fake.count("HEAD") == 2


async def test_declared_length_lies(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    fake.set("GET", MANIFEST, Body(b"c" * 100, declared_length=200))
    fake.set("GET", BLOB, Body(b"d" * 100, declared_length=40))
    async with client.get(fake.url + MANIFEST) as response:
        assert response.content_length == 200
        received, cut = await read_until_cut(response)
    assert cut
    assert received == b"c" * 100
    # The surplus after the declared 40 bytes reads as garbage where the next answer should
    # start: aiohttp fails the answer when it comes in the same packet, as on loopback.
    try:
        async with client.get(fake.url + BLOB) as response:
            assert response.content_length == 40
            assert await response.read() == b"d" * 40
    except aiohttp.ClientResponseError as error:
        assert "Bad status line" in error.message
    async with client.get(fake.url + "/v2/") as response:  # the next request gets a new one
        assert response.status == 200


async def test_short_declared_length_still_sends_the_whole_body(fake: FakeUpstream) -> None:
    fake.set("GET", BLOB, Body(b"d" * 100, declared_length=40))
    assert fake.server is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", fake.server.port)
    writer.write(f"GET {BLOB} HTTP/1.1\r\nHost: fake\r\n\r\n".encode())
    wire = await asyncio.wait_for(reader.read(-1), 5)  # to the close
    writer.close()
    head, _, body = wire.partition(b"\r\n\r\n")
    assert b"\r\nContent-Length: 40\r\n" in head
    assert body == b"d" * 100


async def test_hangs(fake: FakeUpstream, client: aiohttp.ClientSession) -> None:
    fake.set("GET", BLOB, Body(b"e" * 10, hang=True))
    fake.set("GET", MANIFEST, Body(b"{}", hang_before_headers=True))
    async with client.get(fake.url + BLOB) as response:
        assert response.status == 200
        assert response.content_length == 10
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(response.read(), 0.3)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.get(fake.url + MANIFEST), 0.3)
    hung = asyncio.create_task(client.get(fake.url + MANIFEST))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await fake.close()  # does not wait for the hanging answer
    assert time.monotonic() - started < 5
    with pytest.raises(aiohttp.ClientConnectionError):  # disconnected (or, retried, refused)
        await hung


@pytest.mark.parametrize("index", [False, True])
@pytest.mark.parametrize("size", [10_000, 100_000, 4 * 1024 * 1024, 5 * 1024 * 1024])
def test_manifest_of_size(size: int, index: bool) -> None:
    data, media_type = manifest_of_size(size, index=index)
    assert len(data) == size
    document = json.loads(data)
    assert document["schemaVersion"] == 2
    assert document["mediaType"] == media_type
    if index:
        assert media_type == "application/vnd.oci.image.index.v1+json"
        platforms = [entry["platform"] for entry in document["manifests"]]
        attestations = [
            entry
            for entry in document["manifests"]
            if entry.get("annotations", {}).get("vnd.docker.reference.type")
            == "attestation-manifest"
        ]
        assert len(document["manifests"]) >= 10
        assert attestations
        unknown = {"architecture": "unknown", "os": "unknown"}
        assert all(entry["platform"] == unknown for entry in attestations)
        assert sum(1 for platform in platforms if platform != unknown) == len(attestations)
    else:
        assert media_type == "application/vnd.oci.image.manifest.v1+json"
        assert document["config"]["digest"].startswith("sha256:")
        assert document["layers"]


def test_sha256_digest() -> None:
    assert sha256_digest(b"") == (
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
