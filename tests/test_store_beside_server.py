"""Maintenance beside a live server: `mirror du`, `verify` and `gc` never touch the server's
work in progress, the server sees what gc evicted (and counts it), and its event loop stays
responsive while gc works through a large cache."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mirror import maintenance
from mirror.app import STORE
from mirror.reference import digest_of
from mirror.store.disk import DiskStore
from tests.conftest import MirrorFactory, Seeded
from tests.support.process import mirror_command
from tests.support.registry import Registry
from tests.support.waiting import until


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
    # no prefetch: the upstream's requests after gc are the manifest's alone
    mirror = await make_mirror({"docker.io": {"url": upstream.url, "prefetch": False}})
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
    slowest = {"/healthz": 0.0, "hit": 0.0, "/metrics": 0.0}
    rounds = 0
    while not gc.done():
        probes = (
            ("/healthz", f"{mirror.url}/healthz"),
            ("hit", hits[rounds % 2]),
            ("/metrics", f"{mirror.url}/metrics"),  # reads the index's totals on the loop
        )
        for name, url in probes:
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
    assert slowest["hit"] < 0.1 and slowest["/metrics"] < 0.1, slowest


def test_verify_beside_a_server_that_evicts_reports_nothing_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files a live server (or gc) evicts while verify walks the store are gone, not
    corrupt: nothing is reported, nothing removed, nothing crashes."""
    root = tmp_path / "cache"
    store = DiskStore(root, 10 << 30)
    blobs = [os.urandom(50_000) for _ in range(6)]
    for data in blobs:
        temp = store.begin_blob(digest_of(data))
        assert temp is not None
        temp.write(data)
        assert temp.commit()
    manifest = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
    store.put_manifest(digest_of(manifest), manifest, "application/vnd.oci.image.manifest.v1+json")
    server = DiskStore(root, 10 << 30, repair=False)  # another process on the same store
    evicting = iter(server.oldest(100, used_before=time.time() + 10))
    check = store.check

    def check_while_the_server_evicts(key: str, progress: Callable[[int], None]) -> str:
        entry = next(evicting, None)  # the server evicts one entry more at every step
        if entry is not None:
            server.evict(entry)
        return check(key, progress)

    monkeypatch.setattr(store, "check", check_while_the_server_evicts)
    out = io.StringIO()
    report = maintenance.verify(store, out)
    assert (report.corrupt, report.missing) == (0, 0), out.getvalue()
    assert "removed" not in out.getvalue()
    server.close()
    store.close()


@pytest.mark.in_process  # reads the server's store
async def test_a_manifest_miss_does_not_wait_for_the_evictions_it_causes(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A store far over its bound (30,000 entries to evict, as after lowering max_size):
    the client is answered at once, the eviction runs on its own."""
    root = tmp_path / "over-the-bound"
    _fill_index(root, 30_000)
    mirror = await make_mirror({"docker.io": upstream.url}, storage=root, max_size="1MiB")
    started = time.monotonic()
    async with http.get(f"{mirror.url}/v2/library/alpine/manifests/{seeded.oci.digest}") as answer:
        assert answer.status == 200 and await answer.read() == seeded.oci.manifest
    assert time.monotonic() - started < 1.5
    store = mirror.app[STORE]
    await until(lambda: store.usage()[0] <= store.max_size, "the store is back under its bound")
