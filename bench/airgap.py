"""Filling a site: `mirror warm --jobs 4` of a 300 MB image of 8 layers beside `skopeo copy`
of the same image into a directory (what sites use today), both from one docker-registry,
alternating, each into an empty target; then `mirror export` of it and `mirror import`
into an empty store, in MB/s.

    python -m bench.airgap [--rounds 3]

Everything is on loopback: what it shows is the work each tool does per byte, not what a
slow link would add (a wide-area bench is bench/'s next piece).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.support.images import Pusher
from tests.support.registry import Registry

MB = 1000 * 1000
LAYERS = (40 * MB,) * 7 + (20 * MB,)  # 300 MB


def _config(folder: Path, url: str) -> Path:
    config = folder / "mirror.yaml"
    config.write_text(
        yaml.safe_dump(
            {"storage": {"path": str(folder / "cache")}, "upstreams": {"docker.io": {"url": url}}}
        )
    )
    return config


def _mirror(*args: str) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mirror", *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    return time.monotonic() - started


def _skopeo(source: str, target: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        ["skopeo", "--insecure-policy", "copy", "--src-tls-verify=false", source, f"dir:{target}"],
        capture_output=True,
        check=True,
    )
    return time.monotonic() - started


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work_dir:
        work = Path(work_dir)
        registry = Registry(work / "registry")
        try:
            image = Pusher(registry.url).image("bench/site", "1", layer_sizes=LAYERS)
            size = len(image.manifest) + sum(len(b) for b in image.all_blobs().values())
            url = registry.url
            host = url.removeprefix("http://")
            warm, copy = [], []
            for number in range(args.rounds):
                for subject in ("warm", "skopeo") if number % 2 == 0 else ("skopeo", "warm"):
                    folder = work / f"{subject}-{number}"
                    folder.mkdir()
                    if subject == "warm":
                        config = _config(folder, url)
                        warm.append(
                            await asyncio.to_thread(
                                _mirror,
                                "warm",
                                "--config",
                                str(config),
                                "--jobs",
                                "4",
                                "bench/site:1",
                            )
                        )
                    else:
                        copy.append(
                            await asyncio.to_thread(
                                _skopeo, f"docker://{host}/bench/site:1", folder / "dir"
                            )
                        )
                    if number < args.rounds - 1:
                        shutil.rmtree(folder)
            last = work / f"warm-{args.rounds - 1}"
            archive = work / "site.tar"
            exported = await asyncio.to_thread(
                _mirror,
                "export",
                "--config",
                str(_config(last, url)),
                "--offline",
                "-o",
                str(archive),
                "bench/site:1",
            )
            site = work / "site"
            site.mkdir()
            imported = await asyncio.to_thread(
                _mirror, "import", "--config", str(_config(site, url)), str(archive)
            )
        finally:
            registry.stop()
    w, s = statistics.median(warm), statistics.median(copy)
    print(f"image: {size / MB:.0f} MB in {len(LAYERS)} layers, loopback, median of {args.rounds}")
    print("| what | seconds | MB/s |\n| --- | --- | --- |")
    print(f"| mirror warm --jobs 4 | {w:.2f} | {size / MB / w:.0f} |")
    print(f"| skopeo copy to dir | {s:.2f} | {size / MB / s:.0f} |")
    print(f"| mirror export (from the cache) | {exported:.2f} | {size / MB / exported:.0f} |")
    print(f"| mirror import (into an empty store) | {imported:.2f} | {size / MB / imported:.0f} |")
    print(f"warm / skopeo: {w / s:.2f}x (command start-up included)")


if __name__ == "__main__":
    asyncio.run(main())
