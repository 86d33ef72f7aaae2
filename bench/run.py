"""The mirror side by side with what users would otherwise run, in one run, on the same
bytes: Debian's docker-registry in proxy mode (the reference pull-through cache) and
nginx serving the same blob file with sendfile (the ceiling), all in front of one real
docker-registry upstream on loopback. Prints a table of ratios.

    python -m bench.run [--rounds 3] [--workers 2] [--quick]

Each figure is the median of several rounds, the subjects alternating within a round.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.startup import fill, start_once
from tests.support.images import Pusher
from tests.support.registry import Registry, free_port

MB = 1000 * 1000
SECOND_PHASE = 0.05  # where in a wall-clock second the rate-limited pulls start
MiB = 1024 * 1024
ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    root: Path

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def pids(self) -> list[int]:
        """The process and its children (the mirror's workers)."""
        found = [self.process.pid]
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
            found += [int(pid) for pid in children.read_text().split()]
        return found


def start_mirror(root: Path, upstream: str, workers: int, connections: int = 4) -> Service:
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "mirror.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{port}",
                "workers": workers,
                "log_level": "warning",
                "storage": {"path": str(root / "cache"), "max_size": "50GiB"},
                "upstreams": {"docker.io": {"url": upstream, "range_connections": connections}},
            }
        )
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        stdout=(root / "log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_up(f"{url}/v2/")
    return Service("mirror", url, process, root)


def start_reference_proxy(root: Path, upstream: str) -> Service:
    """docker-registry with `proxy: remoteurl`: distribution's own pull-through cache."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "version": 0.1,
                "log": {"level": "error", "accesslog": {"disabled": True}},
                "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
                "http": {"addr": f"127.0.0.1:{port}"},
                "proxy": {"remoteurl": upstream},
            }
        )
    )
    process = subprocess.Popen(
        ["docker-registry", "serve", str(config)],
        stdout=(root / "log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_up(f"{url}/v2/")
    return Service("registry-proxy", url, process, root)


def start_nginx(root: Path, files: Path, upstream: str | None = None, rate: str = "") -> Service:
    """nginx serving `files` with sendfile; or, given `upstream`, a rate-limited proxy."""
    if upstream is None:
        location = f"root {files}; sendfile on; tcp_nopush on;"
    else:
        # nginx 1.22 over loopback sends about 1.25x its limit_rate (and ignores 50m):
        # 40m holds a transfer near 50 MB/s.
        location = f"proxy_pass {upstream}; limit_rate {rate};"
    return run_nginx(root, f"location / {{ {location} }}", probe="/")


def start_nginx_cache(root: Path, upstream: str) -> Service:
    """nginx proxy_cache in front of `upstream`, keeping every 200 (keyed by the path and
    the Accept header): the reference for cached tag answers."""
    cache = f"proxy_cache_path {root}/cache levels=1:2 keys_zone=answers:10m;"
    location = (
        f"proxy_pass {upstream}; proxy_cache answers; proxy_cache_valid 200 1h; "
        "proxy_cache_key $uri$http_accept; add_header X-Cache $upstream_cache_status;"
    )
    return run_nginx(root, f"location / {{ {location} }}", probe="/v2/", http=cache)


def run_nginx(root: Path, server: str, probe: str, http: str = "") -> Service:
    """nginx on a free port of 127.0.0.1 with `server` as its server block's body (and
    `http` added to the http block); up once `probe` answers."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (root / "nginx.conf").write_text(
        f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 2;
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fastcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  {http}
  server {{
    listen 127.0.0.1:{port};
    {server}
  }}
}}
"""
    )
    process = subprocess.Popen(
        ["nginx", "-c", str(root / "nginx.conf"), "-g", "daemon off;"],
        stdout=(root / "log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_up(f"{url}{probe}")
    return Service("nginx", url, process, root)


def at_second_start() -> None:
    """Wait for the start of a wall-clock second. nginx's limit_rate counts whole seconds
    from a request's start, so a transfer of 100 MB at "50 MB/s" takes 1.4 s or 2.2 s
    depending on where in its second it began; pulls compared with each other start at
    the same point."""
    time.sleep((SECOND_PHASE - time.time()) % 1)


def curl_many(urls: list[str], headers: tuple[str, ...] = ()) -> float:
    """Fetch every URL at once with curl (bodies discarded); the wall time in seconds."""
    args = [arg for header in headers for arg in ("-H", header)]
    started = time.monotonic()
    processes = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", *args, url]) for url in urls]
    codes = [p.wait() for p in processes]
    elapsed = time.monotonic() - started
    if any(codes):
        raise RuntimeError(f"curl failed: {codes}")
    return elapsed


def busy_seconds() -> float:
    """CPU seconds this host has spent busy since boot, every process and the kernel."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def wrk_rps(url: str, seconds: int = 5) -> float:
    out = subprocess.run(
        ["wrk", "-t2", "-c32", f"-d{seconds}s", "-H", f"Accept: {ACCEPT}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk: {out}")
    return float(match.group(1))


def skopeo_pull(reference: str, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    started = time.monotonic()
    subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--src-tls-verify=false",
            f"docker://{reference}",
            f"dir:{target}",
        ],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


@contextlib.contextmanager
def peak_memory(service: Service) -> Iterator[list[float]]:
    """Peak proportional set size (PSS: shared pages counted once) of a service's
    processes together, in MiB, sampled every 20 ms."""
    peak = [0.0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for pid in service.pids():
                with contextlib.suppress(OSError):
                    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                    total += int(re.search(r"^Pss:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]
            peak[0] = max(peak[0], total / 1024)
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        done.set()
        thread.join()


def median(values: list[float]) -> float:
    return statistics.median(values)


def blob_gets(registry: Registry, since: int, digest: str) -> int:
    return sum(
        1 for h in registry.hits(since, settle=0.5) if h.method == "GET" and digest in h.path
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--cold-rounds",
        type=int,
        default=21,
        help="rounds of the cold pull (single rounds vary by +-20%%)",
    )
    parser.add_argument(
        "--herd-rounds",
        type=int,
        default=7,
        help="rounds of the 16 cold pulls (the rate limiter's timing makes single pulls vary)",
    )
    parser.add_argument("--quick", action="store_true", help="smaller blobs, for a try-out")
    parser.add_argument(
        "--only",
        action="append",
        choices=("warm", "cold", "herd", "crowd", "memory", "startup"),
        help="run only these figures (repeatable)",
    )
    args = parser.parse_args()

    def want(figure: str) -> bool:
        return args.only is None or figure in args.only

    big = (25 if args.quick else 250) * MB
    rows: list[tuple[str, str, str, str, str]] = []

    def row(figure: str, mirror: str, reference: str, ratio: str, target: str) -> None:
        rows.append((figure, mirror, reference, ratio, target))
        print(f"  {figure}: mirror {mirror}, reference {reference}, {ratio} (target {target})")

    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as workdir:
        work = Path(workdir)
        upstream = Registry(work / "upstream")
        services: list[Service] = []
        try:
            pusher = Pusher(upstream.url)
            print("seeding the upstream...")
            size = (big,)
            warm_image = pusher.image("bench/warm", "1", layer_sizes=size, compress=False)
            cold_image = pusher.image(
                "bench/cold",
                "1",
                layer_sizes=(big * 4 // 10,) * 3 if want("cold") else (1,),
                compress=False,
            )
            coalesce_image = pusher.image(
                "bench/herd",
                "1",
                layer_sizes=(big * 4 // 10,) if want("herd") else (1,),
                compress=False,
            )
            crowd_image = pusher.image(
                "bench/crowd", "1", layer_sizes=size if want("crowd") else (1,), compress=False
            )
            memory_images = [
                pusher.image(f"bench/mem{i}", "1", layer_sizes=size, compress=False)
                for i in range(8 if want("memory") else 0)
            ]

            if want("warm"):
                # 1. warm blob throughput, and 2. warm manifest requests per second
                mirror = start_mirror(work / "m-warm", upstream.url, args.workers)
                proxy = start_reference_proxy(work / "p-warm", upstream.url)
                services += [mirror, proxy]
                layer = warm_image.layers[0]
                paths = {
                    "mirror": f"{mirror.url}/v2/bench/warm/blobs/{layer}",
                    "registry-proxy": f"{proxy.url}/v2/bench/warm/blobs/{layer}",
                }
                for url in paths.values():
                    curl_many([url])  # warm both caches
                blob_file = mirror.root / "cache" / "blobs" / "sha256" / layer[7:9] / layer[7:]
                nginx = start_nginx(work / "nginx", blob_file.parent)
                services.append(nginx)
                paths["nginx"] = f"{nginx.url}/{layer[7:]}"
                for clients in (1, 8):
                    speeds: dict[str, list[float]] = {name: [] for name in paths}
                    repeat = 8 // clients  # a single download is short: repeat it to time it well
                    for _ in range(args.rounds):
                        for name, url in paths.items():
                            seconds = sum(curl_many([url] * clients) for _ in range(repeat))
                            speeds[name].append(repeat * clients * big / MB / seconds)
                    m, n, p = (median(speeds[k]) for k in ("mirror", "nginx", "registry-proxy"))
                    row(
                        f"warm blob, {clients} client(s), MB/s",
                        f"{m:.0f}",
                        f"nginx {n:.0f}, registry-proxy {p:.0f}",
                        f"{m / n:.2f}x nginx",
                        ">= 0.9x nginx",
                    )
                cached = start_nginx_cache(work / "nginx-cache", upstream.url)
                services.append(cached)
                tag_url = f"{cached.url}/v2/bench/warm/manifests/1"
                curl_many([tag_url], headers=(f"Accept: {ACCEPT}",))  # now in its cache
                probe = subprocess.run(
                    [
                        "curl",
                        "-sf",
                        "-o",
                        "/dev/null",
                        "-D",
                        "-",
                        "-H",
                        f"Accept: {ACCEPT}",
                        tag_url,
                    ],
                    capture_output=True,
                    text=True,
                ).stdout
                if "X-Cache: HIT" not in probe:
                    raise RuntimeError(f"nginx is not answering from its cache: {probe}")
                answers: dict[str, list[float]] = {"mirror": [], "nginx": []}
                for _ in range(args.rounds):
                    answers["mirror"].append(wrk_rps(f"{mirror.url}/v2/bench/warm/manifests/1"))
                    answers["nginx"].append(wrk_rps(tag_url))
                m, n = median(answers["mirror"]), median(answers["nginx"])
                row(
                    "cached tag answers, req/s",
                    f"{m:.0f}",
                    f"nginx proxy_cache {n:.0f}",
                    f"{m / n:.2f}x nginx",
                    ">= 0.5x nginx proxy_cache",
                )
                cached.stop()
                for label, reference in (("tag", "1"), ("digest", warm_image.digest)):
                    rps: dict[str, list[float]] = {"mirror": [], "registry-proxy": []}
                    for _ in range(args.rounds):
                        for name, service in (("mirror", mirror), ("registry-proxy", proxy)):
                            rps[name].append(
                                wrk_rps(f"{service.url}/v2/bench/warm/manifests/{reference}")
                            )
                    m, p = median(rps["mirror"]), median(rps["registry-proxy"])
                    goal = 20 if label == "tag" else 3
                    row(
                        f"warm manifest by {label}, req/s",
                        f"{m:.0f}",
                        f"registry-proxy {p:.0f}",
                        f"{m / p:.1f}x",
                        f">= {goal}x registry-proxy",
                    )
                for service in (mirror, proxy, nginx):
                    service.stop()

            if want("cold"):
                # 3. cold pull of an image through each proxy against pulling it directly
                times: dict[str, list[float]] = {"direct": [], "mirror": [], "registry-proxy": []}
                subjects = list(times)
                for number in range(args.cold_rounds):
                    # each round in another order; each pull starts with nothing left to
                    # write back from the one before, so none pays for another's writes
                    turn = number % len(subjects)
                    for subject in subjects[turn:] + subjects[:turn]:
                        os.sync()
                        if subject == "direct":
                            times[subject].append(
                                skopeo_pull(f"{upstream.url[7:]}/bench/cold:1", work / "pulled")
                            )
                            continue
                        root = work / f"cold-{subject}{number}"
                        if subject == "mirror":
                            service = start_mirror(root, upstream.url, args.workers)
                        else:
                            service = start_reference_proxy(root, upstream.url)
                        times[subject].append(
                            skopeo_pull(f"{service.url[7:]}/bench/cold:1", work / "pulled")
                        )
                        service.stop()
                        shutil.rmtree(service.root)
                d, m, p = (median(times[k]) for k in ("direct", "mirror", "registry-proxy"))
                megabytes = sum(len(b) for b in cold_image.blobs.values()) / MB
                # how much one round says: the mirror against the direct pull next to it
                pairs = zip(times["mirror"], times["direct"], strict=True)
                paired = sorted(mirror_s / direct_s for mirror_s, direct_s in pairs)
                row(
                    f"cold pull of a {megabytes:.0f} MB image, s",
                    f"{m:.2f}",
                    f"direct {d:.2f}, registry-proxy {p:.2f}",
                    f"{m / d:.2f}x direct (rounds {paired[0]:.2f}-{paired[-1]:.2f})",
                    "<= 1.1x direct",
                )

            if want("herd"):
                # 4. 16 concurrent cold pulls of one blob, the upstream rate-limited
                limited = start_nginx(work / "limited", work, upstream=upstream.url, rate="40m")
                services.append(limited)
                herd = coalesce_image.layers[0]
                single, crowd, upstream_gets = [], [], []
                for number in range(args.herd_rounds):
                    # one connection per blob: this row is about clients sharing a transfer
                    alone = start_mirror(work / f"m-one{number}", limited.url, args.workers, 1)
                    at_second_start()
                    single.append(curl_many([f"{alone.url}/v2/bench/herd/blobs/{herd}"]))
                    alone.stop()
                    shutil.rmtree(alone.root)
                    many = start_mirror(work / f"m-herd{number}", limited.url, args.workers, 1)
                    mark = upstream.mark()
                    at_second_start()
                    crowd.append(curl_many([f"{many.url}/v2/bench/herd/blobs/{herd}"] * 16))
                    upstream_gets.append(blob_gets(upstream, mark, herd))
                    many.stop()
                    shutil.rmtree(many.root)
                s, c = median(single), median(crowd)
                paired = sorted(c_s / s_s for c_s, s_s in zip(crowd, single, strict=True))
                row(
                    "16 cold pulls of one blob, upstream at ~50 MB/s",
                    f"{c:.2f} s, {max(upstream_gets)} upstream GET(s)",
                    f"one pull {s:.2f} s",
                    f"{c / s:.2f}x one pull (rounds {paired[0]:.2f}-{paired[-1]:.2f})",
                    "1 upstream GET, <= 1.3x one pull",
                )
                limited.stop()

            if want("crowd"):
                # 4b. 16 clients pulling one blob cold (the upstream at full speed: the mirror's
                # fan-out is what is timed) against the same 16 pulling it warm
                blob = crowd_image.layers[0]
                cold_s, warm_s, cold_cpu, warm_cpu = [], [], [], []
                for number in range(args.herd_rounds):
                    fresh = start_mirror(work / f"m-crowd{number}", upstream.url, args.workers)
                    services.append(fresh)
                    urls = [f"{fresh.url}/v2/bench/crowd/blobs/{blob}"] * 16
                    os.sync()  # no write-back left from the round before
                    # CPU time too: the clients, the upstream and the mirror share the cores,
                    # so the cold herd's extra work (the upstream sending, the fill receiving,
                    # hashing, writing) bounds how close to warm it can come
                    busy = busy_seconds()
                    cold_s.append(curl_many(urls))
                    cold_cpu.append(busy_seconds() - busy)
                    os.sync()
                    busy = busy_seconds()
                    warm_s.append(curl_many(urls))
                    warm_cpu.append(busy_seconds() - busy)
                    fresh.stop()
                    shutil.rmtree(fresh.root)
                c, w = median(cold_s), median(warm_s)
                paired = sorted(a / b for a, b in zip(cold_s, warm_s, strict=True))
                row(
                    f"16 pulls of one {big // MB} MB blob, cold against warm",
                    f"cold {c:.2f} s ({median(cold_cpu):.1f} CPU-s)",
                    f"warm {w:.2f} s ({median(warm_cpu):.1f} CPU-s)",
                    f"{c / w:.2f}x warm (rounds {paired[0]:.2f}-{paired[-1]:.2f})",
                    "<= 1.15x warm",
                )

            if want("memory"):
                # 5. peak memory while 8 clients pull different blobs cold
                memory = start_mirror(work / "m-memory", upstream.url, args.workers)
                services.append(memory)  # stopped even when a figure fails
                with peak_memory(memory) as peak:
                    curl_many(
                        [
                            f"{memory.url}/v2/bench/mem{i}/blobs/{image.layers[0]}"
                            for i, image in enumerate(memory_images)
                        ]
                    )
                memory.stop()
                row(
                    f"peak memory, 8 clients pulling 8 different {big // MB} MB blobs cold",
                    f"{peak[0]:.0f} MiB",
                    "-",
                    "-",
                    "< 150 MiB",
                )
        finally:
            for service in services:
                with contextlib.suppress(Exception):
                    service.stop()
            upstream.stop()

        # 6. start-up time with 100,000 cached entries
        if not want("startup"):
            return print_table(rows)
        store = work / "startup"
        fill(store / "cache", 10_000 if args.quick else 100_000)
        port = free_port()
        config = store / "mirror.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{port}",
                    "workers": args.workers,
                    "storage": {"path": str(store / "cache"), "max_size": "1TiB"},
                    "upstreams": {"docker.io": {"url": "http://127.0.0.1:9"}},
                }
            )
        )
        starts = [start_once(config, f"http://127.0.0.1:{port}") for _ in range(args.rounds)]
        row(
            f"start-up with {'10,000' if args.quick else '100,000'} entries",
            f"{median(starts):.2f} s",
            "-",
            "-",
            "< 2 s",
        )

    print_table(rows)


def print_table(rows: list[tuple[str, str, str, str, str]]) -> None:
    print()
    print("| figure | mirror | reference | ratio | target |")
    print("| --- | --- | --- | --- | --- |")
    for figure in rows:
        print("| " + " | ".join(figure) + " |")


if __name__ == "__main__":
    main()
