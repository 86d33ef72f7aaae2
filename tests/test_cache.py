"""The disk cache: bounded by an LRU, repaired after SIGKILL, checked by `mirror verify`,
and serving through a full disk without keeping anything partial."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mirror.app import STORE
from mirror.reference import Digest, parse_digest
from tests.conftest import MirrorFactory, RelayFactory, Seeded
from tests.support.clients import skopeo_copy_to_dir
from tests.support.clock import ManualClock
from tests.support.images import Image, Pusher
from tests.support.process import MirrorProcess
from tests.support.registry import Registry
from tests.support.waiting import until

MiB = 1024 * 1024


async def _sha256_of(http: aiohttp.ClientSession, url: str) -> tuple[int, str, int]:
    hasher = hashlib.sha256()
    size = 0
    async with http.get(url) as response:
        async for chunk in response.content.iter_any():
            hasher.update(chunk)
            size += len(chunk)
        return response.status, "sha256:" + hasher.hexdigest(), size


def _blob_gets(upstream: Registry, since: int, digest: str) -> int:
    return sum(1 for h in upstream.hits(since) if h.method == "GET" and digest in h.path)


@pytest.mark.in_process  # looks inside the store
@pytest.mark.slow
async def test_usage_stays_under_the_bound_and_the_oldest_are_refetched(
    make_mirror: MirrorFactory, upstream: Registry, tmp_path: Path, clock: ManualClock
) -> None:
    bound = 200 * MiB
    pusher = Pusher(upstream.url)
    images = [
        pusher.image(f"bound/img{i}", "1", layer_sizes=(42 * MiB,), compress=False)
        for i in range(10)
    ]  # 420 MiB: more than twice the bound
    upstreams = {"docker.io": {"url": upstream.url, "range_connections": 1}}  # GETs counted
    mirror = await make_mirror(upstreams, max_size=bound, clock=clock)
    store = mirror.app[STORE]
    peak = 0
    for index, image in enumerate(images):
        target = tmp_path / f"pull{index}"
        assert await skopeo_copy_to_dir(f"{mirror.host}/bound/img{index}:1", target) == image.digest
        for digest, data in image.blobs.items():
            assert (target / digest[7:]).read_bytes() == data
        used, _ = store.usage()
        assert used <= bound
        peak = max(peak, used)
        on_disk = sum(p.stat().st_size for p in mirror.storage.rglob("*") if p.is_file())
        assert on_disk - used < 10 * MiB  # the index's count is the files' real size
        clock.advance(2)  # past the eviction grace of the pull before
    newest, oldest = images[-1], images[0]
    assert all(store.has_blob(_digest(d)) for d in newest.blobs)
    assert not store.has_blob(_digest(oldest.layers[0]))
    mark = upstream.mark()
    target = tmp_path / "again"
    assert await skopeo_copy_to_dir(f"{mirror.host}/bound/img0:1", target) == oldest.digest
    assert _blob_gets(upstream, mark, oldest.layers[0]) == 1
    mark = upstream.mark()
    assert await skopeo_copy_to_dir(f"{mirror.host}/bound/img9:1", tmp_path / "new")
    assert _blob_gets(upstream, mark, newest.layers[0]) == 0
    evicted, evicted_bytes = store.evictions()
    assert evicted >= 5
    pulled = sum(len(blob) for image in images for blob in image.blobs.values())
    print(
        f"bound {bound / MiB:.0f} MiB, pulled {pulled / MiB:.0f} MiB: "
        f"peak usage {peak / MiB:.1f} MiB, {evicted} evictions ({evicted_bytes / MiB:.0f} MiB)"
    )


def _digest(text: str) -> Digest:
    digest = parse_digest(text)
    assert digest is not None
    return digest


@pytest.mark.in_process  # looks inside the store
async def test_content_larger_than_the_bound_is_served_but_not_kept(
    make_mirror: MirrorFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
) -> None:
    image = Pusher(upstream.url).image("bound/huge", "1", layer_sizes=(3 * MiB,), compress=False)
    mirror = await make_mirror({"docker.io": upstream.url}, max_size=2 * MiB)
    layer = image.layers[0]
    url = f"{mirror.url}/v2/bound/huge/blobs/{layer}"
    mark = upstream.mark()
    for _ in range(2):
        status, digest, size = await _sha256_of(http, url)
        assert (status, digest, size) == (200, layer, len(image.blobs[layer]))
        # the fill ends (and lets go of its lock file) just after its client had the bytes
        await until(lambda: not any((mirror.storage / "tmp").iterdir()), "tmp/ is empty")
    assert _blob_gets(upstream, mark, layer) == 2  # nothing was kept to answer the second
    assert mirror.app[STORE].has_blob(_digest(layer)) is False


@pytest.mark.slow
async def test_sigkill_mid_fill_leaves_nothing_partial_and_restart_serves_right(
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url, rate=20 * MiB)
    settings = {
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": relay.url}},
    }
    mirror = await MirrorProcess(tmp_path, settings).start()
    layer = seeded.big.layers[0]
    url = f"{mirror.url}/v2/big/layer/blobs/{layer}"
    received = 0
    with contextlib.suppress(aiohttp.ClientPayloadError):
        async with http.get(url) as response:
            async for chunk in response.content.iter_any():
                received += len(chunk)
                if received > 20 * MiB:
                    await mirror.kill()
                    break
    assert 20 * MiB < received < len(seeded.big.blobs[layer])
    store = tmp_path / "cache"
    assert not list((store / "blobs").rglob(layer[7:]))  # nothing kept half-written
    assert any(p.name.endswith(".part") for p in (store / "tmp").iterdir())

    restarted = await MirrorProcess(tmp_path, settings).start()
    try:
        assert not any(p.name.endswith(".part") for p in (store / "tmp").iterdir())
        relay.faults.rate = None
        status, digest, size = await _sha256_of(http, f"{restarted.url}/v2/big/layer/blobs/{layer}")
        assert (status, digest, size) == (200, layer, len(seeded.big.blobs[layer]))
        status, digest, _ = await _sha256_of(http, f"{restarted.url}/v2/big/layer/blobs/{layer}")
        assert (status, digest) == (200, layer)
    finally:
        await restarted.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_verify_finds_a_corrupt_byte_and_the_blob_is_refetched(
    upstream: Registry,
    seeded: Seeded,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    workers: int,
) -> None:
    settings = {
        "workers": workers,
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": upstream.url}},
    }
    mirror = await MirrorProcess(tmp_path, settings).start()
    try:
        image = seeded.docker
        assert await skopeo_copy_to_dir(f"{mirror.host}/team/app:v1", tmp_path / "a")
        clean = await mirror.command("verify")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "0 corrupt" in clean.stdout

        layer = image.layers[0]
        stored = tmp_path / "cache" / "blobs" / "sha256" / layer[7:9] / layer[7:]
        data = bytearray(stored.read_bytes())
        data[len(data) // 2] ^= 0x01
        stored.write_bytes(bytes(data))

        found = await mirror.command("verify")
        assert found.returncode == 1
        assert f"corrupt, removed: blob:{layer}" in found.stdout
        assert not stored.exists()

        mark = upstream.mark()
        status, digest, _ = await _sha256_of(http, f"{mirror.url}/v2/team/app/blobs/{layer}")
        assert (status, digest) == (200, layer)
        assert _blob_gets(upstream, mark, layer) == 1
        await until(stored.exists, "the blob is kept")
    finally:
        await mirror.stop()


@pytest.mark.parametrize("workers", [1, 2])
async def test_du_and_gc(upstream: Registry, seeded: Seeded, tmp_path: Path, workers: int) -> None:
    settings = {
        "workers": workers,
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": upstream.url}, "ghcr.io": {"url": upstream.url}},
    }
    mirror = await MirrorProcess(tmp_path, settings).start()
    try:
        assert await skopeo_copy_to_dir(f"{mirror.host}/team/app:v1", tmp_path / "a")
        assert await skopeo_copy_to_dir(
            f"{mirror.host}/ghcr.io/library/alpine:3.20", tmp_path / "b"
        )
        usage = await mirror.command("du")
        assert usage.returncode == 0
        assert "docker.io" in usage.stdout and "team/app" in usage.stdout
        assert "ghcr.io" in usage.stdout and "library/alpine" in usage.stdout
        # on a terminal (a pty, by `script`) verify draws its progress bar; piped, it does not
        command = f"{sys.executable} -m mirror verify --config {mirror.config}"
        on_tty = subprocess.run(
            ["script", "-qec", command, "/dev/null"], capture_output=True, text=True, check=False
        )
        assert on_tty.returncode == 0 and "verify [" in on_tty.stdout
        piped = await mirror.command("verify")
        assert "verify [" not in piped.stdout + piped.stderr
        swept = await mirror.command("gc", "--max-size", "1")
        assert swept.returncode == 0 and "now 0 B in 0 entries" in swept.stdout
        assert not any(p.is_file() for p in (tmp_path / "cache" / "blobs").rglob("*"))
        # the mirror goes on serving: it refetches what gc removed
        assert await skopeo_copy_to_dir(f"{mirror.host}/team/app:v1", tmp_path / "c")
    finally:
        await mirror.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs; where mounting is impossible, os.write fails with ENOSPC instead."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if result.returncode == 0:
        yield mount
        subprocess.run(["umount", "-l", str(mount)], check=False)
        return
    import mirror.store.base as storage_module

    real_write = os.write
    budget = {"left": 24 * MiB}

    def full_write(fd: int, data: bytes | memoryview) -> int:
        if budget["left"] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        budget["left"] -= len(data)
        return real_write(fd, data)

    storage_module.os.write = full_write  # type: ignore[attr-defined]
    try:
        yield mount
    finally:
        storage_module.os.write = real_write  # type: ignore[attr-defined]


@pytest.mark.in_process  # looks inside the store
async def test_disk_full_during_a_fill_still_serves_the_client(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    small_disk: Path,
    http: aiohttp.ClientSession,
) -> None:
    image: Image = Pusher(upstream.url).image(
        "full/disk", "1", layer_sizes=(40 * MiB,), compress=False
    )
    mirror = await make_mirror({"docker.io": upstream.url}, storage=small_disk / "cache")
    layer = image.layers[0]
    status, digest, size = await _sha256_of(http, f"{mirror.url}/v2/full/disk/blobs/{layer}")
    assert (status, digest, size) == (200, layer, len(image.blobs[layer]))
    store = mirror.app[STORE]
    assert store.counters.disk_full >= 1
    assert not store.has_blob(_digest(layer))
    tmp = small_disk / "cache" / "tmp"
    await until(lambda: not any(tmp.iterdir()), "the fill has let go of tmp/")
    # and it keeps serving: small content still fits and is kept
    small = seeded.oci.layers[0]
    status, digest, _ = await _sha256_of(http, f"{mirror.url}/v2/library/alpine/blobs/{small}")
    assert (status, digest) == (200, small)
    await until(lambda: store.has_blob(_digest(small)), "the small blob is kept")


@pytest.mark.in_process  # looks inside the store
@pytest.mark.slow
async def test_eviction_does_not_break_a_response_in_flight(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    clock: ManualClock,
) -> None:
    mirror = await make_mirror({"docker.io": upstream.url}, clock=clock)
    layer = seeded.big.layers[0]
    url = f"{mirror.url}/v2/big/layer/blobs/{layer}"
    store = mirror.app[STORE]
    async with aiohttp.ClientSession() as session:
        assert (await _sha256_of(session, url))[1] == layer
        # kept once flushed to disk, just after the client had it all
        await until(lambda: store.has_blob(_digest(layer)), "the blob is kept")
        hasher = hashlib.sha256()
        size = 0
        async with session.get(url) as response:
            assert response.headers["X-Mirror-Cache"] == "hit"
            hasher.update(await response.content.readexactly(MiB))
            size += MiB
            clock.advance(2)  # past the eviction grace
            for entry in list(store.index.entries()):
                store.evict(entry)
            assert not store.has_blob(_digest(layer))
            async for chunk in response.content.iter_any():
                hasher.update(chunk)
                size += len(chunk)
    assert "sha256:" + hasher.hexdigest() == layer
    assert size == len(seeded.big.blobs[layer])


def test_progress_bar_only_on_a_terminal() -> None:
    import io

    from mirror.maintenance import Progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    quiet, terminal = io.StringIO(), Terminal()
    for stream in (quiet, terminal):
        progress = Progress(100, "verify", stream)
        progress.advance(50)
        progress.advance(50)
        progress.close()
    assert quiet.getvalue() == ""
    assert "verify [" in terminal.getvalue() and "100.0%" in terminal.getvalue()
