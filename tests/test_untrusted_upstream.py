"""Exact bytes from any upstream: real-world manifest sizes from the real registry, and a
scripted upstream that sends bodies in pieces, without a length or a digest, cut, too large,
of the wrong type, slowly, or that points the mirror at internal addresses."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.app import PROXY, UPSTREAMS
from mirror.upstream.breaker import Breaker, UpstreamDown
from tests.conftest import MirrorFactory
from tests.support import memory
from tests.support.clock import ManualClock
from tests.support.fake_upstream import (
    OCI_INDEX,
    OCI_MANIFEST,
    Body,
    FakeUpstream,
    manifest_of_size,
    sha256_digest,
)
from tests.support.images import Image, Pusher, padded_manifest
from tests.support.registry import Registry
from tests.support.waiting import until

MiB = 1024 * 1024
ACCEPT = {"Accept": f"{OCI_MANIFEST}, {OCI_INDEX}"}


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with http.get(url, headers=ACCEPT) as response:
        return response.status, await response.read(), dict(response.headers)


def _attested_index(children: list[Image], size: int) -> bytes:
    """An index shaped like Docker Hub's official images: a platform entry and an
    attestation entry per child, padded to `size` bytes."""
    entries: list[dict[str, Any]] = []
    for number, child in enumerate(children):
        entries.append(
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": len(child.manifest),
                "platform": {"architecture": f"arch{number}", "os": "linux"},
            }
        )
        entries.append(
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": len(child.manifest),
                "annotations": {
                    "vnd.docker.reference.digest": child.digest,
                    "vnd.docker.reference.type": "attestation-manifest",
                },
                "platform": {"architecture": "unknown", "os": "unknown"},
            }
        )
    document: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": entries,
        "annotations": {"org.example.padding": ""},
    }
    base = len(json.dumps(document).encode())
    document["annotations"]["org.example.padding"] = "q" * (size - base)
    data = json.dumps(document).encode()
    assert len(data) == size
    return data


async def test_real_world_manifest_sizes_are_exact_on_every_cold_fetch(
    make_mirror: MirrorFactory, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    """20 tags each of a 103 KB image manifest and a 139 KB index with attestation entries,
    then both by digest, all cold, plus 10 KB, 1 MiB and 4 MiB manifests: every answer is
    the upstream's exact bytes (42 of 42 and more)."""
    pusher = Pusher(upstream.url)
    children = [
        pusher.image("exact/sizes", "child", architecture=f"arch{n}", push_tag=False)
        for n in range(8)
    ]
    image = children[0]
    manifests = {
        "image": (padded_manifest(image, 103_000), image.media_type),
        "index": (_attested_index(children, 139_000), OCI_INDEX),
        "small": (padded_manifest(image, 10_000), image.media_type),
        "mib": (padded_manifest(image, MiB), image.media_type),
        "limit": (padded_manifest(image, 4 * MiB), image.media_type),
    }
    tags: list[tuple[str, bytes]] = []
    for name, (data, media_type) in manifests.items():
        copies = 20 if name in ("image", "index") else 1
        for number in range(copies):
            tag = f"{name}-{number}"
            pusher.push_manifest("exact/sizes", tag, data, media_type)
            tags.append((tag, data))
    mirror = await make_mirror({"docker.io": upstream.url})
    base = f"{mirror.url}/v2/exact/sizes/manifests"
    answers = await asyncio.gather(*(_get(http, f"{base}/{tag}") for tag, _ in tags))
    digests = [sha256_digest(manifests[n][0]) for n in ("image", "index")]
    answers += await asyncio.gather(*(_get(http, f"{base}/{d}") for d in digests))
    expected = [data for _, data in tags] + [manifests["image"][0], manifests["index"][0]]
    exact = [
        status == 200 and body == data and headers["Docker-Content-Digest"] == sha256_digest(data)
        for (status, body, headers), data in zip(answers, expected, strict=True)
    ]
    assert sum(exact) == len(expected) == 45


@pytest.mark.parametrize("size", [10_000, 100_107, 4 * MiB])
@pytest.mark.parametrize(
    "shape",
    [
        {"length_header": False, "piece": 1000},  # chunked, in many small pieces
        {"length_header": True, "piece": 4096, "pause": 0.001},  # slowly, with a length
        {"length_header": False, "piece": 4096, "pause": 0.002},  # slowly, no length
    ],
    ids=["chunked-small-pieces", "slow-with-length", "slow-without-length"],
)
async def test_manifest_without_digest_header_in_pieces_is_kept_whole(
    make_mirror: MirrorFactory,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    size: int,
    shape: dict[str, Any],
) -> None:
    data, media_type = manifest_of_size(size, index=size == 100_107)
    fake.set(
        "GET",
        "/v2/odd/shape/manifests/v1",
        Body(data, media_type, digest_header=False, **shape),
    )
    mirror = await make_mirror({"docker.io": fake.url})
    for _ in range(2):  # the second from the cache
        status, body, headers = await _get(http, f"{mirror.url}/v2/odd/shape/manifests/v1")
        assert (status, len(body)) == (200, size)
        assert body == data
        assert headers["Docker-Content-Digest"] == sha256_digest(data)
        assert headers["Content-Type"] == media_type
    status, body, _ = await _get(http, f"{mirror.url}/v2/odd/shape/manifests/{sha256_digest(data)}")
    assert (status, body) == (200, data)
    assert fake.count("GET", "/manifests/") == 1


def _error(body: bytes) -> dict[str, Any]:
    errors: list[dict[str, Any]] = json.loads(body)["errors"]
    return errors[0]


@pytest.mark.parametrize(
    "shape",
    [
        {"length_header": True},
        {"length_header": False},
        {"length_header": False, "digest_header": False, "piece": 65536},
    ],
    ids=["with-length", "chunked", "chunked-without-digest"],
)
async def test_manifest_over_4_mib_is_refused_not_cut(
    make_mirror: MirrorFactory,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    shape: dict[str, Any],
) -> None:
    data, media_type = manifest_of_size(4 * MiB + 1)
    fake.set("GET", "/v2/too/big/manifests/v1", Body(data, media_type, **shape))
    mirror = await make_mirror({"docker.io": fake.url})
    for _ in range(2):
        status, body, _ = await _get(http, f"{mirror.url}/v2/too/big/manifests/v1")
        assert status == 502
        assert "limit" in _error(body)["message"]
    assert fake.count("GET", "/manifests/") == 2  # nothing was kept


@pytest.mark.parametrize(
    "cut",
    [
        {"declared_length": 150_000},  # says 150,000, sends 100,107, closes
        {"length_header": False, "cut_after": 1000, "piece": 500},  # chunked, cut
        {"length_header": True, "cut_after": 60_000, "piece": 1000, "pause": 0.0005},
    ],
    ids=["short-of-its-length", "chunked-cut", "slow-cut"],
)
async def test_cut_manifest_is_never_served_or_kept(
    make_mirror: MirrorFactory,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    cut: dict[str, Any],
) -> None:
    data, media_type = manifest_of_size(100_107)
    path = "/v2/cut/short/manifests/v1"
    fake.set("GET", path, [Body(data, media_type, digest_header=False, **cut), Body(data)])
    mirror = await make_mirror({"docker.io": fake.url})
    status, body, _ = await _get(http, f"{mirror.url}{path}")
    assert status == 502, body[:200]
    assert _error(body)["code"] == "UNAVAILABLE"
    # the next answer is whole: served, and only now kept
    status, body, headers = await _get(http, f"{mirror.url}{path}")
    assert (status, body) == (200, data)
    assert headers["Docker-Content-Digest"] == sha256_digest(data)


async def test_manifest_that_does_not_match_its_digest_is_refused(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data, media_type = manifest_of_size(20_000)
    other, _ = manifest_of_size(20_001)
    lying = sha256_digest(other)
    fake.set("GET", "/v2/a/b/manifests/claims", Body(data, media_type, claimed_digest=lying))
    fake.set("GET", f"/v2/a/b/manifests/{lying}", Body(data, media_type))
    mirror = await make_mirror({"docker.io": fake.url})
    for reference in ("claims", lying):  # a wrong header; the wrong bytes for a digest asked
        status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/manifests/{reference}")
        assert status == 502
        assert lying in _error(body)["message"]


async def test_only_manifest_media_types_are_served_and_nothing_is_sniffed(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    page = b"<html><script>alert(1)</script></html>"
    fake.set("GET", "/v2/a/b/manifests/html", Body(page, "text/html"))
    data, _ = manifest_of_size(12_000)
    fake.set("GET", "/v2/a/b/manifests/json", Body(data, "application/json"))
    mirror = await make_mirror({"docker.io": fake.url})
    status, body, headers = await _get(http, f"{mirror.url}/v2/a/b/manifests/html")
    assert status == 502 and b"<script>" not in body
    assert "text/html" in _error(body)["message"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    # a registry that says application/json: served with the manifest's own mediaType
    status, body, headers = await _get(http, f"{mirror.url}/v2/a/b/manifests/json")
    assert (status, body, headers["Content-Type"]) == (200, data, OCI_MANIFEST)
    for path in ("/v2/", "/", "/metrics", "/healthz", "/v2/a/b/manifests/json"):
        async with http.get(f"{mirror.url}{path}") as response:
            assert response.headers["X-Content-Type-Options"] == "nosniff", path


@pytest.mark.in_process  # measures this process's memory
async def test_gigabyte_error_and_list_bodies_do_not_grow_memory(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    gib = 1024 * MiB
    error = {"status": 500, "content_type": "application/json", "digest_header": False}
    fake.set("GET", "/v2/a/b/manifests/sized", Body(generated=gib, **error))
    fake.set("GET", "/v2/a/b/manifests/chunked", Body(generated=gib, length_header=False, **error))
    page = {"content_type": "application/json", "digest_header": False}
    fake.set("GET", "/v2/a/b/tags/list", Body(generated=gib, **page))
    fake.set("GET", "/v2/c/d/tags/list", Body(generated=gib, length_header=False, **page))
    challenge = f'Bearer realm="{fake.url}/token",service="fake"'
    denied = Body(b"{}", "application/json", status=401, headers={"WWW-Authenticate": challenge})
    fake.set("GET", "/v2/e/f/manifests/v1", denied)
    fake.set("GET", "/token", Body(generated=gib, length_header=False, **page))
    mirror = await make_mirror({"docker.io": fake.url})
    await _get(http, f"{mirror.url}/v2/")
    memory.reset_peak()
    before = memory.peak()
    started = time.monotonic()
    paths = ("a/b/manifests/sized", "a/b/manifests/chunked", "a/b/tags/list", "c/d/tags/list")
    for path in (*paths, "e/f/manifests/v1"):  # the last one's token answer is a GiB
        status, body, _ = await _get(http, f"{mirror.url}/v2/{path}")
        assert status == 502, path
        assert _error(body)["code"] == "UNAVAILABLE"
    assert memory.peak() - before < 64 * MiB
    assert time.monotonic() - started < 30  # refused at the limit, not read to the end


async def test_token_realm_that_never_answers_costs_the_configured_timeouts(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    challenge = f'Bearer realm="{fake.url}/token",service="fake"'
    denied = Body(b"{}", "application/json", status=401, headers={"WWW-Authenticate": challenge})
    fake.set("GET", "/v2/a/b/manifests/v1", denied)
    fake.set("GET", "/v2/c/d/manifests/v1", denied)
    fake.set("GET", "/token", Body(hang_before_headers=True))
    mirror = await make_mirror(
        {"docker.io": fake.url}, timeouts={"connect": 1, "read": 1, "transfer": 30}
    )
    started = time.monotonic()
    answers = await asyncio.gather(
        _get(http, f"{mirror.url}/v2/a/b/manifests/v1"),
        _get(http, f"{mirror.url}/v2/c/d/manifests/v1"),
    )
    assert [status for status, _, _ in answers] == [504, 504]
    assert time.monotonic() - started < 5  # connect + read, not aiohttp's 300 s


async def test_trickled_blob_ends_at_the_transfer_timeout(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """1 byte every 20 ms never trips the read timeout; the transfer's total does, once,
    not once per resume."""
    data = bytes(range(256)) * 8
    digest = sha256_digest(data)
    trickle = Body(data, "application/octet-stream", piece=1, pause=0.02)
    fake.set("GET", f"/v2/a/b/blobs/{digest}", trickle)
    mirror = await make_mirror(
        {"docker.io": fake.url}, timeouts={"connect": 1, "read": 5, "transfer": 1.5}
    )
    started = time.monotonic()
    async with http.get(f"{mirror.url}/v2/a/b/blobs/{digest}") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert time.monotonic() - started < 4
    assert fake.count("GET", "/blobs/") == 1


@pytest.mark.in_process  # max_transfers is per process
async def test_clients_queued_behind_max_transfers_are_bounded(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """A client queued behind a transfer that hangs waits at most that transfer's bound
    (its whole time, slot included, is timeouts.transfer), then is served."""
    hanging, queued = b"a" * 1000, b"b" * 1000
    fake.set(
        "GET",
        f"/v2/a/b/blobs/{sha256_digest(hanging)}",
        Body(hanging, "application/octet-stream", hang=True),
    )
    fake.set("GET", f"/v2/a/b/blobs/{sha256_digest(queued)}", Body(queued))
    mirror = await make_mirror(
        {"docker.io": {"url": fake.url, "max_transfers": 1}},
        timeouts={"connect": 1, "read": 30, "transfer": 1.5},
    )
    started = time.monotonic()
    first = asyncio.create_task(_get(http, f"{mirror.url}/v2/a/b/blobs/{sha256_digest(hanging)}"))
    while fake.count("GET", sha256_digest(hanging)) == 0:
        await asyncio.sleep(0.01)
    # Asked half a second later: its own bound (slot wait included) ends after the
    # hanging one's, with time to spare for its transfer once the slot is free.
    await asyncio.sleep(0.5)
    status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/blobs/{sha256_digest(queued)}")
    assert (status, body) == (200, queued)
    assert 1.4 < time.monotonic() - started < 4  # after the hanging one's bound, not never
    with pytest.raises(aiohttp.ClientPayloadError):
        await first


@pytest.mark.in_process  # makes the upstream look public (tests can only use loopback)
async def test_redirects_and_realms_to_internal_addresses_are_refused(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    internal = await FakeUpstream().start()
    try:
        data = b"secret" * 100
        internal.set("GET", "/secret", Body(data, "application/octet-stream"))
        internal.set("GET", "/token", Body(b'{"token": "t"}', "application/json"))
        digest = sha256_digest(data)
        fake.set(
            "GET",
            f"/v2/a/b/blobs/{digest}",
            Body(
                status=307, headers={"Location": f"http://localhost:{internal.server.port}/secret"}
            ),  # type: ignore[union-attr]
        )
        realm = f"http://localhost:{internal.server.port}/token"  # type: ignore[union-attr]
        challenge = f'Bearer realm="{realm}",service="fake"'
        fake.set(
            "GET",
            "/v2/c/d/manifests/v1",
            Body(b"{}", "application/json", status=401, headers={"WWW-Authenticate": challenge}),
        )
        mirror = await make_mirror({"docker.io": fake.url})
        client = mirror.app[PROXY]._upstreams["docker.io"]
        client._addresses._upstream_internal = False  # as if it were on the internet
        status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/blobs/{digest}")
        assert status == 502 and "internal" in _error(body)["message"]
        status, body, _ = await _get(http, f"{mirror.url}/v2/c/d/manifests/v1")
        assert status == 502 and "internal" in _error(body)["message"]
        assert internal.requests == []
    finally:
        await internal.close()


async def test_blob_body_cut_without_a_length_is_never_served_whole(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = hashlib.sha256(b"seed").digest() * 10_000
    digest = sha256_digest(data)
    cut = Body(data, "application/octet-stream", length_header=False, cut_after=100_000)
    fake.set("GET", f"/v2/a/b/blobs/{digest}", [cut, Body(data, "application/octet-stream")])
    mirror = await make_mirror({"docker.io": fake.url})
    async with http.get(f"{mirror.url}/v2/a/b/blobs/{digest}") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/blobs/{digest}")
    assert (status, body) == (200, data)


@pytest.mark.parametrize("cut", [None, 19_910], ids=["whole", "cut"])
async def test_a_close_delimited_manifest_without_digest_is_kept_only_whole(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession, cut: int | None
) -> None:
    """No length, no chunks, no digest: the body ends when the connection closes, so only
    its form can tell a cut one (it is not a whole JSON document)."""
    data, media_type = manifest_of_size(20_010)
    fake.set(
        "GET",
        "/v2/old/server/manifests/v1",
        Body(data, media_type, digest_header=False, close_delimited=True, cut_after=cut),
    )
    mirror = await make_mirror({"docker.io": fake.url})
    for _ in range(2):
        status, body, _ = await _get(http, f"{mirror.url}/v2/old/server/manifests/v1")
        if cut is None:
            assert (status, body) == (200, data)
        else:
            assert status == 502 and "not a whole JSON document" in _error(body)["message"]
    assert fake.count("GET", "/manifests/") == (1 if cut is None else 2)


@pytest.mark.parametrize("declared", ["text/html", "application/octet-stream", "text/plain"])
async def test_a_manifest_declared_as_anything_else_is_refused(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession, declared: str
) -> None:
    data, _ = manifest_of_size(12_000)  # a real manifest body, with its own mediaType
    fake.set("GET", "/v2/a/b/manifests/v1", Body(data, declared))
    mirror = await make_mirror({"docker.io": fake.url})
    status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/manifests/v1")
    assert status == 502 and declared in _error(body)["message"]


async def test_tag_lists_and_referrers_are_served_as_json_whatever_the_upstream_says(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    page = b"<html><script>alert(document.domain)</script></html>"
    fake.set("GET", "/v2/a/b/tags/list", Body(page, "text/html", digest_header=False))
    digest = sha256_digest(b"subject")
    fake.set("GET", f"/v2/a/b/referrers/{digest}", Body(page, "text/html", digest_header=False))
    mirror = await make_mirror({"docker.io": fake.url})
    for path in ("tags/list", f"referrers/{digest}"):
        async with http.get(f"{mirror.url}/v2/a/b/{path}") as response:
            assert response.content_type == "application/json", path
            assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_a_reference_with_a_trailing_newline_is_invalid(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data, media_type = manifest_of_size(10_000)
    fake.set("GET", "/v2/a/b/manifests/latest", Body(data, media_type))
    mirror = await make_mirror({"docker.io": fake.url})
    # Not a tag (no manifest can be named so: 404), not a digest (400); never asked upstream.
    for reference, status in (("latest%0a", 404), (f"{sha256_digest(data)}%0a", 400)):
        async with http.get(f"{mirror.url}/v2/a/b/manifests/{reference}") as response:
            assert response.status == status, reference
    assert fake.count("GET", "/manifests/") == 0


async def test_every_blob_answer_says_where_it_came_from(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = b"blob" * 1000
    digest = sha256_digest(data)
    fake.set("GET", f"/v2/a/b/blobs/{digest}", Body(data, "application/octet-stream"))
    mirror = await make_mirror({"docker.io": fake.url})
    url = f"{mirror.url}/v2/a/b/blobs/{digest}"
    async with http.head(url) as response:
        assert (response.status, response.headers["X-Mirror-Cache"]) == (200, "miss")
    async with http.get(url) as response:
        assert await response.read() == data
    for _ in range(200):  # kept just after its client had it
        async with http.head(url) as response:
            if response.headers["X-Mirror-Cache"] == "hit":
                break
        await asyncio.sleep(0.01)
    assert response.headers["X-Mirror-Cache"] == "hit"
    async with http.get(url, headers={"If-None-Match": f'"{digest}"'}) as response:
        assert (response.status, response.headers["X-Mirror-Cache"]) == (304, "hit")


def _open_deleted_temporaries(store: Path) -> list[str]:
    """Removed temporaries of the store at `store` that this process still holds open."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith(str(store)) and target.endswith(".part (deleted)"):
                found.append(target)
    return found


@pytest.mark.in_process  # looks at this process's open files
async def test_a_failed_transfer_lets_go_of_its_temporary_at_once(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(2 * MiB)
    digest = sha256_digest(data)
    fake.set(
        "GET",
        f"/v2/a/b/blobs/{digest}",
        Body(data, "application/octet-stream", piece=65536, pause=0.05),
    )
    mirror = await make_mirror(
        {"docker.io": fake.url}, timeouts={"connect": 1, "read": 5, "transfer": 0.5}
    )
    async with http.get(f"{mirror.url}/v2/a/b/blobs/{digest}") as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    await until(
        lambda: not _open_deleted_temporaries(mirror.storage), "no removed temporary is held open"
    )


async def test_a_token_realm_that_fails_is_not_trusted_forever(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """One bad challenge (its realm answers 500) must not stick to the upstream: the next
    challenge says where to go now."""
    data, _ = manifest_of_size(10_000)

    def challenge(realm: str) -> Body:
        header = f'Bearer realm="{fake.url}{realm}",service="fake"'
        return Body(b"{}", "application/json", status=401, headers={"WWW-Authenticate": header})

    fake.set("GET", "/bad-token", Body(b"{}", "application/json", status=500))
    fake.set("GET", "/good-token", Body(b'{"token": "t"}', "application/json"))
    manifest = "/v2/a/b/manifests/v1"
    fake.set("GET", manifest, [challenge("/bad-token"), challenge("/good-token"), Body(data)])
    mirror = await make_mirror({"docker.io": fake.url})
    status, _, _ = await _get(http, f"{mirror.url}{manifest}")
    assert status == 502  # the realm failed
    status, body, _ = await _get(http, f"{mirror.url}{manifest}")
    assert (status, body) == (200, data)
    assert fake.count("GET", "/good-token") == 1


@pytest.mark.in_process  # moves the mirror's clock
async def test_a_hanging_upstream_costs_one_revalidation_budget_then_nothing(
    make_mirror: MirrorFactory,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    """A cached tag past its TTL, the upstream black-holed: the first request waits the
    revalidation budget and is answered stale, the next 99 at once; the upstream is probed
    once per back-off interval, and found again by itself when it returns."""
    data, media_type = manifest_of_size(12_000)
    path = "/v2/a/b/manifests/v1"
    fake.set("GET", path, Body(data, media_type))
    mirror = await make_mirror(
        {"docker.io": fake.url},
        manifest_ttl=0,
        timeouts={"connect": 1, "read": 30, "revalidate": 0.5},
        clock=clock,
    )
    url = f"{mirror.url}{path}"
    assert (await _get(http, url))[:2] == (200, data)  # cached
    fake.set("HEAD", path, Body(hang_before_headers=True))
    slowest = 0.0
    for _ in range(100):
        started = time.monotonic()
        status, body, headers = await _get(http, url)
        slowest = max(slowest, time.monotonic() - started)
        assert (status, body, headers["X-Mirror-Cache"]) == (200, data, "stale")
    assert slowest < 1.0  # the first: the budget (0.5 s); the rest: at once
    assert fake.count("HEAD") == 1
    clock.advance(1.5)  # the back-off is over: one probe, which hangs too, without a client
    started = time.monotonic()
    assert (await _get(http, url))[2]["X-Mirror-Cache"] == "stale"
    assert time.monotonic() - started < 0.3
    await until(lambda: fake.count("HEAD") == 2, "the probe went out")

    async def backoff() -> float:
        async with http.get(f"{mirror.url}/readyz") as response:
            state = (await response.json())["upstreams"]["docker.io"]
        assert state["reachable"] is False
        return float(state["retry_in"])

    deadline = time.monotonic() + 5
    while await backoff() < 1.5:  # the probe gives up after its budget: doubled, 2 s
        assert time.monotonic() < deadline, "the probe's failure did not double the back-off"
        await asyncio.sleep(0.05)
    clock.advance(1.0)  # within the doubled back-off: answered at once, not asked
    started = time.monotonic()
    assert (await _get(http, url))[2]["X-Mirror-Cache"] == "stale"
    assert time.monotonic() - started < 0.3 and fake.count("HEAD") == 2
    fake.set("HEAD", path, Body(data, media_type))  # the upstream is back
    clock.advance(1.5)
    assert (await _get(http, url))[2]["X-Mirror-Cache"] == "stale"  # its probe, meanwhile
    await until(lambda: fake.count("HEAD") == 3, "the probe went out")
    await until(lambda: not mirror.app[UPSTREAMS].by_name["docker.io"].down(), "it is up again")
    status, body, headers = await _get(http, url)
    assert (status, body, headers["X-Mirror-Cache"]) == (200, data, "hit")  # revalidated
    assert fake.count("HEAD") == 4


def test_failures_already_under_way_do_not_push_the_back_off() -> None:
    """Eight requests that fail together trip the breaker once (1 s), not eight times."""
    clock = ManualClock()
    breaker = Breaker("up", clock)
    for _ in range(8):
        breaker.failed("no answer")
    assert breaker.retry_in() == pytest.approx(1.0)
    clock.advance(1.1)
    assert breaker.admit() is True  # the one probe
    with pytest.raises(UpstreamDown):
        breaker.admit()  # the others meanwhile
    breaker.failed("no answer")  # the probe failed: doubled
    assert breaker.retry_in() == pytest.approx(2.0)
    clock.advance(2.1)
    assert breaker.admit() is True
    breaker.succeeded()
    assert breaker.admit() is False and not breaker.down


async def test_a_transfer_under_way_resumes_while_its_upstream_is_down(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(400_000)
    digest = sha256_digest(data)
    cut = Body(data, "application/octet-stream", piece=16384, pause=0.03, cut_after=200_000)
    fake.set("GET", f"/v2/a/b/blobs/{digest}", [cut, Body(data, "application/octet-stream")])
    fake.set("GET", "/v2/other/broken/manifests/v1", Body(b"{}", "application/json", status=503))
    mirror = await make_mirror({"docker.io": fake.url})
    pull = asyncio.create_task(_get(http, f"{mirror.url}/v2/a/b/blobs/{digest}"))
    while not fake.count("GET", "/blobs/"):
        await asyncio.sleep(0.01)
    status, _, _ = await _get(http, f"{mirror.url}/v2/other/broken/manifests/v1")
    assert status == 502  # the upstream is down now, for a second
    status, body, _ = await pull
    assert (status, body) == (200, data)  # resumed all the same
    assert fake.count("GET", "/blobs/") == 2


@pytest.mark.in_process  # a breaker is per worker: with two, the next request may meet the other
async def test_one_broken_repository_does_not_cut_the_others_off(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """A 500 is that request's failure; 502, 503 and 504 say the registry itself is down."""
    data, media_type = manifest_of_size(10_000)
    fake.set("GET", "/v2/a/b/manifests/v1", Body(data, media_type))
    broken = "/v2/other/broken/manifests/v1"
    fake.set("GET", broken, Body(b"{}", "application/json", status=500))
    mirror = await make_mirror({"docker.io": fake.url})
    assert (await _get(http, f"{mirror.url}{broken}"))[0] == 502
    assert (await _get(http, f"{mirror.url}/v2/a/b/manifests/v1"))[:2] == (200, data)
    fake.set("GET", broken, Body(b"{}", "application/json", status=503))
    assert (await _get(http, f"{mirror.url}{broken}"))[0] == 502
    status, body, headers = await _get(http, f"{mirror.url}/v2/a/b/manifests/v2")
    assert status == 502 and "Retry-After" in headers, body
    assert "answered 503" in _error(body)["message"]
    assert fake.count("GET", "/v2/a/b/manifests/v2") == 0  # not asked: down


def _challenge(fake: FakeUpstream, realm: str) -> Body:
    header = f'Bearer realm="{realm}",service="fake"'
    return Body(b"{}", "application/json", status=401, headers={"WWW-Authenticate": header})


async def test_a_hanging_token_server_is_the_upstream_down(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """The token server is part of the upstream: when it hangs, the first request waits
    its timeout and says which host did not answer; the next ones fail at once."""
    fake.set("GET", "/v2/a/b/manifests/v1", _challenge(fake, f"{fake.url}/token"))
    fake.set("GET", "/token", Body(hang_before_headers=True))
    mirror = await make_mirror({"docker.io": fake.url}, timeouts={"connect": 1, "read": 0.5})
    status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/manifests/v1")
    error = _error(body)
    assert status == 504, body
    host = fake.url.removeprefix("http://")
    assert error["detail"]["host"] == host
    assert error["detail"]["cause"] == f"the token server {host} gave no answer within the timeouts"
    started = time.monotonic()
    status, body, headers = await _get(http, f"{mirror.url}/v2/a/b/manifests/v1")
    assert time.monotonic() - started < 0.4
    assert status == 502 and "Retry-After" in headers
    assert "token server" in _error(body)["message"]
    assert fake.count("GET", "/token") == 1


async def test_an_unreachable_token_server_says_so(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    realm = f"http://127.0.0.1:{port}/token"
    fake.set("GET", "/v2/a/b/manifests/v1", _challenge(fake, realm))
    mirror = await make_mirror({"docker.io": {"url": fake.url, "auth_hosts": ["127.0.0.1"]}})
    status, body, _ = await _get(http, f"{mirror.url}/v2/a/b/manifests/v1")
    error = _error(body)
    assert status == 502, body
    assert error["detail"]["host"] == f"127.0.0.1:{port}"
    assert error["detail"]["cause"].startswith(
        f"the token server 127.0.0.1:{port}: connection refused or unreachable"
    ), error


@pytest.mark.in_process  # moves the mirror's clock
async def test_a_probe_of_a_hanging_upstream_is_bounded_by_the_revalidation_budget(
    make_mirror: MirrorFactory,
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    """An uncached request that probes a down upstream waits timeouts.revalidate, not the
    transport's timeouts: a hanging probe must not hide for long that it is back."""
    fake.set("GET", "/v2/a/b/manifests/v1", Body(hang_before_headers=True))
    mirror = await make_mirror(
        {"docker.io": fake.url},
        timeouts={"connect": 1, "read": 1.5, "revalidate": 0.3},
        clock=clock,
    )
    url = f"{mirror.url}/v2/a/b/manifests/v1"
    assert (await _get(http, url))[0] == 504  # up until now: the transport's timeouts
    status, _, headers = await _get(http, url)
    assert status == 502 and headers["Retry-After"] == "1"  # down: at once
    clock.advance(1.1)
    started = time.monotonic()
    status, body, _ = await _get(http, url)
    assert status == 504 and "(a probe)" in _error(body)["message"]
    assert time.monotonic() - started < 1.0
    assert fake.count("GET", "/manifests/") == 2


@pytest.mark.in_process  # reads this process's log records
async def test_an_upstream_failure_is_logged_with_its_cause_once(
    make_mirror: MirrorFactory, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    mirror = await make_mirror({"docker.io": f"http://127.0.0.1:{port}"})
    for _ in range(5):
        assert (await _get(http, f"{mirror.url}/v2/a/b/manifests/v1"))[0] == 502
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    failed = [line for line in lines if "/v2/a/b/manifests/v1" in line]
    assert len(failed) == 1, lines  # the four refused while down are not logged again
    assert "connection refused or unreachable" in failed[0]
    assert any(line.startswith("upstream docker.io is down (") for line in lines), lines
