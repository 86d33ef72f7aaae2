"""The status page with worker processes: each worker's live state (upstream health, most
requested repositories, transfers) shown whichever worker answers the page."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.app import STORE
from mirror.snapshots import merged
from tests.conftest import MirrorFactory, Seeded
from tests.support.process import MirrorProcess
from tests.support.registry import Registry


def _state(**upstream: Any) -> dict[str, Any]:
    health = {
        "reachable": None,
        "last_error": "",
        "retry_at": 0.0,
        "last_answer": None,
        "ratelimit_limit": None,
        "ratelimit_remaining": None,
        **upstream,
    }
    return {
        "pid": 1,
        "written": 100.0,
        "upstreams": {"docker.io": health},
        "popular": [["docker.io/library/alpine", 3], ["docker.io/team/app", 1]],
        "transfers": 1,
        "waiting": 2,
    }


def test_workers_states_add_up_and_a_worker_backing_off_shows_down() -> None:
    up = _state(reachable=True, last_answer=90.0, ratelimit_limit=100, ratelimit_remaining=7)
    down = _state(
        reachable=False,
        last_error="no answer",
        retry_at=130.0,
        last_answer=80.0,
        down_since=85.0,
        errors=[[85.0, "answered 503"], [95.0, "no answer"]],
    )
    view = merged(up, [down], now=100.0)
    health = view.upstreams["docker.io"]
    assert (health.reachable, health.last_error, health.retry_at) == (False, "no answer", 130.0)
    assert health.down_since == 85.0
    assert view.errors == [(95.0, "docker.io", "no answer"), (85.0, "docker.io", "answered 503")]
    assert (health.last_answer, health.ratelimit_remaining) == (90.0, 7)  # the latest answer
    assert view.popular == [("docker.io/library/alpine", 6), ("docker.io/team/app", 2)]
    assert (view.transfers, view.waiting, view.workers) == (2, 4, 2)
    # once the back-off is over, a worker that found it up since is believed
    later = merged(up, [down], now=200.0)
    assert later.upstreams["docker.io"].reachable is True
    assert later.upstreams["docker.io"].down_since is None
    assert merged(down, [up], now=200.0).upstreams["docker.io"].reachable is True


async def test_the_status_page_counts_every_workers_requests(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": 2,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": upstream.url}},
        },
    ).start()
    pulls = 24
    try:
        for _ in range(pulls):  # a new connection each: the kernel spreads them
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{mirror.url}/v2/team/app/manifests/{seeded.docker.digest}") as r,
            ):
                assert r.status == 200

        async def counts() -> list[int]:
            shown = []
            for _ in range(6):
                async with aiohttp.ClientSession() as http, http.get(f"{mirror.url}/") as r:
                    page = await r.text()
                found = re.search(r"docker\.io/team/app</td><td[^>]*>(\d+)<", page)
                shown.append(int(found[1]) if found and "(2 workers)" in page else 0)
            return shown

        # each worker writes its snapshot every second: within a few, any worker's page
        # counts them all
        seen: list[list[int]] = []
        for _ in range(20):
            seen.append(await counts())
            if seen[-1] == [pulls] * 6:
                break
            await asyncio.sleep(0.5)
        assert seen[-1] == [pulls] * 6, seen
    finally:
        await mirror.stop()


@pytest.mark.in_process  # reads the server's store
async def test_the_status_page_lists_cached_images_without_making_them_used(
    make_mirror: MirrorFactory, upstream: Registry, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    """The cached images, most recently used first, as `mirror ls` has them; looking at
    the page is not a use (it would make every image recently used, and the LRU blind)."""
    # (no prefetch: its layers would land in the store while the test looks)
    mirror = await make_mirror({"docker.io": {"url": upstream.url, "prefetch": False}})
    accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
    async with http.get(f"{mirror.url}/v2/team/app/manifests/v1", headers=accept) as r:
        assert r.status == 200
    store = mirror.app[STORE]
    store.flush_uses()
    before = {entry.key: entry.atime for entry in store.oldest(100, used_before=1e12)}
    async with http.get(f"{mirror.url}/") as response:
        page = await response.text()
    assert "Cached images, most recently used first" in page
    assert "docker.io/team/app:v1" in page
    store.flush_uses()
    after = {entry.key: entry.atime for entry in store.oldest(100, used_before=1e12)}
    assert after == before


async def test_each_upstream_has_its_hit_ratio_and_bytes_from_the_cache(
    make_mirror: MirrorFactory, upstream: Registry, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror({"docker.io": {"url": upstream.url, "prefetch": False}})
    url = f"{mirror.url}/v2/team/app/manifests/{seeded.docker.digest}"
    for expected in ("miss", "hit", "hit", "hit"):
        async with http.get(url) as response:
            assert response.headers["X-Mirror-Cache"] == expected
    async with http.get(f"{mirror.url}/") as response:
        page = await response.text()
    row = re.search(r"<tr><td>docker\.io</td>.*?</tr>", page)
    assert row is not None, page
    cells = re.findall(r"<td[^>]*>([^<]*)</td>", row[0])
    size = len(seeded.docker.manifest)
    assert cells[2:4] == ["75%", f"{3 * size / 1024:.1f} KiB"], cells
