"""Requests that reach the upstream per pull, cold and warm, with skopeo through a real
`mirror serve` in front of a real docker-registry.

    python -m bench.upstream_requests
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
from pathlib import Path

from tests.support.clients import skopeo_copy_to_dir
from tests.support.images import Pusher
from tests.support.process import MirrorProcess
from tests.support.registry import Registry


async def main() -> None:
    with tempfile.TemporaryDirectory() as workdir:
        root = Path(workdir)
        registry = Registry(root / "upstream")
        try:
            pusher = Pusher(registry.url)
            images = {
                "oci/app:1 (3 blobs)": pusher.image("oci/app", "1", layer_sizes=(4096, 8192)),
                "multi/arch:1 (index, 2 platforms, 6 blobs)": pusher.index("multi/arch", "1"),
            }
            mirror = await MirrorProcess(
                root,
                {
                    "storage": {"path": str(root / "cache")},
                    "upstreams": {"docker.io": {"url": registry.url}},
                },
            ).start()
            print("| image | pull | upstream requests |")
            print("| --- | --- | --- |")
            try:
                for label, image in images.items():
                    reference = f"{mirror.host}/{image.repository}:{image.reference}"
                    for attempt in ("cold", "warm"):
                        mark = registry.mark()
                        target = root / f"{image.repository.replace('/', '-')}-{attempt}"
                        await skopeo_copy_to_dir(reference, target, "--all")
                        hits = registry.hits(mark)
                        kinds = collections.Counter(
                            f"{h.method} {'blob' if '/blobs/' in h.path else 'manifest'}"
                            for h in hits
                        )
                        detail = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                        print(f"| {label} | {attempt} | {len(hits)} ({detail or 'none'}) |")
            finally:
                await mirror.stop()
        finally:
            registry.stop()


if __name__ == "__main__":
    asyncio.run(main())
