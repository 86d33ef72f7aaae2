"""A large blob fetched over several connections at once (Range requests on the upstream's
free transfer slots): the same bytes, each fetched once, verified whole; a range that
fails is fetched again in order; an upstream that takes no ranges gets one request."""

from __future__ import annotations

import hashlib
import itertools
import re

import aiohttp

from tests.conftest import MirrorFactory, RelayFactory, Seeded
from tests.support.fake_upstream import Body, FakeUpstream
from tests.support.registry import Registry


def _tiles(ranges: list[str], size: int) -> list[tuple[int, int]]:
    """The byte spans [start, end) the Range headers asked for, sorted."""
    spans = []
    for value in ranges:
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", value)
        assert match is not None, value
        start, last = int(match[1]), match[2]
        spans.append((start, int(last) + 1 if last else size))
    return sorted(spans)


async def _fetched_bytes(http: aiohttp.ClientSession, url: str) -> float:
    async with http.get(f"{url}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("mirror_upstream_fetched_bytes_total{")
    )


async def _big_layer(http: aiohttp.ClientSession, url: str, layer: str) -> bytes:
    """The big layer through the mirror at `url`: a 200 with exactly its bytes."""
    async with http.get(f"{url}/v2/big/layer/blobs/{layer}") as response:
        assert response.status == 200
        body = await response.read()
    assert hashlib.sha256(body).hexdigest() == layer.removeprefix("sha256:")
    return body


async def test_a_large_blob_comes_over_several_connections_each_byte_once(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url, rate=40_000_000)  # a CDN's cap per connection
    mirror = await make_mirror({"docker.io": {"url": relay.url, "prefetch": False}})
    layer = seeded.big.layers[0]
    data = seeded.big.blobs[layer]
    await _big_layer(http, mirror.url, layer)
    spans = _tiles([value for path, value in relay.ranges if layer in path], len(data))
    assert relay.count("GET", layer) == 1 + len(spans) >= 2  # the fill's own, and ranges
    # the ranges tile the blob from where the fill's own stream stopped to the end
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert spans[-1][1] == len(data) and spans[0][0] > 0
    assert await _fetched_bytes(http, mirror.url) == len(data)  # each byte once
    assert not list((mirror.storage / "tmp").glob("*.tmp"))  # the spools are gone


async def test_a_range_that_breaks_is_fetched_again_in_order(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    # The first two blob bodies break after 8 MB: the fill's own (resumed) and its first
    # range (begun once the own stream's first 0.1 s showed it slow).
    relay = await make_relay(upstream.url, rate=40_000_000, cut_after=8_000_000, faulty_bodies=2)
    mirror = await make_mirror({"docker.io": {"url": relay.url, "prefetch": False}})
    layer = seeded.big.layers[0]
    body = await _big_layer(http, mirror.url, layer)
    assert (mirror.storage / "blobs" / "sha256" / layer[7:9] / layer[7:]).read_bytes() == body
    asked = [value for path, value in relay.ranges if layer in path]
    # the broken range was fetched again from where it broke, to the end of the blob
    assert any(value.endswith("-") and value != "bytes=8000000-" for value in asked), asked
    assert not list((mirror.storage / "tmp").glob("*.tmp"))


async def test_an_upstream_that_takes_no_ranges_gets_one_request(
    make_mirror: MirrorFactory, fake: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    data = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024)  # 64 MiB
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    fake.set("GET", f"/v2/a/b/blobs/{digest}", Body(data, "application/octet-stream"))
    mirror = await make_mirror({"docker.io": fake.url})
    async with http.get(f"{mirror.url}/v2/a/b/blobs/{digest}") as response:
        assert response.status == 200
        assert await response.read() == data
    assert fake.count("GET", "/blobs/") == 1


async def test_one_connection_when_told(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url)
    mirror = await make_mirror(
        {"docker.io": {"url": relay.url, "prefetch": False, "range_connections": 1}}
    )
    layer = seeded.big.layers[0]
    await _big_layer(http, mirror.url, layer)
    assert relay.count("GET", layer) == 1 and not relay.ranges


async def test_no_ranges_when_one_connection_is_fast(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    """Near the upstream (here: loopback, no cap) the blob would come sooner over its one
    connection than ranges could help: none are asked (they would only add the spools'
    writes)."""
    mirror = await make_mirror({"docker.io": {"url": upstream.url, "prefetch": False}})
    layer = seeded.big.layers[0]
    mark = upstream.mark()
    await _big_layer(http, mirror.url, layer)
    assert len([h for h in upstream.hits(mark) if h.method == "GET" and layer in h.path]) == 1
