"""A real client pulling a cached image over loopback: skopeo against the upstream
directly, against nginx serving the same files as a static registry with sendfile on and
off, and against the mirror once the image is cached (a hit, sent with sendfile).

    python -m bench.warm_pull [--rounds 8]

Why it exists: on loopback a Go client pulls faster when the server copies the bytes than
when it uses sendfile, though curl measures the opposite (see docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench.run import MB, Service, median, run_nginx, skopeo_pull, start_mirror
from tests.support.images import Image, Pusher
from tests.support.registry import Registry


def static_registry(image: Image, files: Path) -> None:
    """The files a pull of `image` by tag asks for, laid out as a registry's URLs."""
    repository = files / "v2" / image.repository
    (repository / "manifests").mkdir(parents=True)
    (repository / "blobs").mkdir(parents=True)
    (files / "v2" / "index.html").write_text("{}")
    (repository / "manifests" / image.reference).write_bytes(image.manifest)
    for digest, data in image.all_blobs().items():
        (repository / "blobs" / digest).write_bytes(data)


def start_static_nginx(root: Path, files: Path, image: Image, *, sendfile: bool) -> Service:
    manifests = f"/v2/{image.repository}/manifests/"
    return run_nginx(
        root,
        f"""root {files}; sendfile {"on" if sendfile else "off"};
    types {{ }} default_type application/octet-stream;
    location {manifests} {{ default_type {image.media_type}; }}""",
        probe="/v2/",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mirror-bench-") as workdir:
        work = Path(workdir)
        upstream = Registry(work / "upstream")
        services: list[Service] = []
        try:
            image = Pusher(upstream.url).image(
                "bench/warm", "1", layer_sizes=(100 * MB,) * 3, compress=False
            )
            static_registry(image, work / "files")
            mirror = start_mirror(work / "mirror", upstream.url, 2)
            services += [
                mirror,
                start_static_nginx(work / "ng-on", work / "files", image, sendfile=True),
                start_static_nginx(work / "ng-off", work / "files", image, sendfile=False),
            ]
            subjects = {
                "direct": upstream.url,
                "mirror (hit)": mirror.url,
                "nginx sendfile on": services[1].url,
                "nginx sendfile off": services[2].url,
            }
            reference = f"{image.repository}:{image.reference}"
            skopeo_pull(f"{mirror.url[7:]}/{reference}", work / "pulled")  # cache it
            times: dict[str, list[float]] = {name: [] for name in subjects}
            names = list(subjects)
            for number in range(args.rounds):
                turn = number % len(names)
                for name in names[turn:] + names[:turn]:
                    os.sync()
                    url = subjects[name]
                    times[name].append(skopeo_pull(f"{url[7:]}/{reference}", work / "pulled"))
            direct = median(times["direct"])
            for name in names:
                value = median(times[name])
                print(f"{name:20s} {value:.2f} s  {value / direct:.3f}x direct")
        finally:
            for service in services:
                service.stop()
            upstream.stop()


if __name__ == "__main__":
    main()
