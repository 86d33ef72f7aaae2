"""A hosted namespace: the push half of the distribution API over the same store.

Pushed blobs and manifests go into the content-addressed store the mirror caches in (a
blob pushed and also pulled through is kept once), each pinned by the repository holding
it, so the LRU never evicts them; the hosted index says which repository may see what.
Nothing becomes visible before it verifies: an upload is checked against its digest, a
manifest against its digest and its references, and only then stored, pinned, indexed.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import (
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    HostedFull,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    RangeInvalid,
    SizeInvalid,
)
from ..reference import Digest, digest_of, is_manifest_type, parse_digest
from ..routing import Route
from ..store.base import WRITE_ERRORS, DigestMismatch, StoredBlob, blob_key, manifest_key
from ..store.disk import DiskStore
from .index import HostedIndex
from .uploads import Uploads, UploadUnknown

log = logging.getLogger("mirror.hosted")

MANIFEST_MAX = 8 * 1024 * 1024  # bytes of one pushed manifest (the spec asks for 4 MiB)
COPY_CHUNK = 1024 * 1024
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
UNREFERENCED_GRACE = 3600.0  # seconds a pushed blob waits for the manifest that uses it
HOLD_POLL = 0.02  # seconds between tries for an upload another request holds
HOLD_WAIT = 120.0  # seconds a request waits for it
ROOM_RECHECK = 8 * 1024 * 1024  # bytes an upload takes between looks at the room left


@dataclass(frozen=True)
class Pushed:
    """A manifest as stored: what a GET answers."""

    digest: str
    media_type: str
    data: bytes


class Hosted:
    """Pushes to, and reads of, every hosted namespace."""

    def __init__(self, config: Config, store: DiskStore) -> None:
        folder = config.storage.path / "hosted"
        self._store = store
        self.index = HostedIndex(folder / "index.db")
        self.uploads = Uploads(folder / "uploads", config.storage.upload_expiry)
        self._bound = config.storage.hosted_max_size or config.storage.max_size
        self._bound_file = folder / "bound.lock"

    def close(self) -> None:
        self.index.close()

    @staticmethod
    def _repo(route: Route) -> str:
        return f"{route.upstream.name}/{route.repository}"

    def _pin(self, route: Route) -> str:
        return f"hosted:{self._repo(route)}"

    # uploads

    async def begin_upload(self, route: Route) -> str:
        return await asyncio.to_thread(self.uploads.begin, self._repo(route))

    async def upload_size(self, route: Route, upload: str) -> int:
        try:
            return await asyncio.to_thread(self.uploads.size, self._repo(route), upload)
        except UploadUnknown:
            raise BlobUploadUnknown(detail={"upload": upload}) from None

    async def cancel_upload(self, route: Route, upload: str) -> None:
        try:
            await asyncio.to_thread(self.uploads.remove, self._repo(route), upload)
        except UploadUnknown:
            raise BlobUploadUnknown(detail={"upload": upload}) from None

    async def append(
        self,
        route: Route,
        upload: str,
        body: AsyncIterator[bytes],
        start: int | None,
        length: int | None,
    ) -> int:
        """Add a chunk to an upload; its new size. A chunk with a `Content-Range` must
        begin where the upload ends (else 416, and nothing is added); a chunk cut short,
        refused or past the bound is not kept: the upload stays as it was."""
        async with self._holding(route, upload) as (fd, size):
            if start is not None and start != size:
                raise RangeInvalid(
                    f"the upload has {size} bytes: a chunk must start at {size}",
                    headers={"Range": f"0-{size - 1}" if size else "0-0"},
                )
            received = 0
            room, looked_at = await asyncio.to_thread(self._room), 0
            try:
                async for chunk in body:
                    received += len(chunk)
                    if received > room or received - looked_at > ROOM_RECHECK:
                        # Looked at again now and then: uploads at once count each other.
                        room, looked_at = (
                            received - len(chunk) + await asyncio.to_thread(self._room),
                            received,
                        )
                        if received > room:
                            raise HostedFull(
                                f"storage.hosted_max_size ({self._bound} bytes) would be "
                                "exceeded by this upload (pushed content and uploads in "
                                "progress count)"
                            )
                    await asyncio.to_thread(_write_all, fd, chunk)
                if length is not None and received != length:
                    raise SizeInvalid(f"{received} bytes sent, {length} announced")
            except BaseException:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)  # the chunk is not taken: the upload as it was
                raise
            return size + received

    @contextlib.asynccontextmanager
    async def _bound_lock(self) -> AsyncIterator[None]:
        """The bound's check and the pin as one, across requests and worker processes."""
        fd = os.open(self._bound_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await _locked(fd, "the hosted storage is busy")
            yield
        finally:
            os.close(fd)

    def _room(self) -> int:
        """Bytes left under storage.hosted_max_size: pushed content and uploads in
        progress count (blocking)."""
        pinned = self._store.index.pinned_bytes("hosted:%")
        return self._bound - pinned - self.uploads.bytes_in_progress()

    @contextlib.asynccontextmanager
    async def _holding(self, route: Route, upload: str) -> AsyncIterator[tuple[int, int]]:
        """The upload's file and its size, locked against every other request for it (in
        any worker) until the block ends."""
        repo = self._repo(route)
        try:
            fd = await asyncio.to_thread(self.uploads.open, repo, upload)
        except UploadUnknown:
            raise BlobUploadUnknown(detail={"upload": upload}) from None
        try:
            await _locked(fd, f"upload {upload} is busy with another request")
            try:
                size = await asyncio.to_thread(self.uploads.size_held, repo, upload, fd)
            except UploadUnknown:
                raise BlobUploadUnknown(detail={"upload": upload}) from None
            yield fd, size
        finally:
            os.close(fd)  # (and the lock with it)

    async def finish(self, route: Route, upload: str, digest_text: str | None) -> Digest:
        """Close an upload with its digest: checked, then stored, pinned and linked."""
        digest = parse_digest(digest_text or "")
        if digest is None:
            raise DigestInvalid(
                "a digest query parameter naming the content is required",
                detail={"digest": digest_text},
            )
        repo = self._repo(route)
        async with self._holding(route, upload) as (_, size):
            try:
                path = await asyncio.to_thread(self.uploads.path, repo, upload)
            except UploadUnknown:
                raise BlobUploadUnknown(detail={"upload": upload}) from None
            try:
                await self._keep_blob(route, digest, size, path)  # (checked on the way)
            except DigestInvalid:
                await asyncio.to_thread(self.uploads.remove, repo, upload)
                raise
            with contextlib.suppress(UploadUnknown):
                await asyncio.to_thread(self.uploads.remove, repo, upload)
        return digest

    async def _keep_blob(self, route: Route, digest: Digest, size: int, path: Path) -> None:
        """Put the upload's bytes in the store, checked against `digest` as they are
        copied (or, when the store has the blob already, by a hash of their own), pinned
        for the repository, and link them to it. DigestInvalid when they do not match."""
        key = blob_key(digest)
        if self._store.has_blob(digest) and not await asyncio.to_thread(_matches, path, digest):
            raise DigestInvalid(
                f"the uploaded content does not match {digest}", detail={"digest": str(digest)}
            )
        async with self._bound_lock():
            if not await asyncio.to_thread(self._store.index.is_pinned, key):
                hosted = await asyncio.to_thread(self._store.index.pinned_bytes, "hosted:%")
                if hosted + size > self._bound:
                    raise HostedFull(
                        f"storage.hosted_max_size ({self._bound} bytes) would be exceeded: "
                        f"{hosted} bytes are pushed already"
                    )
            if not self._store.has_blob(digest):
                await self._copy_in(route, digest, path)
            await asyncio.to_thread(self._store.index.pin, self._pin(route), [key])
        if not self._store.has_blob(digest):  # evicted between the two: put it back
            await self._copy_in(route, digest, path)
        await asyncio.to_thread(self.index.link_blob, self._repo(route), str(digest), size)

    async def _copy_in(self, route: Route, digest: Digest, path: Path) -> None:
        for _ in range(100):
            temp = self._store.begin_blob(digest, route.upstream.name, route.repository)
            if temp is not None:
                break
            if self._store.has_blob(digest):
                return
            await asyncio.sleep(0.05)  # another writer of the same digest: wait for it
        else:
            raise BlobUploadInvalid(f"another writer of {digest} did not finish")
        try:
            await asyncio.to_thread(_copy_into, path, temp)
            kept = await asyncio.to_thread(_commit, temp)
        except DigestMismatch:
            temp.discard()
            raise DigestInvalid(
                f"the uploaded content does not match {digest}", detail={"digest": str(digest)}
            ) from None
        except WRITE_ERRORS as exc:
            temp.discard()
            raise HostedFull(f"the store could not keep {digest}: {exc}") from None
        if not kept:
            raise HostedFull(f"the store could not keep {digest} (the disk is full)")

    async def put_blob(self, route: Route, digest_text: str, body: AsyncIterator[bytes]) -> Digest:
        """A monolithic upload (POST with the digest and the whole blob)."""
        upload = await self.begin_upload(route)
        try:
            await self.append(route, upload, body, None, None)
            return await self.finish(route, upload, digest_text)
        except BaseException:
            with contextlib.suppress(BlobUploadUnknown):
                await self.cancel_upload(route, upload)
            raise

    async def holders(self, digest_text: str) -> list[tuple[str, str]]:
        """(upstream, repository) of every hosted repository holding a blob."""
        found = await asyncio.to_thread(self.index.repositories_with, digest_text)
        return [(repo.partition("/")[0], repo.partition("/")[2]) for repo in found]

    async def mount(self, route: Route, digest_text: str, source: Route) -> Digest | None:
        """Link a blob `source` (a hosted repository the client may read) holds; None
        when it cannot be mounted (the client then uploads it)."""
        digest = parse_digest(digest_text)
        if digest is None or not source.upstream.hosted or not self._store.has_blob(digest):
            return None
        found = await asyncio.to_thread(self.index.blob_size, self._repo(source), str(digest))
        if found is None:
            return None
        await asyncio.to_thread(self._store.index.pin, self._pin(route), [blob_key(digest)])
        await asyncio.to_thread(self.index.link_blob, self._repo(route), str(digest), found)
        return digest

    async def seen(self, route: Route, digest: Digest) -> None:
        """A client asked whether the repository holds a blob (a push checking before it
        sends its manifest): the blob's grace before gc starts anew."""
        await asyncio.to_thread(self.index.touch_blob, self._repo(route), str(digest))

    # blobs

    async def blob_size(self, route: Route, digest: Digest) -> int:
        size = await asyncio.to_thread(self.index.blob_size, self._repo(route), str(digest))
        if size is None or not self._store.has_blob(digest):
            raise BlobUnknown(detail={"digest": str(digest)})
        return size

    async def open_blob(self, route: Route, digest: Digest) -> StoredBlob:
        await self.blob_size(route, digest)
        stored = self._store.open_blob(digest)
        if stored is None:
            raise BlobUnknown(detail={"digest": str(digest)})
        return stored

    async def delete_blob(self, route: Route, digest: Digest) -> None:
        repo = self._repo(route)
        if not await asyncio.to_thread(self.index.unlink_blob, repo, str(digest)):
            raise BlobUnknown(detail={"digest": str(digest)})
        await asyncio.to_thread(self._store.index.unpin_key, self._pin(route), blob_key(digest))

    # manifests

    async def put_manifest(
        self, route: Route, reference: str, data: bytes, content_type: str, tags: list[str]
    ) -> tuple[Digest, str | None]:
        """Check and keep a pushed manifest under its digest (and `reference` when it is a
        tag, and `tags`); its digest and its subject's."""
        if len(data) > MANIFEST_MAX:
            raise ManifestInvalid(f"a manifest of over {MANIFEST_MAX} bytes is not taken")
        try:
            document = json.loads(data)
        except ValueError:
            raise ManifestInvalid("the manifest is not JSON") from None
        if not isinstance(document, dict):
            raise ManifestInvalid("the manifest is not a JSON object")
        media_type = _media_type(content_type, document)
        named = parse_digest(reference)
        algorithm = named.algorithm if named is not None else "sha256"
        digest = digest_of(data, algorithm)
        if named is not None and named != digest:
            raise DigestInvalid(
                f"the manifest's {algorithm} is {digest}, not {named}",
                detail={"digest": reference},
            )
        repo = self._repo(route)
        refers_to = await self._check_references(route, document)
        subject = _descriptor_digest(document.get("subject"))
        key = manifest_key(digest)
        try:
            kept = await asyncio.to_thread(
                self._store.put_manifest,
                digest,
                data,
                media_type,
                route.upstream.name,
                route.repository,
            )
        except DigestMismatch:
            raise DigestInvalid(detail={"digest": str(digest)}) from None
        if not kept:
            raise HostedFull("the store could not keep the manifest (the disk is full)")
        await asyncio.to_thread(self._store.index.pin, self._pin(route), [key])
        await asyncio.to_thread(
            self.index.put_manifest,
            repo,
            str(digest),
            media_type,
            len(data),
            refers_to,
            subject,
            _artifact_type(document),
            json.dumps(document["annotations"])
            if isinstance(document.get("annotations"), dict)
            else None,
        )
        for tag in ([] if named is not None else [reference]) + tags:
            await asyncio.to_thread(self.index.tag, repo, tag, str(digest))
        log.info("pushed %s@%s (%s, %d bytes)", repo, digest, media_type, len(data))
        return digest, subject

    async def _check_references(self, route: Route, document: dict[str, Any]) -> list[str]:
        """What a manifest refers to, each of which the repository must hold: its config
        and layers, or an index's children."""
        repo = self._repo(route)
        wanted: list[tuple[str, bool]] = []  # (digest, a manifest)
        for field in ("config", "layers", "blobs"):
            items = document.get(field)
            for item in items if isinstance(items, list) else [items]:
                if item is None:
                    continue
                digest = _checked_descriptor(item, field)
                if field != "layers" or not _foreign(item):  # (lives at its urls)
                    wanted.append((digest, False))
        children = document.get("manifests")
        if isinstance(children, list):
            for child in children:
                wanted.append((_checked_descriptor(child, "manifests"), True))
        for digest, is_manifest in wanted:
            held = self.index.manifest if is_manifest else self.index.blob_size
            if await asyncio.to_thread(held, repo, digest) is None:
                raise ManifestBlobUnknown(
                    f"the manifest refers to {digest}, which {repo} does not hold",
                    detail={"digest": digest},
                )
        return [digest for digest, _ in wanted]

    async def manifest(self, route: Route, reference: str) -> Pushed:
        repo = self._repo(route)
        digest_text: str | None = reference
        if parse_digest(reference) is None:
            digest_text = await asyncio.to_thread(self.index.resolve, repo, reference)
        known = (
            await asyncio.to_thread(self.index.manifest, repo, digest_text)
            if digest_text is not None
            else None
        )
        digest = parse_digest(digest_text or "")
        found = self._store.get_manifest(digest) if known and digest else None
        if found is None or digest is None:
            raise ManifestUnknown(detail={"reference": reference})
        return Pushed(str(digest), found[1], found[0])

    async def delete_manifest(self, route: Route, reference: str) -> None:
        """By digest: the manifest and its tags; by tag: the tag alone."""
        repo = self._repo(route)
        digest = parse_digest(reference)
        if digest is None:
            if not await asyncio.to_thread(self.index.untag, repo, reference):
                raise ManifestUnknown(detail={"reference": reference})
            return
        if not await asyncio.to_thread(self.index.delete_manifest, repo, str(digest)):
            raise ManifestUnknown(detail={"reference": reference})
        await asyncio.to_thread(self._store.index.unpin_key, self._pin(route), manifest_key(digest))

    # lists

    async def tags(self, route: Route) -> list[str]:
        repo = self._repo(route)
        tags = await asyncio.to_thread(self.index.tags, repo)
        if not tags and not await asyncio.to_thread(self.index.known, repo):
            raise NameUnknown(detail={"name": route.repository})
        return sorted(tags)

    async def referrers(
        self, route: Route, subject: Digest, artifact_type: str | None
    ) -> dict[str, Any]:
        """The OCI index of the manifests whose subject is `subject`."""
        found = await asyncio.to_thread(self.index.referrers, self._repo(route), str(subject))
        manifests = []
        for referrer in found:
            if artifact_type is not None and referrer.artifact_type != artifact_type:
                continue
            descriptor: dict[str, Any] = {
                "mediaType": referrer.media_type,
                "digest": referrer.digest,
                "size": referrer.size,
            }
            if referrer.artifact_type is not None:
                descriptor["artifactType"] = referrer.artifact_type
            if referrer.annotations is not None:
                descriptor["annotations"] = json.loads(referrer.annotations)
            manifests.append(descriptor)
        return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}

    # maintenance

    def collect(self, now: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Unlink the blobs no manifest of their repository refers to (pushed over
        UNREFERENCED_GRACE ago: a push puts its blobs before its manifest), removing those
        nothing else pins; remove expired uploads. (blobs unlinked, uploads removed);
        with `dry_run`, what would be. Blocking; safe beside a live server."""
        cutoff = now - UNREFERENCED_GRACE
        unreferenced = self.index.unreferenced_blobs(cutoff)
        if dry_run:
            return len(unreferenced), 0
        unlinked = 0
        for repo, digest_text in unreferenced:
            digest = parse_digest(digest_text)
            # (not if pushed again or looked for since the list was read)
            if digest is None or not self.index.unlink_blob(repo, digest_text, cutoff):
                continue
            key = blob_key(digest)
            self._store.index.unpin_key(f"hosted:{repo}", key)
            if not self._store.index.is_pinned(key):
                self._store.remove(key)
            unlinked += 1
        return unlinked, self.uploads.expire()


async def _locked(fd: int, busy: str) -> None:
    """An exclusive flock on `fd`, tried without parking a thread (the default executor
    has few) until HOLD_WAIT has passed."""
    for _ in range(int(HOLD_WAIT / HOLD_POLL)):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await asyncio.sleep(HOLD_POLL)
    raise BlobUploadInvalid(busy)


def _matches(path: Path, digest: Digest) -> bool:
    hasher = digest.hasher()
    with path.open("rb") as file:
        while chunk := file.read(COPY_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest() == digest.hex


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _copy_into(path: Path, temp: Any) -> None:
    with path.open("rb") as file:
        while chunk := file.read(COPY_CHUNK):
            temp.write(chunk)
    temp.sync()


def _commit(temp: Any) -> bool:
    return bool(temp.commit())


def _media_type(content_type: str, document: dict[str, Any]) -> str:
    """The pushed manifest's type: its Content-Type, which must agree with its own
    `mediaType` when it has one."""
    declared = content_type.split(";")[0].strip().lower()
    inner = document.get("mediaType")
    if not declared or declared == "application/json":
        declared = inner if isinstance(inner, str) else ""
    if not is_manifest_type(declared):
        raise ManifestInvalid(f"{declared or 'no type'} is not a manifest media type")
    if isinstance(inner, str) and inner.lower() != declared:
        raise ManifestInvalid(f"Content-Type {declared} but mediaType {inner}")
    return declared


def _checked_descriptor(item: Any, field: str) -> str:
    digest = _descriptor_digest(item)
    if digest is None:
        raise ManifestInvalid(f"{field}: a descriptor without a valid digest")
    return digest


def _foreign(item: Any) -> bool:
    """A non-distributable layer: fetched from its `urls`, never pushed."""
    if not isinstance(item, dict):
        return False
    media_type = str(item.get("mediaType", ""))
    urls = item.get("urls")
    kind = "nondistributable" in media_type or ".foreign." in media_type
    return kind and isinstance(urls, list) and bool(urls)


def _descriptor_digest(item: Any) -> str | None:
    if not isinstance(item, dict):
        return None
    digest = parse_digest(str(item.get("digest", "")))
    return None if digest is None else str(digest)


def _artifact_type(document: dict[str, Any]) -> str | None:
    """The artifact type a referrers answer lists: `artifactType`, else (for an image
    manifest) its config's media type."""
    declared = document.get("artifactType")
    if isinstance(declared, str) and declared:
        return declared
    config = document.get("config")
    if isinstance(config, dict) and isinstance(config.get("mediaType"), str):
        return str(config["mediaType"])
    return None
