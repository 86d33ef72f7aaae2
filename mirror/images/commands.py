"""The image commands: `mirror warm`, `export`, `import`, `ls`, `rm`, `unpin`. Each reads
the store the server with the same config uses, and may run beside it."""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
from pathlib import Path
from typing import TextIO

from ..clock import system_clock
from ..config import Config
from ..core import Core
from ..errors import RegistryError
from ..maintenance import human
from ..reference import parse_digest
from ..routing import image_name, route_image
from ..store.base import blob_key, manifest_key
from ..store.disk import DiskStore
from ..store.tags import TagIndex
from .catalog import cached_images, remove_image, to_json
from .contents import Platform
from .layout import ArchiveError, Importer, archive_digests, write_archive
from .progress import Display
from .warm import Image, Warmer, parse_references


def _unwritable(output: Path) -> str | None:
    """Why an archive cannot be written at `output` (checked before anything is fetched)."""
    if output.is_dir():
        return "is a directory"
    folder = output.parent
    if not folder.is_dir():
        return f"{folder} is not a directory"
    if not os.access(folder, os.W_OK):
        return f"{folder} is not writable"
    return None


def _keys(images: list[Image]) -> set[str]:
    keys = {blob_key(blob.digest) for image in images for blob in image.blobs}
    for image in images:
        for manifest in image.manifests:
            digest = parse_digest(manifest.digest)
            if digest is not None:
                keys.add(manifest_key(digest))
    return keys


def references(given: list[str], from_file: Path | None) -> list[str]:
    found = list(given)
    if from_file is not None:
        found += parse_references(from_file.read_text().splitlines())
    return found


def platforms(asked: list[str] | None, every: bool) -> list[Platform] | None:
    """The platforms asked for (None: all of them); default this machine's."""
    if every:
        return None
    if not asked:
        return [Platform.here()]
    return [Platform.parse(text) for text in asked]


def _for_commands(config: Config, *, offline: bool = False) -> Config:
    """The config a command fetches with: no prefetch (`--jobs` says how many transfers
    run at once), and with `offline` every upstream offline (the cache only)."""
    upstreams = {
        name: dataclasses.replace(upstream, prefetch=False, offline=upstream.offline or offline)
        for name, upstream in config.upstreams.items()
    }
    return dataclasses.replace(config, offline=config.offline or offline, upstreams=upstreams)


async def warm(
    config: Config, refs: list[str], wanted: list[Platform] | None, jobs: int, out: TextIO
) -> int:
    if not refs:
        out.write("mirror warm: no image given\n")
        return 2
    core = Core.open(_for_commands(config), repair_store=False)
    display = Display()
    try:
        report = await Warmer(core, wanted, jobs, display).run(refs)
    finally:
        display.close()
        await core.close()
    out.write(f"warm: {report.summary()}\n")
    for text, why in report.failed.items():
        out.write(f"failed: {text}: {why}\n")
    return 1 if report.failed else 0


async def export(
    config: Config,
    refs: list[str],
    output: Path,
    wanted: list[Platform] | None,
    offline: bool,
    since: Path | None,
    jobs: int,
    out: TextIO,
) -> int:
    if not refs:
        out.write("mirror export: no image given\n")
        return 2
    skip = archive_digests(since) if since is not None else set()
    problem = _unwritable(output)
    if problem is not None:
        out.write(f"export: {output}: {problem}\n")
        return 2
    core = Core.open(_for_commands(config, offline=offline), repair_store=False)
    display = Display()
    try:
        report = await Warmer(core, wanted, jobs, display).run(refs)
        if report.failed:
            for text, why in report.failed.items():
                out.write(f"failed: {text}: {why}\n")
            out.write("export: nothing written\n")
            return 1
        # Held while written: a server beside us cannot evict what the archive needs.
        holding = f"export:{os.getpid()}:{secrets.token_hex(4)}"
        core.store.index.pin(holding, sorted(_keys(report.images)))
        started = time.monotonic()
        try:
            written = write_archive(report.images, core.store, output, skip)
        except ArchiveError as exc:
            out.write(f"export: {exc}\n")
            return 1
        finally:
            core.store.index.unpin(holding)
        seconds = max(time.monotonic() - started, 1e-6)
    finally:
        display.close()
        await core.close()
    size = output.stat().st_size
    out.write(
        f"export: {len(report.images)} image(s) to {output}: {written.manifests} manifests, "
        f"{written.blobs} blobs ({written.skipped} left out: the other side has them), "
        f"{human(size)} in {seconds:.1f}s ({size / seconds / 1e6:.0f} MB/s)\n"
    )
    return 0


def import_archives(config: Config, files: list[Path], out: TextIO) -> int:
    store = DiskStore(config.storage.path, config.storage.max_size, repair=False)
    tags = TagIndex(config.storage.path / "index", store.counters.write_failed)
    importer = Importer(config, store, tags, system_clock)
    status = 0
    started = time.monotonic()
    try:
        for path in files:
            try:
                names = importer.run(path)
            except (ArchiveError, OSError) as exc:
                out.write(f"import: {path}: refused: {exc}\n")
                status = 1
                continue
            for name in names:
                out.write(f"imported {name}\n")
    finally:
        tags.close()
        store.close()
    report = importer.report
    seconds = max(time.monotonic() - started, 1e-6)
    pinned = "; pinned (mirror unpin releases them)" if report.images else ""
    out.write(
        f"import: {len(report.images)} image(s), {report.manifests} manifests, {report.blobs} "
        f"blobs kept ({human(report.bytes)}, {report.bytes / seconds / 1e6:.0f} MB/s), "
        f"{report.present} already there{pinned}\n"
    )
    return status


def list_images(config: Config, as_json: bool, out: TextIO) -> int:
    store = DiskStore(config.storage.path, config.storage.max_size, repair=False)
    tags = TagIndex(config.storage.path / "index", store.counters.write_failed)
    try:
        images = cached_images(store, tags)
    finally:
        tags.close()
        store.close()
    if as_json:
        out.write(to_json(images) + "\n")
        return 0
    out.write(
        f"{'IMAGE':<50} {'DIGEST':<19} {'SIZE':>10} {'LAST USE':<16} {'PINNED':<6} "
        f"{'COMPLETE':<8} PLATFORMS\n"
    )
    for image in images:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(image.last_used))
        out.write(
            f"{image.reference:<50} {image.digest[:19]:<19} {human(image.size):>10} "
            f"{used:<16} {'yes' if image.pinned else 'no':<6} "
            f"{'yes' if image.complete else 'no':<8} {','.join(image.platforms) or '-'}\n"
        )
    return 0


def remove_images(config: Config, refs: list[str], unpin_only: bool, out: TextIO) -> int:
    store = DiskStore(config.storage.path, config.storage.max_size, repair=False)
    tags = TagIndex(config.storage.path / "index", store.counters.write_failed)
    status = 0
    try:
        for text in refs:
            try:
                route, reference = route_image(config, text)
            except RegistryError as exc:
                out.write(f"{exc.message}\n")  # it names the reference
                status = 1
                continue
            name = image_name(route, reference)
            if unpin_only:
                count = store.index.unpin(name)
                out.write(
                    f"unpinned {name} ({count} entries)\n" if count else f"{name}: not pinned\n"
                )
                status |= 0 if count else 1
                continue
            freed = remove_image(store, tags, route.upstream.name, route.repository, reference)
            if freed is None:
                out.write(f"{name}: not cached\n")
                status = 1
                continue
            out.write(f"removed {name} ({human(freed)} freed)\n")
    finally:
        tags.close()
        store.close()
    return status
