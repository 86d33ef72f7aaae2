"""`workers: 2`: two processes on one port over one store, coalescing across processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RelayFactory, Seeded
from tests.support.clients import skopeo_copy_to_dir
from tests.support.fake_upstream import Body, FakeUpstream, generated_digest
from tests.support.process import MirrorProcess
from tests.support.registry import Registry
from tests.support.relay import Relay


@pytest.fixture
async def two_workers(
    tmp_path: Path, make_relay: RelayFactory, upstream: Registry
) -> AsyncIterator[tuple[MirrorProcess, Relay]]:
    relay = await make_relay(upstream.url)
    mirror = MirrorProcess(
        tmp_path,
        {
            "workers": 2,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": relay.url, "range_connections": 1}},
        },
    )
    await mirror.start()
    await _both_listening(mirror)
    yield mirror, relay
    assert await mirror.stop() == 0


async def _both_listening(mirror: MirrorProcess) -> None:
    """Until both workers have answered (the first may be up before the second listens,
    and then every connection goes to it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    deadline = time.monotonic() + 10
    async with aiohttp.ClientSession(connector=connector) as session:
        while True:
            async with session.get(f"{mirror.url}/v2/") as response:
                assert response.status == 200
            lines = [x for x in mirror.log.read_text().splitlines() if '"GET /v2/"' in x]
            if len({re.search(r"\[(\d+)\]", x).group(1) for x in lines}) == 2:  # type: ignore[union-attr]
                return
            assert time.monotonic() < deadline, "the second worker never answered"
            await asyncio.sleep(0.02)


async def test_pulls_with_two_workers(
    two_workers: tuple[MirrorProcess, Relay], seeded: Seeded, tmp_path: Path
) -> None:
    mirror, relay = two_workers
    for name, image, extra in (
        ("alpine:3.20", seeded.oci, ()),
        ("team/app:v1", seeded.docker, ()),
        ("multi/arch:latest", seeded.index, ("--all",)),
    ):
        target = tmp_path / name.replace("/", "-")
        assert await skopeo_copy_to_dir(f"{mirror.host}/{name}", target, *extra) == image.digest
    gets = [p for m, p in relay.requests if m == "GET" and "/blobs/" in p]
    assert len(gets) == len(set(gets))  # each blob fetched once, whichever worker asked


async def _fetch(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    hasher = hashlib.sha256()
    first = None
    async with session.get(url) as response:
        async for chunk in response.content.iter_any():
            first = first or time.monotonic()
            hasher.update(chunk)
    return {"digest": "sha256:" + hasher.hexdigest(), "first": first, "done": time.monotonic()}


@pytest.mark.slow
async def test_sixteen_clients_across_two_workers_one_transfer(
    two_workers: tuple[MirrorProcess, Relay], seeded: Seeded
) -> None:
    mirror, relay = two_workers
    relay.faults.rate = 50 * 1024 * 1024
    layer = seeded.big.layers[0]
    url = f"{mirror.url}/v2/big/layer/blobs/{layer}"
    # separate connections, so the kernel spreads them over both workers
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        results = await asyncio.gather(*(_fetch(session, url) for _ in range(16)))
    assert all(r["digest"] == layer for r in results)
    assert max(r["first"] for r in results) < min(r["done"] for r in results)
    assert relay.count("GET", layer) == 1
    # the worker that did not fetch it streamed it from the other's growing file (each
    # request is logged once its last byte is out, so a client may be done a moment before)
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in mirror.log.read_text().splitlines() if layer in line]
        if len([line for line in lines if "mirror.access" in line]) == 16:
            break
        assert time.monotonic() < deadline, "\n".join(lines)
        await asyncio.sleep(0.05)
    fetching = {re.search(r"\[(\d+)\]", line).group(1) for line in lines if " miss " in line}  # type: ignore[union-attr]
    following = {re.search(r"\[(\d+)\]", line).group(1) for line in lines if " coalesced " in line}  # type: ignore[union-attr]
    assert len(fetching) == 1 and following - fetching


async def test_metrics_add_up_every_worker(
    two_workers: tuple[MirrorProcess, Relay], seeded: Seeded
) -> None:
    mirror, _ = two_workers
    blobs = sorted(seeded.index.all_blobs())

    def answering() -> set[str]:
        lines = mirror.log.read_text().splitlines()
        return {re.search(r"\[(\d+)\]", x).group(1) for x in lines if "/blobs/" in x}  # type: ignore[union-attr]

    connector = aiohttp.TCPConnector(force_close=True)  # spread over both workers
    async with aiohttp.ClientSession(connector=connector) as session:
        sent = 0
        # the kernel picks a worker per connection: go on until both answered some
        while sent < len(blobs) or (len(answering()) < 2 and sent < 60):
            digest = blobs[sent % len(blobs)]
            async with session.get(f"{mirror.url}/v2/multi/arch/blobs/{digest}") as response:
                assert response.status == 200
                await response.read()
            sent += 1
        assert len(answering()) == 2, f"one worker answered all {sent} requests"
        totals = set()
        for _ in range(6):  # whichever worker answers the scrape, the sums are the same
            async with session.get(f"{mirror.url}/metrics") as response:
                text = await response.text()
            totals.add(
                sum(
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "mirror_requests_total" and sample.labels["kind"] == "blob"
                )
            )
    assert totals == {sent}


def _holder_of(suffix: str, pids: list[int]) -> int | None:
    """The process among `pids` that has a file ending in `suffix` open."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).endswith(suffix):
                        return pid
    return None


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


async def test_a_worker_killed_mid_fill_leaves_no_temporary_behind(
    tmp_path: Path, make_relay: RelayFactory, upstream: Registry, seeded: Seeded
) -> None:
    relay = await make_relay(upstream.url, rate=5 * 1024 * 1024)  # 100 MB take 20 s
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": 2,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": relay.url, "range_connections": 1}},
        },
    ).start()
    tmp = tmp_path / "cache" / "tmp"
    layer = seeded.big.layers[0]
    try:
        async with aiohttp.ClientSession() as http:
            pull = asyncio.create_task(http.get(f"{mirror.url}/v2/big/layer/blobs/{layer}"))
            deadline = time.monotonic() + 15
            holder = None
            while holder is None:
                assert time.monotonic() < deadline, "no worker began the fill"
                await asyncio.sleep(0.05)
                holder = _holder_of(".part", _children(mirror.pid))
            (part,) = tmp.glob("*.part")
            left = part.stat().st_ino
            os.kill(holder, signal.SIGKILL)
            deadline = time.monotonic() + 10
            # (the client's retry may start a new fill of the same name: a new file)
            while any(p.stat().st_ino == left for p in tmp.glob("*.part")):
                assert time.monotonic() < deadline, (
                    "the dead worker's temporary stayed; held open by "
                    f"{_holder_of('.part', _children(mirror.pid))} (killed {holder}):\n"
                    + mirror.log.read_text()[-3000:]
                )
                await asyncio.sleep(0.05)
            pull.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await pull
    finally:
        assert await mirror.stop() == 0
    assert "removed 1 temporaries the worker left" in mirror.log.read_text()


async def test_a_blob_streamed_through_reaches_every_client_of_every_worker(
    tmp_path: Path, fake: FakeUpstream
) -> None:
    """Larger than the store: the worker fetching it keeps nothing to follow, so clients
    of the other worker get a transfer of their own instead of a stalled one."""
    size = 24 * 1024 * 1024
    digest = await asyncio.to_thread(generated_digest, size)
    slow = Body(generated=size, content_type="application/octet-stream", piece=65536, pause=0.003)
    fake.set("GET", f"/v2/big/blob/blobs/{digest}", slow)  # about 20 MB/s
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": 2,
            "storage": {"path": str(tmp_path / "cache"), "max_size": "8MiB"},
            "upstreams": {"docker.io": {"url": fake.url}},
        },
    ).start()
    # separate connections, so the kernel spreads them over both workers
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await asyncio.gather(
                *(_fetch(session, f"{mirror.url}/v2/big/blob/blobs/{digest}") for _ in range(8))
            )
    finally:
        assert await mirror.stop() == 0
    assert [r["digest"] for r in results] == [digest] * 8


async def test_workers_end_with_a_supervisor_killed_by_sigkill(tmp_path: Path) -> None:
    """No orphan goes on serving the old config beside the next start."""
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": 2,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": "http://127.0.0.1:9"}},
        },
    ).start()
    workers: list[int] = []
    deadline = time.monotonic() + 10
    while len(workers) < 2:
        assert time.monotonic() < deadline, "the workers did not start"
        await asyncio.sleep(0.05)
        workers = _children(mirror.pid)
    await mirror.kill()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, f"workers {workers} outlived their supervisor"
        await asyncio.sleep(0.05)
