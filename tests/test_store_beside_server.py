"""Maintenance beside a live server: `mirror du`, `verify` and `gc` never touch the server's
work in progress, the server sees what gc evicted (and counts it), and its event loop stays
responsive while gc works through a large cache."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mirror.app import STORE
from mirror.reference import digest_of
from mirror.store.disk import DiskStore
from tests.conftest import MirrorFactory, Seeded
from tests.support.process import mirror_command
from tests.support.registry import Registry


def _config(tmp_path: Path, storage: Path) -> Path:
    path = tmp_path / "maintenance.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(storage), "max_size": "10GiB"},
                "upstreams": {"docker.io": {"url": "http://127.0.0.1:9"}},
            }
        )
    )
    return path


async def test_maintenance_leaves_a_live_servers_work_in_progress(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    server = DiskStore(root, 10 << 30)  # stands for the server: it holds what it writes
    data = os.urandom(100_000)
    filling = server.begin_blob(digest_of(data))
    assert filling is not None
    filling.write(data[:50_000])
    manifest_temp = root / "tmp" / f"0123abcd.{os.getpid()}.tmp"  # a manifest being written
    manifest_temp.write_bytes(b"{}")
    committing = f"blob:{digest_of(b'being renamed into place')}"
    server.index.begin(committing, 24)  # recorded as pending; the rename comes next
    config = _config(tmp_path, root)
    for command in (("du",), ("verify",), ("gc", "--max-size", "5GiB")):
        result = await mirror_command(config, *command)
        assert result.returncode in (0, 1), result.stderr
        assert filling.path.exists(), command
        assert manifest_temp.exists(), command
        assert server.index.is_pending(committing), command
    filling.write(data[50_000:])
    assert filling.commit() is True
    server.close()


@pytest.mark.in_process  # reads the server's store
async def test_gc_beside_a_live_server_is_seen_and_counted_by_it(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    mirror = await make_mirror({"docker.io": upstream.url})
    image = seeded.oci
    url = f"{mirror.url}/v2/library/alpine/manifests/{image.digest}"
    async with http.get(url) as response:
        assert response.status == 200 and await response.read() == image.manifest
    result = await mirror_command(_config(tmp_path, mirror.storage), "gc", "--max-size", "1")
    assert result.returncode == 0, result.stderr
    mark = upstream.mark()
    async with http.get(url) as response:  # gone from the store: asked upstream again
        assert response.status == 200 and await response.read() == image.manifest
        assert response.headers["X-Mirror-Cache"] == "miss"
    assert [h.path for h in upstream.hits(mark) if h.method == "GET"] == [
        f"/v2/library/alpine/manifests/{image.digest}"
    ]
    async with http.get(f"{mirror.url}/metrics") as response:
        text = await response.text()
    evicted = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert evicted["mirror_cache_evictions_total"] >= 1
    assert mirror.app[STORE].evictions()[0] >= 1


def _fill_index(root: Path, entries: int) -> None:
    """`entries` old rows in the store's index, as a large cache has (no files needed:
    eviction of a missing file is a no-op)."""
    DiskStore(root, 10 << 30).close()
    db = sqlite3.connect(root / "lru.sqlite")
    with db:
        db.executemany(
            "INSERT INTO entries (key, size, atime, pending) VALUES (?, 1000, ?, 0)",
            (
                (f"blob:{digest_of(str(n).encode())}", 1000.0 + n)  # used in 1970
                for n in range(entries)
            ),
        )
    db.close()


@pytest.mark.in_process  # times this process's event loop
async def test_the_loop_stays_responsive_while_gc_runs_beside_it(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    root = tmp_path / "big-cache"
    _fill_index(root, 30_000)
    mirror = await make_mirror({"docker.io": upstream.url}, storage=root)
    mirror.app[STORE].index.flush_seconds = 0  # hits write their access times at once
    base = f"{mirror.url}/v2/library/alpine"
    hits = [f"{base}/manifests/3.20", f"{base}/blobs/{seeded.oci.layers[0]}"]
    for url in hits:
        async with http.get(url) as response:
            assert response.status == 200
    gc = asyncio.create_task(mirror_command(_config(tmp_path, root), "gc", "--older-than", "86400"))
    slowest = {"/healthz": 0.0, "hit": 0.0}
    rounds = 0
    while not gc.done():
        for name, url in (("/healthz", f"{mirror.url}/healthz"), ("hit", hits[rounds % 2])):
            started = time.monotonic()
            async with http.get(url) as response:
                assert response.status == 200
                await response.read()
            slowest[name] = max(slowest[name], time.monotonic() - started)
        rounds += 1
        await asyncio.sleep(0.005)
    result = await gc
    assert "evicted 30000 entries" in result.stdout, result.stdout + result.stderr
    assert rounds >= 20, "gc ended before the loop was probed"
    print(f"\nslowest answers while gc evicted 30,000 entries: {slowest}")
    assert slowest["/healthz"] < 0.05, slowest
    assert slowest["hit"] < 0.1, slowest
