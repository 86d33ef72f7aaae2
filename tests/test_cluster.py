"""Several replicas: real mirror processes behind HAProxy (deploy/cluster/haproxy.cfg),
sharing a real Redis and a real S3 server (SeaweedFS), over the real registry behind a
relay that counts what reaches it. Each replica has its own disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from mirror.app import create_app
from mirror.cluster.health import exchange, share_health
from mirror.cluster.shared import Shared
from mirror.config import ClusterConfig, from_mapping
from mirror.upstream.breaker import Breaker, UpstreamDown
from tests.support.clock import ManualClock
from tests.support.engines import (
    RedisServer,
    SeaweedS3,
    free_port,
    haproxy,
    redis_server,
    seaweed_s3,
)
from tests.support.images import Pusher, sha256
from tests.support.process import MirrorProcess
from tests.support.registry import Registry
from tests.support.relay import Relay
from tests.support.waiting import until

pytestmark = pytest.mark.in_process  # it starts its own processes: once is enough

HAPROXY_CONFIG = Path(__file__).parent.parent / "deploy" / "cluster" / "haproxy.cfg"
LEASE = 2  # seconds a claim lasts unrenewed: how long a killed replica's claim holds others


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with seaweed_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


Replicas = Callable[..., Awaitable[list[MirrorProcess]]]


@pytest.fixture
async def relay(make_relay: Callable[..., Awaitable[Relay]], upstream: Registry) -> Relay:
    return await make_relay(upstream.url)


@pytest.fixture
async def replicas(
    tmp_path: Path, redis: RedisServer, s3: SeaweedS3, relay: Relay
) -> AsyncIterator[Replicas]:
    """Start n replicas of one cluster (a prefix in the bucket of its own)."""
    prefix = f"test-{secrets.token_hex(4)}/"
    started: list[MirrorProcess] = []

    async def start(count: int, **settings: Any) -> list[MirrorProcess]:
        batch = []
        for _ in range(count):
            storage = tmp_path / f"replica{len(started)}"
            config = {
                "storage": {
                    "path": str(storage),
                    "max_size": "2GiB",
                    "s3": {
                        "endpoint": s3.endpoint,
                        "bucket": s3.bucket,
                        "prefix": prefix,
                        "access_key": s3.access_key,
                        "secret_key": s3.secret_key,
                    },
                },
                "cluster": {"redis": redis.url, "lease": LEASE},
                "default_upstream": "registry",
                "upstreams": {"registry": {"url": relay.url, "range_connections": 1}},
                "prefetch": False,
                **settings,
            }
            replica = MirrorProcess(tmp_path, config)
            started.append(replica)
            batch.append(replica)
        await asyncio.gather(*(replica.start() for replica in batch))
        return batch

    yield start
    stopped = await asyncio.gather(*(r.stop() for r in started), return_exceptions=True)
    failures = [outcome for outcome in stopped if isinstance(outcome, BaseException)]
    if failures:
        raise failures[0]


def _push_blob(upstream: Registry, repository: str, size: int) -> tuple[str, bytes]:
    data = os.urandom(size)
    return Pusher(upstream.url).push_blob(repository, data), data


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    """Status and sha256 of the body, read whole."""
    async with session.get(url) as response:
        hasher = hashlib.sha256()
        async for chunk in response.content.iter_chunked(1 << 20):
            hasher.update(chunk)
        return response.status, "sha256:" + hasher.hexdigest()


def _balancer(tmp_path: Path, replicas: list[MirrorProcess]) -> Any:
    port = free_port()
    env = {"LISTEN": f"127.0.0.1:{port}"}
    env |= {f"MIRROR_{n}": replica.host for n, replica in enumerate(replicas, start=1)}
    return haproxy(tmp_path, HAPROXY_CONFIG.read_text(), env=env, port=port)


async def test_three_replicas_fetch_a_cold_blob_once_however_clients_are_spread(
    tmp_path: Path, replicas: Replicas, upstream: Registry, relay: Relay
) -> None:
    """16 clients, half through HAProxy and half straight at each replica: one upstream
    GET in all, and every client gets the right bytes."""
    digest, _ = _push_blob(upstream, "cluster/herd", 24 * 1024 * 1024)
    group = await replicas(3)
    path = f"/v2/cluster/herd/blobs/{digest}"
    with _balancer(tmp_path, group) as balancer:
        urls = [balancer.url + path] * 8 + [group[n % 3].url + path for n in range(8)]
        async with aiohttp.ClientSession() as session:
            answers = await asyncio.gather(*(_get(session, url) for url in urls))
    assert answers == [(200, digest)] * 16
    assert relay.count("GET", f"/blobs/{digest}") == 1


async def test_a_fresh_replica_pulls_a_whole_image_from_redis_and_s3_without_the_upstream(
    replicas: Replicas, upstream: Registry, relay: Relay, s3: SeaweedS3
) -> None:
    image = Pusher(upstream.url).image("cluster/fresh", "v1", layer_sizes=(3 << 20, 40 << 20))
    (first,) = await replicas(1)
    async with aiohttp.ClientSession() as session:
        await _pull(session, first.url, image.repository, image.reference, image.all_blobs())
        # Uploaded once kept (clients do not wait for it): both layers in the bucket.
        bucket = s3.client()
        await until(
            lambda: all(_in_bucket(bucket, s3.bucket, d) for d in image.layers),
            "the layers are in the shared tier",
            30,
        )
        asked = len(relay.requests)
        (fresh,) = await replicas(1)  # an empty disk of its own
        await _pull(session, fresh.url, image.repository, image.reference, image.all_blobs())
    assert relay.requests[asked:] == []  # tag from Redis, manifest and blobs from S3


def _in_bucket(client: Any, bucket: str, digest: str) -> bool:
    algorithm, hex_digest = digest.split(":")
    listing = client.list_objects_v2(Bucket=bucket, Prefix="test-")
    return any(
        item["Key"].endswith(f"blobs/{algorithm}/{hex_digest}")
        for item in listing.get("Contents", [])
    )


async def _pull(
    session: aiohttp.ClientSession,
    base: str,
    repository: str,
    tag: str,
    blobs: dict[str, bytes],
) -> None:
    """What a client pulling `repository:tag` does, checking every byte."""
    accept = "application/vnd.oci.image.manifest.v1+json"
    url = f"{base}/v2/{repository}/manifests/{tag}"
    async with session.get(url, headers={"Accept": accept}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Docker-Content-Digest"] == sha256(await response.read())
    for digest in blobs:
        status, got = await _get(session, f"{base}/v2/{repository}/blobs/{digest}")
        assert (status, got) == (200, digest)


async def test_a_replica_killed_mid_transfer_costs_a_retrying_client_nothing_wrong(
    tmp_path: Path,
    replicas: Replicas,
    upstream: Registry,
    make_relay: Callable[..., Awaitable[Relay]],
) -> None:
    """SIGKILL the replica that is fetching; the client retries through HAProxy and gets
    the right bytes from another replica, with at most one more upstream GET."""
    slow = await make_relay(upstream.url, rate=8 * 1024 * 1024)
    digest, _ = _push_blob(upstream, "cluster/killed", 32 * 1024 * 1024)
    group = await replicas(3, upstreams={"registry": {"url": slow.url, "range_connections": 1}})
    path = f"/v2/cluster/killed/blobs/{digest}"
    with _balancer(tmp_path, group) as balancer:
        async with aiohttp.ClientSession() as session:
            async with session.get(balancer.url + path) as response:
                assert response.status == 200
                await response.content.readexactly(1 << 20)  # under way
                busy = [r for r in group if await _transfers(session, r) > 0]
                assert len(busy) == 1
                await busy[0].kill()
                with pytest.raises(aiohttp.ClientError):
                    await response.read()  # cut: never taken for the whole blob
            status, got = await _get(session, balancer.url + path)  # the retry
    assert (status, got) == (200, digest)
    assert 1 <= slow.count("GET", f"/blobs/{digest}") <= 2


async def _transfers(session: aiohttp.ClientSession, replica: MirrorProcess) -> float:
    async with session.get(f"{replica.url}/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("mirror_transfers_in_flight "):
            return float(line.split()[1])
    raise AssertionError("mirror_transfers_in_flight is not in /metrics")


async def test_pulls_go_on_while_redis_is_stopped_and_sharing_resumes_after(
    replicas: Replicas, upstream: Registry, relay: Relay, redis: RedisServer
) -> None:
    group = await replicas(2)
    before = Pusher(upstream.url).image("cluster/noredis", "a", layer_sizes=(1 << 20,))
    redis.stop()
    try:
        during = Pusher(upstream.url).image("cluster/noredis", "b", layer_sizes=(2 << 20,))
        async with aiohttp.ClientSession() as session:
            for replica in group:
                for image in (before, during):
                    await asyncio.wait_for(
                        _pull(
                            session,
                            replica.url,
                            image.repository,
                            image.reference,
                            image.all_blobs(),
                        ),
                        10,  # a lost Redis costs a short wait at most, not a hang
                    )
    finally:
        redis.start()
    after = Pusher(upstream.url).image("cluster/noredis", "c", layer_sizes=(2 << 20,))
    layer = after.layers[0]
    async with aiohttp.ClientSession() as session:
        await _until_redis_is_back(session, group)
        answers = await asyncio.gather(
            *(_get(session, f"{r.url}/v2/cluster/noredis/blobs/{layer}") for r in group * 4)
        )
    assert answers == [(200, layer)] * 8
    assert relay.count("GET", f"/blobs/{layer}") == 1  # shared again: one fetch


async def _until_redis_is_back(session: aiohttp.ClientSession, group: list[MirrorProcess]) -> None:
    """Wait until each replica talks to Redis again: it leaves a Redis that failed alone
    for a few seconds. Asking for a tag it does not know makes it look."""
    for replica in group:
        for attempt in range(100):
            url = f"{replica.url}/v2/cluster/noredis/manifests/unknown-{attempt}"
            async with session.get(url) as response:
                await response.read()
            async with session.get(f"{replica.url}/readyz") as response:
                if (await response.json())["cluster"]["redis"] is True:
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError(f"replica {replica.url} did not find Redis again")


async def test_with_s3_stopped_replicas_serve_from_disk_and_the_upstream(
    replicas: Replicas, upstream: Registry, relay: Relay, s3: SeaweedS3
) -> None:
    (replica,) = await replicas(1)
    cached = Pusher(upstream.url).image("cluster/nos3", "a", layer_sizes=(1 << 20,))
    async with aiohttp.ClientSession() as session:
        await _pull(session, replica.url, cached.repository, cached.reference, cached.all_blobs())
        s3.stop()
        try:
            fresh = Pusher(upstream.url).image("cluster/nos3", "b", layer_sizes=(2 << 20,))
            for image in (cached, fresh):
                await asyncio.wait_for(
                    _pull(
                        session, replica.url, image.repository, image.reference, image.all_blobs()
                    ),
                    30,
                )
            async with session.get(f"{replica.url}/readyz") as response:
                ready = await response.json()
            assert response.status == 200 and ready["cluster"]["s3"] is False
        finally:
            s3.start()
    assert relay.count("GET", f"/blobs/{cached.layers[0]}") == 1  # the disk served it again


@pytest.mark.parametrize("replica_count", [3])
async def test_a_tag_is_revalidated_once_per_ttl_for_the_whole_cluster(
    tmp_path: Path,
    redis: RedisServer,
    upstream: Registry,
    relay: Relay,
    clock: ManualClock,
    replica_count: int,
) -> None:
    """Replicas in this process on one moved clock: the first asks the upstream, the others
    take its answer from Redis; past the TTL, one HEAD for all of them."""
    image = Pusher(upstream.url).image("cluster/ttl", "v1", layer_sizes=(1024,))
    servers = []
    for n in range(replica_count):
        config = from_mapping(
            {
                "listen": "127.0.0.1:0",
                "storage": {"path": str(tmp_path / f"r{n}")},
                "cluster": {"redis": redis.url},
                "manifest_ttl": 60,
                "default_upstream": "registry",
                "upstreams": {"registry": {"url": relay.url}},
                "prefetch": False,
            },
            env={},
        )
        server = TestServer(await create_app(config, clock=clock))
        await server.start_server()
        servers.append(server)
    path = f"/v2/{image.repository}/manifests/{image.reference}"
    headers = {"Accept": image.media_type}
    try:
        async with aiohttp.ClientSession() as session:

            async def ask_all() -> list[str]:
                digests = []
                for server in servers:
                    async with session.get(server.make_url(path), headers=headers) as response:
                        assert response.status == 200
                        digests.append(response.headers["Docker-Content-Digest"])
                return digests

            assert await ask_all() == [image.digest] * replica_count
            tag_requests = [r for r in relay.requests if r[1].endswith("/manifests/v1")]
            assert tag_requests == [("GET", path)]
            clock.advance(61)
            assert await ask_all() == [image.digest] * replica_count
            tag_requests = [r for r in relay.requests if r[1].endswith("/manifests/v1")]
            assert tag_requests == [("GET", path), ("HEAD", path)]
    finally:
        for server in servers:
            await server.close()


async def test_a_corrupt_copy_in_the_tier_is_never_served_as_whole_and_is_replaced(
    replicas: Replicas, upstream: Registry, relay: Relay, s3: SeaweedS3
) -> None:
    digest, data = _push_blob(upstream, "cluster/corrupt", 3 * 1024 * 1024)
    (first,) = await replicas(1)
    path = f"/v2/cluster/corrupt/blobs/{digest}"
    bucket = s3.client()
    async with aiohttp.ClientSession() as session:
        assert await _get(session, first.url + path) == (200, digest)
        await until(lambda: _in_bucket(bucket, s3.bucket, digest), "the blob is in the tier", 30)
        key = next(
            item["Key"]
            for item in bucket.list_objects_v2(Bucket=s3.bucket, Prefix="test-")["Contents"]
            if item["Key"].endswith(digest.split(":")[1])
        )
        bucket.put_object(Bucket=s3.bucket, Key=key, Body=data[:-1] + bytes([data[-1] ^ 1]))
        (fresh,) = await replicas(1)
        with pytest.raises(aiohttp.ClientPayloadError):
            await _get(session, fresh.url + path)  # cut before its last byte, never whole
        assert relay.count("GET", f"/blobs/{digest}") == 1
        await until(lambda: not _in_bucket(bucket, s3.bucket, digest), "the copy is dropped", 10)
        assert await _get(session, fresh.url + path) == (200, digest)  # from the upstream
    assert relay.count("GET", f"/blobs/{digest}") == 2


async def test_an_upstream_one_replica_finds_down_is_not_asked_by_the_others(
    redis: RedisServer, clock: ManualClock
) -> None:
    """Through the real Redis, on a clock moved by hand: what one replica's breaker finds
    reaches the other's, and goes when the back-off ends."""
    name = f"upstream-{secrets.token_hex(4)}"
    first, second = Shared(ClusterConfig(redis.url), clock), Shared(ClusterConfig(redis.url), clock)
    finder, other = Breaker(name, clock), Breaker(name, clock)
    said: dict[str, float] = {}
    try:
        finder.failed("answered 503")
        await exchange(first, name, finder, said)
        await exchange(second, name, other, {})
        assert other.down and other.learned
        with pytest.raises(UpstreamDown):
            other.admit()
        finder.succeeded()  # up again: said once, and a replica starting now learns nothing
        await exchange(first, name, finder, said)
        late = Breaker(name, clock)
        await exchange(second, name, late, {})
        assert not late.down
        clock.advance(1.5)  # past the back-off: one probe, as after its own failure
        assert other.admit() is True
    finally:
        await first.close()
        await second.close()


async def test_a_cold_manifest_is_fetched_once_for_the_cluster_by_tag_and_by_digest(
    replicas: Replicas, upstream: Registry, relay: Relay
) -> None:
    pusher = Pusher(upstream.url)
    by_tag = pusher.image("cluster/manifests", "v1", layer_sizes=(1024,))
    by_digest = pusher.image("cluster/manifests", "v2", layer_sizes=(2048,))
    group = await replicas(3)
    headers = {"Accept": by_tag.media_type}

    async def digest_of_answer(session: aiohttp.ClientSession, url: str) -> str:
        async with session.get(url, headers=headers) as response:
            assert response.status == 200, await response.text()
            return sha256(await response.read())

    async with aiohttp.ClientSession() as session:
        for image, reference in ((by_tag, "v1"), (by_digest, by_digest.digest)):
            path = f"/v2/cluster/manifests/manifests/{reference}"
            answers = await asyncio.gather(
                *(digest_of_answer(session, replica.url + path) for replica in group * 4)
            )
            assert answers == [image.digest] * 12
    manifest_gets = [p for m, p in relay.requests if m == "GET" and "/manifests/" in p]
    assert sorted(manifest_gets) == sorted(
        [
            "/v2/cluster/manifests/manifests/v1",
            f"/v2/cluster/manifests/manifests/{by_digest.digest}",
        ]
    )


async def test_a_hanging_s3_costs_a_cold_pull_seconds_not_timeouts(
    replicas: Replicas, upstream: Registry, s3: SeaweedS3
) -> None:
    """S3 accepts connections and never answers (SIGSTOP): a cold pull falls back to the
    upstream after the tier's short answer time, and the next ones do not ask the tier."""
    (replica,) = await replicas(1)
    images = [
        Pusher(upstream.url).image("cluster/hang", f"v{n}", layer_sizes=(1 << 20,))
        for n in range(3)
    ]
    assert s3.pid is not None
    os.kill(s3.pid, signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession() as session:
            for image in images:
                pull = _pull(
                    session, replica.url, image.repository, image.reference, image.all_blobs()
                )
                await asyncio.wait_for(pull, 12)  # the tier's 3 s answer time, then rested
    finally:
        os.kill(s3.pid, signal.SIGCONT)


async def test_with_s3_down_no_replica_waits_for_another(
    replicas: Replicas, upstream: Registry, relay: Relay, s3: SeaweedS3
) -> None:
    """Without the tier to share through, waiting on another replica's fetch is waiting
    for nothing: each fetches for itself at once."""
    group = await replicas(3)
    digest, _ = _push_blob(upstream, "cluster/nos3herd", 4 * 1024 * 1024)
    s3.stop()
    try:
        async with aiohttp.ClientSession() as session:
            path = f"/v2/cluster/nos3herd/blobs/{digest}"
            answers = await asyncio.gather(*(_get(session, r.url + path) for r in group))
            assert answers == [(200, digest)] * 3
            for replica in group:
                assert await _metric(session, replica, "mirror_cluster_waits_total") == 0
    finally:
        s3.start()


async def _metric(session: aiohttp.ClientSession, replica: MirrorProcess, name: str) -> float:
    """The sum of a metric's samples on one replica (0 when it has none)."""
    async with session.get(f"{replica.url}/metrics") as response:
        text = await response.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_a_missing_tag_asked_everywhere_at_once_is_asked_upstream_once(
    replicas: Replicas, relay: Relay
) -> None:
    group = await replicas(3)
    path = "/v2/cluster/absent/manifests/nope"
    async with aiohttp.ClientSession() as session:

        async def status(url: str) -> int:
            async with session.get(url) as response:
                return response.status

        statuses = await asyncio.gather(*(status(r.url + path) for r in group * 4))
    assert statuses == [404] * 12
    assert [r for r in relay.requests if r[1] == path] == [("GET", path)]


async def test_sharing_health_stops_when_the_redis_client_swallows_the_cancel() -> None:
    """A stop's cancel lost inside the Redis client (Python 3.11's asyncio.wait_for drops
    one that arrives as its call completes) must not keep the exchange running: a replica
    once hung its stop so, until the 10 s limit."""

    class Swallowing:
        inside = asyncio.Event()

        lost = False

        async def down(self, name: str) -> None:
            self.inside.set()
            if self.lost:
                return None
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                self.lost = True  # (once: a second cancel ends the test's task anyway)
                return None

    class Upstream:
        breaker = Breaker("registry", ManualClock())

    shared = Swallowing()
    task = asyncio.create_task(share_health(shared, {"registry": Upstream()}))  # type: ignore[arg-type, dict-item]
    await asyncio.wait_for(shared.inside.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:
        task.cancel()
    assert done == {task} and task.cancelled(), "the exchange ran on after its cancel"
