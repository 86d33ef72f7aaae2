"""Prefetch: an image manifest passing through the mirror starts its layers' transfers, so
a client finds them arriving or kept; never for an index, nor when turned off."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MirrorFactory, Seeded
from tests.support.registry import Registry
from tests.support.waiting import until

ACCEPT = {
    "Accept": "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.oci.image.index.v1+json"
}


def _blob_gets(upstream: Registry, mark: int, settle: float = 0.3) -> list[str]:
    return [hit.path for hit in upstream.hits(mark, settle=settle) if "/blobs/" in hit.path]


def _counter(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    return 0.0


async def test_a_manifest_starts_its_layers_and_the_client_finds_them(
    make_mirror: MirrorFactory, upstream: Registry, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror({"docker.io": upstream.url})
    image = seeded.docker
    mark = upstream.mark()
    async with http.get(f"{mirror.url}/v2/team/app/manifests/v1", headers=ACCEPT) as response:
        assert response.status == 200
    wanted = set(image.blobs)  # config and layers
    await until(
        lambda: {path.rsplit("/", 1)[1] for path in _blob_gets(upstream, mark, 0)} >= wanted,
        "every layer was asked for without a client asking",
    )
    for digest, data in image.blobs.items():
        async with http.get(f"{mirror.url}/v2/team/app/blobs/{digest}") as response:
            assert await response.read() == data
            assert response.headers["X-Mirror-Cache"] in ("hit", "coalesced")
    assert sorted(_blob_gets(upstream, mark)) == sorted(
        f"/v2/team/app/blobs/{digest}" for digest in image.blobs
    )  # each once
    # Prefetched bytes count once a fill is kept (after its fsync), which may come just
    # after its client had its last byte.
    fetched = sum(len(data) for data in image.blobs.values())
    counters: dict[str, float] = {}

    async def scrape() -> None:
        async with http.get(f"{mirror.url}/metrics") as response:
            text = await response.text()
        for name in ("mirror_prefetch_hits_total", "mirror_prefetched_bytes_total"):
            counters[name] = _counter(text, name)

    await scrape()
    for _ in range(100):
        if counters["mirror_prefetched_bytes_total"] == fetched:
            break
        await asyncio.sleep(0.05)
        await scrape()
    assert counters == {
        "mirror_prefetch_hits_total": len(image.blobs),
        "mirror_prefetched_bytes_total": fetched,
    }


@pytest.mark.parametrize("settings", [{"prefetch": False}, {}], ids=["off", "index"])
async def test_no_prefetch_when_off_or_for_an_index(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
    settings: dict[str, bool],
) -> None:
    mirror = await make_mirror({"docker.io": {"url": upstream.url, **settings}})
    path = "/v2/team/app/manifests/v1" if settings else "/v2/multi/arch/manifests/latest"
    mark = upstream.mark()
    async with http.get(f"{mirror.url}{path}", headers=ACCEPT) as response:
        assert response.status == 200
    assert _blob_gets(upstream, mark) == []
