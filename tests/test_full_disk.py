"""A full disk degrades to serving: what is cached is served, what cannot be kept is
streamed through in a bounded window, and everything recovers when space returns."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from mirror.app import STORE
from mirror.reference import MANIFEST_TYPES, Digest, parse_digest
from tests.conftest import MirrorFactory, Seeded
from tests.support import memory
from tests.support.fake_upstream import Body, FakeUpstream, generated_digest
from tests.support.images import Pusher
from tests.support.registry import Registry
from tests.support.waiting import until

MiB = 1024 * 1024
GiB = 1024 * MiB
ACCEPT = ", ".join(MANIFEST_TYPES)


def _fill_up(where: Path) -> Path:
    """Write a file until the file system has no space left; its removal frees it."""
    filler = where / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * MiB)
                out.flush()
        except OSError:
            pass
    while True:  # the last few KiB, byte by byte in pieces
        try:
            with filler.open("ab") as out:
                out.write(b"\0" * 4096)
        except OSError:
            return filler


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str, bytes]:
    """Status, sha256 of the body, and the body's first bytes."""
    hasher = hashlib.sha256()
    head = b""
    async with http.get(url, headers={"Accept": ACCEPT}) as response:
        async for chunk in response.content.iter_chunked(MiB):
            hasher.update(chunk)
            head = head or chunk[:200]
        return response.status, "sha256:" + hasher.hexdigest(), head


async def _ready(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(f"{url}/readyz") as response:
        return response.status, (await response.json())["store"]


@pytest.mark.in_process  # reads the store's counters
async def test_a_full_disk_serves_what_is_cached_and_streams_the_rest(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    tmpfs: Callable[[str], Path],
    http: aiohttp.ClientSession,
) -> None:
    disk = tmpfs("16m")
    mirror = await make_mirror(
        {"docker.io": upstream.url}, storage=disk / "cache", manifest_ttl=0, negative_ttl=0
    )
    base = f"{mirror.url}/v2/library/alpine"
    image, other = seeded.oci, seeded.docker
    layer = image.layers[0]
    assert (await _get(http, f"{base}/manifests/3.20"))[:2] == (200, image.digest)
    assert (await _get(http, f"{base}/blobs/{layer}"))[:2] == (200, layer)
    # the same manifest under a second tag, asked for only once the disk is full
    Pusher(upstream.url).push_manifest("library/alpine", "alias", image.manifest, image.media_type)
    filler = _fill_up(disk)
    store = mirror.app[STORE]
    store.index.flush_seconds = -1  # every hit writes its access time (and cannot)
    usage = store.usage()

    # cached: served (the tag, past its TTL, revalidated; its record cannot be written)
    for _ in range(3):
        assert (await _get(http, f"{base}/blobs/{layer}"))[:2] == (200, layer)
        assert (await _get(http, f"{base}/manifests/3.20"))[:2] == (200, image.digest)
        assert (await _get(http, f"{base}/manifests/{image.digest}"))[:2] == (200, image.digest)
        store.flush_uses()  # the hits' access times cannot be written: no error either
    # a new tag for a kept manifest: served, and the kept copy is not lost on the way
    assert (await _get(http, f"{base}/manifests/alias"))[:2] == (200, image.digest)
    async with http.get(f"{base}/manifests/{image.digest}", headers={"Accept": ACCEPT}) as answer:
        assert answer.headers["X-Mirror-Cache"] == "hit"
    # unknown: 404, as ever
    status, _, body = await _get(http, f"{base}/manifests/no-such-tag")
    assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    # new: streamed through, exact, not kept
    new = f"{mirror.url}/v2/team/app"
    assert (await _get(http, f"{new}/manifests/v1"))[:2] == (200, other.digest)
    for blob in other.blobs:
        assert (await _get(http, f"{new}/blobs/{blob}"))[:2] == (200, blob)
    assert store.counters.disk_full > 0
    assert store.usage() == usage  # nothing it could not keep is counted as kept
    assert await _ready(http, mirror.url) == (200, "degraded")
    assert not [p for p in (disk / "cache" / "tmp").iterdir() if p.suffix == ".part"]

    # space returns: kept again, and ready says so
    filler.unlink()
    assert await _ready(http, mirror.url) == (200, "ok")
    for blob in other.blobs:
        assert (await _get(http, f"{new}/blobs/{blob}"))[:2] == (200, blob)
    # the fill's commit runs just after its client had it
    await until(lambda: all(store.has_blob(_digest(b)) for b in other.blobs), "all are kept")
    assert not store.counters.full


def _digest(text: str) -> Digest:
    digest = parse_digest(text)
    assert digest is not None
    return digest


@pytest.mark.in_process  # measures this process's memory
@pytest.mark.slow
@pytest.mark.parametrize("case", ["disk-fills", "over-the-bound"])
async def test_a_gigabyte_that_cannot_be_kept_streams_through_in_bounded_memory(
    make_mirror: MirrorFactory,
    fake: FakeUpstream,
    tmpfs: Callable[[str], Path],
    http: aiohttp.ClientSession,
    case: str,
) -> None:
    disk = tmpfs("32m")
    blob = Body(generated=GiB, content_type="application/octet-stream", digest_header=False)
    digest = await asyncio.to_thread(generated_digest, GiB)
    fake.set("GET", f"/v2/big/blob/blobs/{digest}", blob)
    max_size = "10GiB" if case == "disk-fills" else "16MiB"
    mirror = await make_mirror({"docker.io": fake.url}, storage=disk / "cache", max_size=max_size)
    tmp = disk / "cache" / "tmp"
    await _get(http, f"{mirror.url}/v2/")
    memory.reset_peak()
    before = memory.peak()
    seen_parts: list[int] = []  # bytes of temporaries in the store, every 128 MiB
    hasher = hashlib.sha256()
    received = 0
    async with http.get(f"{mirror.url}/v2/big/blob/blobs/{digest}") as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(MiB):
            hasher.update(chunk)
            received += len(chunk)
            if received >= (len(seen_parts) + 1) * 128 * MiB:
                seen_parts.append(sum(p.stat().st_size for p in tmp.glob("*.part")))
    assert (received, "sha256:" + hasher.hexdigest()) == (GiB, digest)
    grew = memory.peak() - before
    assert grew < 100 * MiB, f"peak resident memory grew by {grew / MiB:.0f} MiB"
    assert max(seen_parts) == 0, seen_parts  # the temporary went at once, not at the end
    assert mirror.app[STORE].has_blob(_digest(digest)) is False
    print(f"\n{case}: peak resident memory grew by {grew / MiB:.1f} MiB for a 1 GiB pull")
    await until(lambda: os.statvfs(disk).f_bfree > 0, "the removed temporary's space is back")


@pytest.mark.in_process  # sets the store's bound below the blob
async def test_a_client_that_stops_reading_does_not_hold_a_transfer_that_is_not_kept(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    """Streamed through (larger than the store), the transfer waits for its slowest reader
    only `timeouts.read`; then that reader is dropped and the others go on."""
    size = 96 * MiB
    digest = await asyncio.to_thread(generated_digest, size)
    fake.set(
        "GET",
        f"/v2/big/blob/blobs/{digest}",
        Body(generated=size, content_type="application/octet-stream"),
    )
    mirror = await make_mirror(
        {"docker.io": fake.url}, max_size="8MiB", timeouts={"connect": 1, "read": 1}
    )
    url = f"{mirror.url}/v2/big/blob/blobs/{digest}"
    async with aiohttp.ClientSession() as stuck_session:
        stuck = await stuck_session.get(url)
        await stuck.content.readexactly(MiB)  # then stops reading
        status, got, _ = await asyncio.wait_for(_get(http, url), 30)
        assert (status, got) == (200, digest)
        with pytest.raises(aiohttp.ClientPayloadError):
            while await stuck.content.read(MiB):
                pass
        stuck.release()
    assert fake.count("GET", "/blobs/") == 1
