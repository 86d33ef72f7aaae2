"""A cold pull over a wide-area link, direct and through the mirror, side by side.

Between the registry (Debian's docker-registry) and whoever pulls sits a relay that adds a
round trip to every request and caps each connection's body at a CDN-like rate. dockerd
(its default 3 downloads at once) and skopeo pull an image of 8 layers of 40 MB: straight
through the relay, and through a fresh mirror whose upstream is that relay (prefetch on:
the mirror fetches every layer at once as the manifest passes). Alternating, median of
rounds; every pull cold on both sides.

dockerd also pulls the image straight from the registry, with no relay and no mirror: the
least a pull can take on this host, bounded by dockerd's own work (checking digests,
unpacking, writing the layers), which shares the cores with the relay and the mirror.

    python -m bench.wan [--rounds 3] [--latency 0.04] [--rate 25000000]

Needs root (dockerd) and the Debian packages scripts/test installs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.run import busy_seconds, skopeo_pull, start_mirror
from tests.support.dockerd import dockerd
from tests.support.images import Pusher
from tests.support.registry import Registry, free_port
from tests.support.relay import Faults, Relay

MB = 1000 * 1000
LAYERS = (40 * MB,) * 8


def _dockerd(
    root: Path, mirror: str, insecure: list[str], storage_driver: str
) -> contextlib.AbstractContextManager[dict[str, str]]:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing may be reached around the mirror
    daemon = json.dumps({"registry-mirrors": [mirror], "insecure-registries": insecure})
    return dockerd(
        root,
        daemon,
        {"HTTP_PROXY": closed, "HTTPS_PROXY": closed, "NO_PROXY": "127.0.0.1"},
        storage_driver,
    )


def docker_pull(env: dict[str, str], reference: str) -> float:
    env = {**os.environ, **env}
    started = time.monotonic()
    subprocess.run(["docker", "pull", "-q", reference], env=env, check=True, capture_output=True)
    took = time.monotonic() - started
    subprocess.run(["docker", "rmi", "-f", reference], env=env, check=True, capture_output=True)
    return took


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.04)
    parser.add_argument("--rate", type=float, default=25 * MB)
    parser.add_argument(
        "--storage-driver",
        default="overlay2",
        help="dockerd's (overlay2 as on a real host; vfs copies every layer below each new "
        "one, so unpacking hides the download)",
    )
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    busy: dict[str, list[float]] = {}  # the host's CPU seconds during each pull
    cleanup: list[Path] = []
    with tempfile.TemporaryDirectory(dir="/tmp", prefix="wan-") as work_dir:
        work = Path(work_dir)
        registry = Registry(work / "registry")
        relay = None
        try:
            Pusher(registry.url).image("bench/wan", "1", layer_sizes=LAYERS)
            relay = await Relay(registry.url, Faults(rate=args.rate, latency=args.latency)).start()
            far = relay.url.removeprefix("http://")
            near = registry.url.removeprefix("http://")
            for number in range(args.rounds):
                order = ("direct", "mirror") if number % 2 == 0 else ("mirror", "direct")
                for client in ("dockerd", "skopeo"):
                    for way in order + (("near",) if client == "dockerd" else ()):
                        root = work / f"{client}-{way}-{number}"
                        mirror = start_mirror(root / "mirror", relay.url, workers=1)
                        try:
                            host = mirror.url.removeprefix("http://")
                            if client == "dockerd":
                                short = Path(tempfile.mkdtemp(prefix="d-", dir="/tmp"))
                                cleanup.append(short)  # (its socket needs a short path)
                                with _dockerd(
                                    short, mirror.url, [far, near], args.storage_driver
                                ) as env:
                                    reference = {
                                        "direct": f"{far}/bench/wan:1",
                                        "near": f"{near}/bench/wan:1",
                                        "mirror": "bench/wan:1",
                                    }[way]
                                    before = busy_seconds()
                                    took = await asyncio.to_thread(docker_pull, env, reference)
                                    busy.setdefault(way, []).append(busy_seconds() - before)
                            else:
                                source = far if way == "direct" else host
                                took = await asyncio.to_thread(
                                    skopeo_pull, f"{source}/bench/wan:1", root / "dir"
                                )
                        finally:
                            mirror.stop()
                            shutil.rmtree(root, ignore_errors=True)
                        results.setdefault(f"{client} {way}", []).append(took)
        finally:
            if relay is not None:
                await relay.close()
            registry.stop()
            for folder in cleanup:
                shutil.rmtree(folder, ignore_errors=True)
    size = sum(LAYERS) / MB
    print(
        f"image: {size:.0f} MB in {len(LAYERS)} layers; relay: +{args.latency * 1000:.0f} ms "
        f"a request, {args.rate / MB:g} MB/s a connection; median of {args.rounds}, cold; "
        f"dockerd on {args.storage_driver}"
    )
    print("| client | direct (s) | through the mirror (s) | mirror / direct |")
    print("| --- | --- | --- | --- |")
    for client in ("dockerd", "skopeo"):
        direct = statistics.median(results[f"{client} direct"])
        through = statistics.median(results[f"{client} mirror"])
        print(f"| {client} | {direct:.2f} | {through:.2f} | {through / direct:.2f}x |")
    floor = statistics.median(results["dockerd near"])
    direct = statistics.median(results["dockerd direct"])
    print(
        f"dockerd straight from the registry on this host (no relay, no mirror): {floor:.2f} s, "
        f"{floor / direct:.2f}x its direct pull: no pull here can take less"
    )
    # Every process and the kernel share the cores: a pull cannot take less than its CPU
    # seconds spread over all of them.
    cores = len(os.sched_getaffinity(0))
    for way, what in (("mirror", "through the mirror"), ("near", "from the registry here")):
        cpu = statistics.median(busy[way])
        print(
            f"dockerd {what}: the host busy {cpu:.1f} CPU-s, so at least {cpu / cores:.2f} s "
            f"on {cores} cores ({cpu / cores / direct:.2f}x its direct pull)"
        )


if __name__ == "__main__":
    asyncio.run(main())
