"""Start-up time of `mirror serve` over a store of N cached blobs (default 100,000).

Fills a store with N small verified blobs (files and LRU index, as the mirror writes them),
then times, over several rounds, a real `mirror serve` process from spawn to its first
200 on /v2/: after a clean stop, and after a SIGKILL in the middle of a fill.

    python -m bench.startup [--entries 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from mirror.store.lru import UsageIndex


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fill(root: Path, entries: int) -> None:
    root.mkdir(parents=True)
    index = UsageIndex(root / "lru.sqlite")
    index._db.execute("BEGIN")
    for number in range(entries):
        data = number.to_bytes(8, "big") * 16
        hex_digest = hashlib.sha256(data).hexdigest()
        path = root / "blobs" / "sha256" / hex_digest[:2] / hex_digest
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        index.begin(f"blob:sha256:{hex_digest}", len(data), "docker.io", f"bench/r{number % 100}")
        index.confirm(f"blob:sha256:{hex_digest}")
    index._db.execute("COMMIT")
    index.close()


def start_once(config: Path, url: str, *, kill_mid_fill: bool = False) -> float:
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while True:
        try:
            with urllib.request.urlopen(f"{url}/v2/", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.01)
        if time.monotonic() - started > 60:
            raise RuntimeError("mirror did not start")
    elapsed = time.monotonic() - started
    if kill_mid_fill:
        process.send_signal(signal.SIGKILL)
    else:
        process.terminate()
    process.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir) / "cache"
        began = time.monotonic()
        fill(root, args.entries)
        print(f"filled {args.entries} entries in {time.monotonic() - began:.1f}s")
        port = free_port()
        config = Path(workdir) / "mirror.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "listen": f"127.0.0.1:{port}",
                    "storage": {"path": str(root), "max_size": "1TiB"},
                    "upstreams": {"docker.io": {"url": "http://127.0.0.1:9"}},
                }
            )
        )
        url = f"http://127.0.0.1:{port}"
        clean = [start_once(config, url) for _ in range(args.rounds)]
        crashed = []
        for _ in range(args.rounds):
            # a dead writer's temporary and a pending row, as SIGKILL mid-fill leaves them
            (root / "tmp" / f"sha256-{'ab' * 32}.part").write_bytes(os.urandom(4096))
            index = UsageIndex(root / "lru.sqlite")
            index.begin(f"blob:sha256:{'cd' * 32}", 4096)
            index.close()
            crashed.append(start_once(config, url))
        print(f"| start-up with {args.entries} entries | median | max |")
        print("| --- | --- | --- |")
        print(f"| after a clean stop | {statistics.median(clean):.2f} s | {max(clean):.2f} s |")
        median, worst = statistics.median(crashed), max(crashed)
        print(f"| after SIGKILL mid-fill | {median:.2f} s | {worst:.2f} s |")


if __name__ == "__main__":
    main()
