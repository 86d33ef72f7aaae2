"""The mirror keeps working when the upstream does not: stale answers, negative caching,
offline mode, and blob transfers that resume after a cut or a stall."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import MirrorFactory, RelayFactory, Seeded
from tests.support.clients import CommandFailed, skopeo_copy_to_dir
from tests.support.clock import ManualClock
from tests.support.images import Image, Pusher
from tests.support.registry import Registry


@pytest.fixture
def own_upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry this test may stop and start."""
    registry = Registry(tmp_path / "own-upstream")
    yield registry
    registry.stop()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, dict[str, str]]:
    async with http.get(url) as response:
        return response.status, await response.read(), dict(response.headers)


async def test_upstream_stopped_cached_pulls_work_uncached_fail_fast(
    make_mirror: MirrorFactory, own_upstream: Registry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    image = Pusher(own_upstream.url).image("team/offline", "1")
    mirror = await make_mirror({"docker.io": own_upstream.url}, manifest_ttl=0)
    assert await skopeo_copy_to_dir(f"{mirror.host}/team/offline:1", tmp_path / "a") == image.digest
    own_upstream.stop()

    # the tag is past its TTL, the upstream is gone: the last known answer is served
    assert await skopeo_copy_to_dir(f"{mirror.host}/team/offline:1", tmp_path / "b") == image.digest
    reference = f"{mirror.host}/team/offline@{image.digest}"
    assert await skopeo_copy_to_dir(reference, tmp_path / "c") == image.digest
    status, body, headers = await _get(http, f"{mirror.url}/v2/team/offline/manifests/1")
    assert status == 200 and body == image.manifest
    assert headers["X-Mirror-Cache"] == "stale"

    started = time.monotonic()
    status, body, _ = await _get(http, f"{mirror.url}/v2/team/offline/manifests/2")
    assert status in (502, 504)
    assert b'"errors"' in body and b"docker.io" in body
    with pytest.raises(CommandFailed):
        await skopeo_copy_to_dir(f"{mirror.host}/team/never:1", tmp_path / "d")
    assert time.monotonic() - started < 10


async def test_restart_with_upstream_down_serves_stale(
    make_mirror: MirrorFactory, own_upstream: Registry, tmp_path: Path
) -> None:
    image = Pusher(own_upstream.url).image("team/restart", "1")
    storage = tmp_path / "kept-cache"
    first = await make_mirror({"docker.io": own_upstream.url}, storage=storage, manifest_ttl=0)
    assert await skopeo_copy_to_dir(f"{first.host}/team/restart:1", tmp_path / "a") == image.digest
    await first.stop()
    own_upstream.stop()
    # a new mirror process over the same store; it must start with its upstream down
    second = await make_mirror({"docker.io": own_upstream.url}, storage=storage, manifest_ttl=0)
    digest = await skopeo_copy_to_dir(f"{second.host}/team/restart:1", tmp_path / "b")
    assert digest == image.digest


@pytest.mark.parametrize("status", [503, 500, 429, 401])
async def test_failing_upstream_serves_stale(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
    status: int,
) -> None:
    relay = await make_relay(upstream.url)
    mirror = await make_mirror({"docker.io": relay.url}, manifest_ttl=0)
    url = f"{mirror.url}/v2/team/app/manifests/v1"
    assert (await _get(http, url))[0] == 200
    relay.faults.status = status
    code, body, headers = await _get(http, url)
    assert code == 200 and body == seeded.docker.manifest
    assert headers["X-Mirror-Cache"] == "stale"
    assert headers["Docker-Content-Digest"] == seeded.docker.digest


async def test_upstream_404_for_cached_tag_wins_unless_configured(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url)
    default = await make_mirror({"docker.io": relay.url}, manifest_ttl=0)
    keeping = await make_mirror(
        {"docker.io": {"url": relay.url, "serve_stale_on_404": True}}, manifest_ttl=0
    )
    for mirror in (default, keeping):
        assert (await _get(http, f"{mirror.url}/v2/team/app/manifests/v1"))[0] == 200
    relay.faults.status = 404
    status, body, _ = await _get(http, f"{default.url}/v2/team/app/manifests/v1")
    assert status == 404 and b"MANIFEST_UNKNOWN" in body
    status, body, headers = await _get(http, f"{keeping.url}/v2/team/app/manifests/v1")
    assert status == 200 and body == seeded.docker.manifest
    assert headers["X-Mirror-Cache"] == "stale"


@pytest.mark.in_process  # moves the mirror's clock
async def test_missing_manifest_is_remembered_briefly(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    relay = await make_relay(upstream.url)
    mirror = await make_mirror({"docker.io": relay.url}, negative_ttl=30, clock=clock)
    url = f"{mirror.url}/v2/team/app/manifests/not-there"
    for _ in range(5):
        status, body, _ = await _get(http, url)
        assert status == 404 and b"MANIFEST_UNKNOWN" in body
    assert relay.count("GET", "/manifests/not-there") == 1
    clock.advance(29)
    assert (await _get(http, url))[0] == 404
    assert relay.count("GET", "/manifests/not-there") == 1  # still remembered
    clock.advance(2)
    assert (await _get(http, url))[0] == 404
    assert relay.count("GET", "/manifests/not-there") == 2


async def test_offline_mode_never_contacts_the_upstream(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url)
    storage = tmp_path / "air-gapped"
    online = await make_mirror({"docker.io": relay.url}, storage=storage)
    assert await skopeo_copy_to_dir(f"{online.host}/team/app:v1", tmp_path / "a")
    await online.stop()
    relay.requests.clear()
    offline = await make_mirror({"docker.io": relay.url}, storage=storage, offline=True)
    digest = await skopeo_copy_to_dir(f"{offline.host}/team/app:v1", tmp_path / "b")
    assert digest == seeded.docker.digest
    status, body, _ = await _get(http, f"{offline.url}/v2/library/alpine/manifests/3.20")
    assert status == 404 and b"offline" in body
    layer = seeded.oci.layers[0]
    status, body, _ = await _get(http, f"{offline.url}/v2/library/alpine/blobs/{layer}")
    assert status == 404 and b"BLOB_UNKNOWN" in body
    status, body, _ = await _get(http, f"{offline.url}/v2/library/alpine/tags/list")
    assert status == 404 and b"offline" in body
    assert relay.requests == []


async def test_ttl_rules_per_tag_pattern(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
) -> None:
    pusher = Pusher(upstream.url)
    pusher.image("rules/app", "latest", layer_sizes=(10,))
    pusher.image("rules/app", "1.0", layer_sizes=(10,))
    relay = await make_relay(upstream.url)
    mirror = await make_mirror(
        {"docker.io": relay.url},
        manifest_ttl=300,
        manifest_ttl_rules=[{"match": "*:latest", "ttl": 0}],
    )
    for tag in ("latest", "1.0"):
        for _ in range(3):
            assert (await _get(http, f"{mirror.url}/v2/rules/app/manifests/{tag}"))[0] == 200
    assert relay.count("HEAD", "/manifests/latest") == 2  # revalidated each later time
    assert relay.count("HEAD", "/manifests/1.0") == 0  # trusted for 300 s
    assert relay.count("GET", "/manifests/") == 2  # bodies fetched once each


@pytest.mark.in_process  # revalidations are shared within one process; moves its clock
async def test_concurrent_revalidations_share_one_head(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    relay = await make_relay(upstream.url)
    mirror = await make_mirror({"docker.io": relay.url}, manifest_ttl=300, clock=clock)
    url = f"{mirror.url}/v2/team/app/manifests/v1"
    await _get(http, url)
    clock.advance(299)
    await _get(http, url)
    assert relay.count("HEAD") == 0  # still fresh
    clock.advance(2)
    before = relay.count("HEAD")
    results = await asyncio.gather(*(_get(http, url) for _ in range(10)))
    assert all(status == 200 for status, _, _ in results)
    assert relay.count("HEAD") - before == 1


def _layer(image: Image) -> tuple[str, bytes]:
    digest = image.layers[0]
    return digest, image.blobs[digest]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut_after", "stall_after"])
async def test_cut_or_stalled_transfer_resumes_with_range(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    fault: str,
) -> None:
    relay = await make_relay(upstream.url, **{fault: 5 * 1024 * 1024})
    # no prefetch: the fault applies to the first blob body, which must be the layer's
    mirror = await make_mirror(
        {"docker.io": {"url": relay.url, "prefetch": False, "range_connections": 1}},
        timeouts={"read": 1},
    )
    digest = await skopeo_copy_to_dir(f"{mirror.host}/big/layer:1", tmp_path / "out")
    assert digest == seeded.big.digest
    layer, data = _layer(seeded.big)
    stored = (tmp_path / "out" / layer.removeprefix("sha256:")).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == layer.removeprefix("sha256:")
    assert len(stored) == len(data)
    ranges = [value for path, value in relay.ranges if layer in path]
    assert len(ranges) == 1 and ranges[0].startswith("bytes=") and ranges[0] != "bytes=0-"
    assert relay.count("GET", layer) == 2  # the first transfer, and one resume


@pytest.mark.in_process  # the bound is per worker process
async def test_transfers_per_upstream_are_bounded(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url, rate=20 * 1024)  # a few KB each: ~0.2 s a blob
    mirror = await make_mirror({"docker.io": {"url": relay.url, "max_transfers": 2}})
    blobs = seeded.index.all_blobs()  # six small blobs of one repository
    results = await asyncio.gather(
        *(_get(http, f"{mirror.url}/v2/multi/arch/blobs/{digest}") for digest in blobs)
    )
    assert [body for _, body, _ in results] == list(blobs.values())
    assert relay.most_blob_bodies_in_flight == 2
    unbounded = await make_mirror({"docker.io": relay.url})
    relay.most_blob_bodies_in_flight = 0
    await asyncio.gather(
        *(_get(http, f"{unbounded.url}/v2/multi/arch/blobs/{digest}") for digest in blobs)
    )
    assert relay.most_blob_bodies_in_flight > 2  # the bound above was the mirror's doing
