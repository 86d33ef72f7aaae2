"""Filling the cache with whole images, as pulls would: `mirror warm` and the content of
`mirror export`. It goes through the pull-through policy, so a layer another process (the
server beside it) is fetching is joined, never fetched twice, and a cached one is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from ..config import WarmConfig
from ..core import Core
from ..errors import RegistryError
from ..inflight import BlobStream, Transfer
from ..maintenance import human
from ..policy.answers import MISS, Manifest
from ..policy.manifests import ALL_MANIFEST_TYPES
from ..reference import Digest, parse_digest
from ..routing import Route, image_name, route_image
from ..store.base import StoredBlob
from ..store.disk import DiskStore
from .contents import BadManifest, Descriptor, Platform, blobs, children, is_index, wanted
from .progress import Display, LogLines

log = logging.getLogger("mirror.warm")

WARM_JOBS = 4  # the server's background warming: transfers at once
SETTLE_SECONDS = 60.0  # how long a fill another process ran may take to be renamed in


class WarmFailed(Exception):
    """One image could not be had, in words (the reference is in the report)."""


@dataclass
class Image:
    """One image as fetched: its full name, its manifests (the top one first, exact bytes)
    and the blobs of the platforms asked for."""

    name: str
    route: Route
    manifests: list[Manifest] = field(default_factory=list)
    blobs: list[Descriptor] = field(default_factory=list)


@dataclass
class Report:
    images: list[Image] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # reference -> why
    fetched: int = 0  # blobs fetched now
    cached: int = 0  # blobs found in the cache
    joined: int = 0  # blobs another transfer was fetching, followed to its end
    fetched_bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        asked = len(self.images) + len(self.failed)
        return (
            f"{len(self.images)} of {asked} image(s) ready, {len(self.failed)} failed; "
            f"{self.fetched} blob(s) "
            f"fetched ({human(self.fetched_bytes)}), {self.joined} joined a transfer under "
            f"way, {self.cached} already cached; "
            f"{self.seconds:.1f}s"
        )


class Warmer:
    def __init__(
        self,
        core: Core,
        platforms: list[Platform] | None,
        jobs: int,
        display: Display,
    ) -> None:
        self._core = core
        self._platforms = platforms  # None: every platform
        self._slots = asyncio.Semaphore(jobs)  # blob transfers at once, over every image
        self._display = display
        self.report = Report()

    async def run(self, references: list[str]) -> Report:
        started = time.monotonic()
        results = await asyncio.gather(*(self._one(text) for text in references))
        self.report.images = [image for image in results if image is not None]
        self.report.seconds = time.monotonic() - started
        return self.report

    async def _one(self, text: str) -> Image | None:
        try:
            image = await self.image(text)
        except (RegistryError, WarmFailed, BadManifest) as exc:
            why = exc.message if isinstance(exc, RegistryError) else str(exc)
            why = why.removeprefix(f"{text}: ")  # said once, before it
            self.report.failed[text] = why
            self._display.say(f"failed {text}: {why}")
            return None
        self._display.say(f"ready  {image.name} ({len(image.blobs)} blobs)")
        return image

    async def image(self, text: str) -> Image:
        """Every manifest and blob of `text` for the platforms asked for, in the cache."""
        route, reference = route_image(self._core.config, text)
        top = await self._manifest(route, reference)
        image = Image(image_name(route, reference), route, [top])
        await self._walk(image, top)
        if not image.blobs:
            raise WarmFailed(f"no manifest for {self._asked()} in {image.name}")
        await asyncio.gather(*(self._blob(image, blob) for blob in image.blobs))
        await self._check_kept(image)
        return image

    async def _check_kept(self, image: Image) -> None:
        """Every manifest and blob of `image` is in the store now: none was refused by
        the disk or evicted again (an image larger than max_size) on the way."""
        store = self._core.store

        def missing() -> str | None:
            for manifest in image.manifests:
                digest = parse_digest(manifest.digest)
                if digest is None or store.get_manifest(digest) is None:
                    return f"manifest {manifest.digest}"
            for blob in image.blobs:
                if not store.has_blob(blob.digest):
                    return f"blob {blob.digest}"
            return None

        gone = await asyncio.to_thread(missing)
        if gone is not None:
            raise WarmFailed(
                f"{gone} is not in the store after all (a full disk, or the image is larger "
                "than storage.max_size)"
            )

    def _asked(self) -> str:
        return ", ".join(map(str, self._platforms)) if self._platforms else "any platform"

    async def _manifest(self, route: Route, reference: str) -> Manifest:
        manifest = await self._core.proxy.manifest(route, reference, ALL_MANIFEST_TYPES, head=False)
        assert manifest.data is not None  # a GET's answer
        return manifest

    async def _walk(self, image: Image, manifest: Manifest) -> None:
        assert manifest.data is not None
        if not is_index(manifest.media_type, manifest.data):
            known = {blob.digest for blob in image.blobs}
            image.blobs += [b for b in blobs(manifest.data) if b.digest not in known]
            return
        for entry in children(manifest.data):
            if wanted(entry, self._platforms):
                child = await self._manifest(image.route, str(entry.digest))
                image.manifests.append(child)
                await self._walk(image, child)

    async def _blob(self, image: Image, blob: Descriptor) -> None:
        async with self._slots:
            await self.fetch_blob(image.route, blob.digest, blob.size)

    async def _stored(self, source: BlobStream, digest: Digest) -> bool:
        """Whether the transfer just read kept the blob: after its last byte come the
        fsync and the rename (here, or in the process that runs the fill)."""
        if isinstance(source, Transfer):
            await source.settled.wait()
            return await asyncio.to_thread(self._core.store.has_blob, digest)
        return await _stored_soon(self._core.store, digest)

    async def fetch_blob(self, route: Route, digest: Digest, size: int) -> None:
        """Have `digest` in the store: a hit, or a transfer (this one, or one already
        running here or in another process) read to its end."""
        source, result = await self._core.proxy.open_blob(route, digest)
        if isinstance(source, StoredBlob):
            source.close()
            self.report.cached += 1
            return
        key = str(digest)
        label = f"{route.upstream.name}/{route.repository} {key[7:19]}"
        self._display.start(key, label, source.size if source.size is not None else size)
        started, received = time.monotonic(), 0
        try:
            async for chunk in source.read(0, None):
                received += len(chunk)
                self._display.advance(key, len(chunk))
        except Exception as exc:  # a transfer that broke: TransferFailed, or worse
            self._display.finish(key, f"broke  {label}: {exc}")
            raise WarmFailed(f"{digest}: the transfer broke ({exc})") from None
        if not await self._stored(source, digest):
            self._display.finish(key, f"not kept {label}")
            raise WarmFailed(f"{digest} was fetched but not kept (a full disk, or over max_size)")
        seconds = time.monotonic() - started
        self._display.finish(key, f"fetched {label} {human(received)} in {seconds:.1f}s")
        if result == MISS:
            self.report.fetched += 1
            self.report.fetched_bytes += received
        else:  # a transfer already under way (a prefetch, the server beside us): joined
            self.report.joined += 1


async def _stored_soon(store: DiskStore, digest: Digest) -> bool:
    deadline = time.monotonic() + SETTLE_SECONDS
    while not await asyncio.to_thread(store.has_blob, digest):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def parse_references(lines: list[str]) -> list[str]:
    """References from a file's lines: one per line, `#` comments and blanks skipped."""
    found = []
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if text:
            found.append(text)
    return found


async def keep_warm(core: Core, settings: WarmConfig) -> None:
    """The server's `warm:` list: fetched at start-up, then every `every` seconds (tags past
    their TTL revalidated, new layers fetched), before anyone asks."""
    platforms = [Platform.parse(text) for text in settings.platforms] or [Platform.here()]
    while True:
        display = Display(LogLines(log))
        report = await Warmer(core, platforms, WARM_JOBS, display).run(list(settings.images))
        log.info("warm: %s", report.summary())
        for text, why in report.failed.items():
            log.warning("warm: %s failed: %s", text, why)
        await asyncio.sleep(settings.every)
