"""What clients feel when the upstream hangs: a real `mirror serve` with a cached tag past
its TTL, an upstream that accepts connections and never answers, and requests spaced in
real time. Prints each request's latency and every HEAD the upstream saw, with its time.

    python -m bench.hanging_upstream [--requests 100] [--spacing 0.2] [--workers 1]

Then the upstream comes back, and the time until the mirror answers a hit again is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.support.fake_upstream import manifest_of_size
from tests.support.process import MirrorProcess

PATH = "/v2/library/app/manifests/v1"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--spacing", type=float, default=0.2)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    data, media_type = manifest_of_size(12_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    heads: list[float] = []
    hanging = asyncio.Event()
    hanging.set()

    async def manifest(request: web.Request) -> web.StreamResponse:
        if request.method == "HEAD":
            heads.append(time.monotonic())
            if hanging.is_set():
                await asyncio.sleep(3600)
        return web.Response(
            body=data, content_type=media_type, headers={"Docker-Content-Digest": digest}
        )

    upstream = web.Application()
    upstream.router.add_route("*", PATH, manifest)
    runner = web.AppRunner(upstream)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]

    with tempfile.TemporaryDirectory() as work:
        mirror = await MirrorProcess(
            Path(work),
            {
                "workers": args.workers,
                "manifest_ttl": 0,
                "storage": {"path": f"{work}/cache"},
                "upstreams": {"docker.io": {"url": f"http://127.0.0.1:{port}"}},
            },
        ).start()
        try:
            headers = {"Accept": media_type}
            async with aiohttp.ClientSession() as http:
                hanging.clear()
                async with http.get(f"{mirror.url}{PATH}", headers=headers) as response:
                    assert response.status == 200  # cached
                hanging.set()
                heads.clear()
                began = time.monotonic()
                latencies = []
                for _ in range(args.requests):
                    started = time.monotonic()
                    async with http.get(f"{mirror.url}{PATH}", headers=headers) as response:
                        await response.read()
                        assert response.headers["X-Mirror-Cache"] == "stale"
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(args.spacing)
                span = time.monotonic() - began
                hanging.clear()  # the upstream is back
                back = time.monotonic()
                while True:
                    async with http.get(f"{mirror.url}{PATH}", headers=headers) as response:
                        if response.headers["X-Mirror-Cache"] == "hit":
                            break
                    await asyncio.sleep(0.05)
                recovered = time.monotonic() - back
        finally:
            await mirror.stop()
            await runner.cleanup()

    print(f"{args.requests} requests over {span:.1f} s, one every {args.spacing} s + answer time")
    print(
        f"latency: first {latencies[0]:.3f} s, median {statistics.median(latencies):.4f} s, "
        f"max of the other {args.requests - 1} {max(latencies[1:]):.3f} s, "
        f"slower than 0.1 s: {sum(1 for x in latencies if x > 0.1)}"
    )
    print(
        f"HEADs the upstream saw: {len(heads)}, at "
        + ", ".join(f"{t - began:.1f}" for t in heads)
        + " s"
    )
    print(f"answered as a hit again {recovered:.2f} s after the upstream came back")


if __name__ == "__main__":
    asyncio.run(main())
