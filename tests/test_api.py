"""The pull API as a client sees it: routing, manifests, lists, and every bad-input answer."""

from __future__ import annotations

import asyncio
import hashlib
import socket
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mirror, MirrorFactory, RelayFactory, Seeded
from tests.support.clock import ManualClock
from tests.support.images import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Pusher
from tests.support.registry import Registry, free_port
from tests.support.relay import Relay


async def _error(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await response.json(content_type=None)
    assert set(body) == {"errors"}
    (error,) = body["errors"]
    assert {"code", "message", "detail"} <= set(error)
    return dict(error)


async def test_base_endpoint(mirror: Mirror, http: aiohttp.ClientSession) -> None:
    for method in ("GET", "HEAD"):
        async with http.request(method, f"{mirror.url}/v2/") as response:
            assert response.status == 200
            assert response.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
            if method == "GET":
                assert await response.json() == {}


@pytest.fixture
async def two_upstreams(
    make_mirror: MirrorFactory, make_relay: RelayFactory, upstream: Registry
) -> tuple[Mirror, Relay, Relay]:
    hub = await make_relay(upstream.url)
    ghcr = await make_relay(upstream.url)
    mirror = await make_mirror({"docker.io": hub.url, "ghcr.io": ghcr.url})
    return mirror, hub, ghcr


@pytest.mark.parametrize(
    ("path", "via", "upstream_path"),
    [
        ("/v2/alpine/manifests/3.20", "hub", "/v2/library/alpine/manifests/3.20"),
        ("/v2/library/alpine/manifests/3.20", "hub", "/v2/library/alpine/manifests/3.20"),
        ("/v2/alpine/manifests/3.20?ns=docker.io", "hub", "/v2/library/alpine/manifests/3.20"),
        (
            "/v2/library/alpine/manifests/3.20?ns=index.docker.io",
            "hub",
            "/v2/library/alpine/manifests/3.20",
        ),
        ("/v2/docker.io/alpine/manifests/3.20", "hub", "/v2/library/alpine/manifests/3.20"),
        ("/v2/ghcr.io/team/app/manifests/v1", "ghcr", "/v2/team/app/manifests/v1"),
        ("/v2/team/app/manifests/v1?ns=ghcr.io", "ghcr", "/v2/team/app/manifests/v1"),
        ("/v2/team/app/manifests/v1", "hub", "/v2/team/app/manifests/v1"),
    ],
)
async def test_routing(
    two_upstreams: tuple[Mirror, Relay, Relay],
    seeded: Seeded,
    http: aiohttp.ClientSession,
    path: str,
    via: str,
    upstream_path: str,
) -> None:
    mirror, hub, ghcr = two_upstreams
    async with http.get(mirror.url + path, headers={"Accept": OCI_MANIFEST}) as response:
        assert response.status == 200, await response.text()
    chosen, other = (hub, ghcr) if via == "hub" else (ghcr, hub)
    assert ("GET", upstream_path) in chosen.requests
    assert other.requests == []


async def test_unknown_ns_is_refused_without_contacting_anything(
    two_upstreams: tuple[Mirror, Relay, Relay], http: aiohttp.ClientSession
) -> None:
    mirror, hub, ghcr = two_upstreams
    url = f"{mirror.url}/v2/org/img/manifests/1?ns=registry.example.com"
    async with http.get(url) as response:
        assert response.status == 404
        assert (await _error(response))["code"] == "NAME_UNKNOWN"
    assert hub.requests == [] and ghcr.requests == []


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize(
    "path",
    [
        "/v2/alpine/manifests/latest",
        "/v2/alpine/blobs/uploads/",
        "/v2/alpine/blobs/sha256:" + "a" * 64,
    ],
)
async def test_writes_are_refused(
    mirror: Mirror, http: aiohttp.ClientSession, method: str, path: str
) -> None:
    async with http.request(method, mirror.url + path, data=b"x") as response:
        assert response.status == 405
        assert (await _error(response))["code"] == "UNSUPPORTED"


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v2/Upper/Case/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/bad..name/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/ghcr.io/Org/img/manifests/latest", 400, "NAME_INVALID"),
        # No manifest has a name no tag can be: unknown, as the conformance suite asks.
        ("/v2/alpine/manifests/-leading-dash", 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/" + "t" * 129, 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/sha256:" + "z" * 64, 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/md5:" + "a" * 32, 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/latest", 400, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/no-such-tag", 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/manifests/sha256:" + "0" * 64, 404, "MANIFEST_UNKNOWN"),
        ("/v2/alpine/blobs/sha256:" + "0" * 64, 404, "BLOB_UNKNOWN"),
        ("/v2/no/such/repo/tags/list", 404, "NAME_UNKNOWN"),
        ("/v2/_catalog?n=-x", 400, "PAGINATION_NUMBER_INVALID"),
    ],
)
async def test_bad_input_and_missing_content(
    mirror: Mirror, seeded: Seeded, http: aiohttp.ClientSession, path: str, status: int, code: str
) -> None:
    for method in ("GET", "HEAD"):
        async with http.request(method, mirror.url + path) as response:
            assert response.status == status
            if method == "GET":
                assert (await _error(response))["code"] == code
    assert not any((mirror.storage / "tmp").iterdir())


async def test_unreachable_upstream_is_502_naming_it(
    make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    mirror = await make_mirror({"docker.io": f"http://127.0.0.1:{port}"})
    errors = []
    for path in ("/v2/alpine/manifests/1", "/v2/alpine/blobs/sha256:" + "1" * 64):
        async with http.get(mirror.url + path) as response:
            assert response.status == 502
            errors.append(await _error(response))
    assert all("docker.io" in error["message"] for error in errors)
    # why, in words an operator reads (not ClientConnectorError), naming the host
    first = errors[0]
    assert first["detail"]["host"] == f"127.0.0.1:{port}"
    assert first["detail"]["cause"].startswith("connection refused")
    assert "Error" not in first["message"] and "Error" not in errors[1]["message"]


async def test_silent_upstream_is_504_within_the_read_timeout(
    make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        mirror = await make_mirror(
            {"docker.io": f"http://127.0.0.1:{port}"}, timeouts={"connect": 1, "read": 1}
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with http.get(f"{mirror.url}/v2/alpine/manifests/1") as response:
            assert response.status == 504
            assert "docker.io" in (await _error(response))["message"]
        assert loop.time() - started < 5


@pytest.mark.in_process  # moves the mirror's clock past the failed upstream's back-off
async def test_failing_upstream_is_502_and_429_is_passed_on(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    relay = await make_relay(upstream.url, status=503)
    mirror = await make_mirror({"docker.io": relay.url}, clock=clock)
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.20") as response:
        assert response.status == 502
        assert "docker.io" in (await _error(response))["message"]
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.20") as response:
        assert response.status == 502  # down: not asked again for a second
        assert response.headers["Retry-After"] == "1"
    assert relay.count("GET", "/manifests/") == 1
    clock.advance(1.5)
    relay.faults.status = 429
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.20") as response:
        assert response.status == 429
        assert (await _error(response))["code"] == "TOOMANYREQUESTS"


async def test_manifest_headers_and_local_head(
    mirror: Mirror, seeded: Seeded, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    url = f"{mirror.url}/v2/team/app/manifests/v1"
    accept = {"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}, {OCI_INDEX}"}
    async with http.get(url, headers=accept) as response:
        assert response.status == 200
        assert await response.read() == seeded.docker.manifest
        assert response.headers["Content-Type"] == DOCKER_MANIFEST
        assert response.headers["Docker-Content-Digest"] == seeded.docker.digest
        assert response.headers["Content-Length"] == str(len(seeded.docker.manifest))
    mark = upstream.mark()
    for reference in ("v1", seeded.docker.digest):
        async with http.head(
            f"{mirror.url}/v2/team/app/manifests/{reference}", headers=accept
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == DOCKER_MANIFEST
            assert r.headers["Docker-Content-Digest"] == seeded.docker.digest
            assert r.headers["Content-Length"] == str(len(seeded.docker.manifest))
            assert await r.read() == b""
    # (the layers the GET's prefetch fetches may still be arriving: only manifests count)
    assert [hit for hit in upstream.hits(mark) if "/manifests/" in hit.path] == []


async def test_uncached_head_of_a_tag_does_not_get_the_manifest(
    mirror: Mirror, seeded: Seeded, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    mark = upstream.mark()
    async with http.head(f"{mirror.url}/v2/ghcr.io/team/app/manifests/v1") as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == seeded.docker.digest
        assert response.headers["Content-Length"] == str(len(seeded.docker.manifest))
    assert [(h.method, h.path) for h in upstream.hits(mark)] == [
        ("HEAD", "/v2/team/app/manifests/v1")
    ]


async def test_tag_revalidates_with_one_head_after_the_ttl(
    make_mirror: MirrorFactory, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    pusher = Pusher(upstream.url)
    first = pusher.image("ttl/app", "moving")
    # (no prefetch: its layer fetches, late on a busy machine, are not what is counted)
    mirror = await make_mirror({"docker.io": upstream.url}, manifest_ttl=0, prefetch=False)
    url = f"{mirror.url}/v2/ttl/app/manifests/moving"
    async with http.get(url) as response:
        assert response.headers["Docker-Content-Digest"] == first.digest
    mark = upstream.mark()
    async with http.get(url) as response:
        assert await response.read() == first.manifest
    assert [(h.method, h.path) for h in upstream.hits(mark)] == [
        ("HEAD", "/v2/ttl/app/manifests/moving")
    ]
    second = pusher.image("ttl/app", "moving")  # retag
    async with http.get(url) as response:
        assert response.headers["Docker-Content-Digest"] == second.digest
        assert await response.read() == second.manifest


async def test_corrupt_manifest_is_refused_and_not_kept(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url, corrupt_manifests=True)
    mirror = await make_mirror({"docker.io": relay.url})
    for reference in ("v1", seeded.docker.digest):
        async with http.get(f"{mirror.url}/v2/team/app/manifests/{reference}") as response:
            assert response.status == 502
            assert "does not match" in (await _error(response))["message"]
    assert not any(p.is_file() for p in (mirror.storage / "manifests").rglob("*"))
    relay.faults.corrupt_manifests = False
    async with http.get(f"{mirror.url}/v2/team/app/manifests/v1") as response:
        body = await response.read()
    assert "sha256:" + hashlib.sha256(body).hexdigest() == seeded.docker.digest


async def test_tags_list_pagination_keeps_the_client_path(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url, paginate_tags=True)
    mirror = await make_mirror({"docker.io": upstream.url, "ghcr.io": relay.url})
    pusher = Pusher(upstream.url)
    for tag in ("a", "b", "c"):
        pusher.image("paged/repo", tag, layer_sizes=(16,))
    async with http.get(f"{mirror.url}/v2/ghcr.io/paged/repo/tags/list?n=2") as response:
        assert response.status == 200
        assert await response.json() == {"name": "paged/repo", "tags": ["a", "b"]}
        link = response.headers["Link"]
    assert link.startswith("</v2/ghcr.io/paged/repo/tags/list?")
    assert 'rel="next"' in link
    next_url = mirror.url + link[1 : link.index(">")]
    async with http.get(next_url) as response:
        assert await response.json() == {"name": "paged/repo", "tags": ["c"]}
        assert "Link" not in response.headers
    # The reference registry (2.8) does not page, and answers the tag named by last too:
    # the mirror pages its answer as the spec says.
    seen, url = [], f"{mirror.url}/v2/paged/repo/tags/list?n=2"
    while True:
        async with http.get(url) as response:
            page = (await response.json())["tags"]
            assert len(page) <= 2
            seen += page
            link = response.headers.get("Link")
        if link is None:
            break
        url = mirror.url + link[1 : link.index(">")]
    assert seen == ["a", "b", "c"]
    async with http.get(f"{mirror.url}/v2/paged/repo/tags/list?n=1&last=a") as response:
        assert (await response.json())["tags"] == ["b"]
    async with http.get(f"{mirror.url}/v2/paged/repo/tags/list?last=c") as response:
        assert (await response.json())["tags"] == []


async def test_schema1_only_client_gets_a_verified_converted_manifest(
    mirror: Mirror, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    schema1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
    url = f"{mirror.url}/v2/team/app/manifests/v1"
    async with http.get(url, headers={"Accept": schema1}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == schema1
        digest = response.headers["Docker-Content-Digest"]
    # served again from the cache by its digest, with the same bytes
    async with http.get(f"{mirror.url}/v2/team/app/manifests/{digest}") as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == schema1


async def test_referrers_unsupported_upstream_is_an_oci_404(
    mirror: Mirror, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    url = f"{mirror.url}/v2/team/app/referrers/{seeded.docker.digest}"
    async with http.get(url) as response:
        assert response.status == 404
        await _error(response)
