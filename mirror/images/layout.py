"""OCI image layout archives: what `mirror export` writes and `mirror import` reads.

An archive is a tar of `oci-layout`, `index.json` and `blobs/sha256/<hex>`, every image in
`index.json` named by `org.opencontainers.image.ref.name` and `io.containerd.image.name`
(the full reference), so skopeo (`oci-archive:FILE:NAME`), `ctr image import` and oras
read it. Import reads those and the layouts skopeo, Hauler and `docker save` (Docker 25+)
write, as tar or directory; every byte is checked against its digest before it is kept,
and tags are recorded only once everything an image needs is in the store.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import secrets
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ..config import Config
from ..errors import RegistryError
from ..reference import Digest, digest_of, is_manifest_type, manifest_matches, parse_digest
from ..routing import Route, image_name, route_image
from ..store.base import DigestMismatch, blob_key, manifest_key
from ..store.disk import DiskStore
from ..store.tags import TagEntry, TagIndex
from ..upstream.bodies import MANIFEST_LIMIT
from .contents import BadManifest, blobs, children, is_index
from .warm import Image

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CHUNK = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"  # docker save's layers: uncompressed


# What a cut or damaged archive raises while it is read.
DAMAGED = (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError)
FOLLOW_SECONDS = 120.0  # how long to wait for a blob another process is writing


class ArchiveError(Exception):
    """An archive that cannot be imported, in words (the digest that failed, the name
    that is missing)."""


@dataclass
class Written:
    blobs: int = 0
    manifests: int = 0
    skipped: int = 0  # blobs the other side has (--since)
    bytes: int = 0


def _blob_name(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def write_archive(images: list[Image], store: DiskStore, output: Path, skip: set[str]) -> Written:
    """The archive of `images`, from the store, leaving out the blobs in `skip` (the other
    side has them); written beside `output` and renamed, so no half archive is left."""
    written = Written()
    index: list[dict[str, Any]] = []
    added: set[str] = set()
    partial = output.with_name(f".{output.name}.{os.getpid()}.part")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            for image in images:
                for manifest in image.manifests:
                    assert manifest.data is not None
                    if manifest.digest not in added:
                        added.add(manifest.digest)
                        digest = parse_digest(manifest.digest)
                        assert digest is not None
                        _add_bytes(tar, _blob_name(digest), manifest.data)
                        written.manifests += 1
                for blob in image.blobs:
                    key = str(blob.digest)
                    if key in added:
                        continue
                    added.add(key)
                    if key in skip:
                        written.skipped += 1
                        continue
                    path = store.final_path(blob.digest)
                    try:
                        info = tar.gettarinfo(str(path), _blob_name(blob.digest))
                        info.mode, info.uid, info.gid = 0o644, 0, 0
                        info.uname = info.gname = ""
                        with path.open("rb") as file:
                            tar.addfile(info, file)
                    except FileNotFoundError:
                        raise ArchiveError(
                            f"blob {blob.digest} left the store before it was written (the "
                            "images are larger than storage.max_size?)"
                        ) from None
                    written.blobs += 1
                    written.bytes += info.size
                top = image.manifests[0]
                annotations = {CONTAINERD_NAME: image.name}
                if "@" not in image.name:
                    annotations[REF_NAME] = image.name
                index.append(
                    {
                        "mediaType": top.media_type,
                        "digest": top.digest,
                        "size": top.size,
                        "annotations": annotations,
                    }
                )
            document = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": index}
            _add_bytes(tar, "index.json", json.dumps(document, indent=2).encode())
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return written


def archive_digests(path: Path) -> set[str]:
    """The digests an earlier archive carries (for `--since`), or, for a text file, the
    digests it lists one per line."""
    if tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            names = tar.getnames()
        found = {
            f"{parts[-2]}:{parts[-1]}"
            for name in names
            if len(parts := name.removeprefix("./").split("/")) == 3 and parts[0] == "blobs"
        }
        return found
    lines = path.read_text().split()
    return {line for line in lines if parse_digest(line) is not None}


# reading


class Layout:
    """An OCI layout to read: a directory, or a tar of one (compressed or not)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
            members = self._tar.getmembers()
        except DAMAGED as exc:
            raise ArchiveError(f"{path}: not a whole tar archive ({exc})") from None
        for member in members:
            if member.isfile():
                self._members[member.name.removeprefix("./")] = member

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def has(self, name: str) -> bool:
        if self._tar is None:
            return (self.path / name).is_file()
        return name in self._members

    def open(self, name: str) -> IO[bytes]:
        if self._tar is None:
            return (self.path / name).open("rb")
        member = self._members.get(name)
        file = self._tar.extractfile(member) if member is not None else None
        if file is None:
            raise ArchiveError(f"{self.path}: {name} is missing")
        return file

    def size(self, name: str) -> int:
        if self._tar is None:
            return (self.path / name).stat().st_size
        member = self._members.get(name)
        return member.size if member is not None else 0

    def read(self, name: str, limit: int) -> bytes:
        with self.open(name) as file:
            data = file.read(limit + 1)
        if len(data) > limit:
            raise ArchiveError(f"{self.path}: {name} is over {limit} bytes")
        return data


@dataclass
class Imported:
    images: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0  # kept now
    present: int = 0  # in the store already
    bytes: int = 0


def _name_of(entry: dict[str, Any]) -> str | None:
    """The full reference an index.json entry names: containerd's annotation, else the OCI
    ref name when it is a full reference (skopeo writes whatever it was given)."""
    annotations = entry.get("annotations") or {}
    for key in (CONTAINERD_NAME, REF_NAME):
        name = annotations.get(key)
        if isinstance(name, str) and "/" in name:
            return name
    return None


class Importer:
    """Imports layouts into a store, verifying everything, recording tags last."""

    def __init__(
        self,
        config: Config,
        store: DiskStore,
        tags: TagIndex,
        clock: Callable[[], float],
        progress: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._config = config
        self._store = store
        self._tags = tags
        self._clock = clock
        self._progress = progress
        self._media_types: dict[str, str] = {}  # of the manifests kept
        # What this import has kept so far is pinned under this name until the images'
        # own names pin it: eviction cannot take an image apart while it comes in.
        self._holding = f"import:{os.getpid()}:{secrets.token_hex(4)}"
        self.report = Imported()

    def run(self, path: Path) -> list[str]:
        """Import one layout; the full names of the images it held."""
        layout = Layout(path)
        try:
            return self._run(layout)
        except DAMAGED as exc:
            if isinstance(exc, OSError) and not isinstance(exc, tarfile.TarError):
                raise
            raise ArchiveError(f"{path}: the archive is cut short or damaged ({exc})") from None
        finally:
            self._store.index.unpin(self._holding)
            layout.close()

    def _hold(self, key: str) -> None:
        self._store.index.pin(self._holding, [key])

    def _check_room(self, layout: Layout, needed: int) -> None:
        """Refuse, before writing anything, an import that cannot fit beside what is
        pinned already: pinned content is never evicted, so it would overflow the bound."""
        bound = self._store.max_size
        pinned = self._store.index.pinned_bytes()
        if pinned + needed > bound:
            raise ArchiveError(
                f"{layout.path}: needs {needed} bytes, and {pinned} of storage.max_size "
                f"({bound}) are pinned already: raise max_size, or unpin images"
            )

    def _needed(self, layout: Layout, digest: Digest, seen: set[str]) -> int:
        """Bytes of the blobs below `digest` that the archive holds and the store lacks."""
        name = _blob_name(digest)
        if not layout.has(name):
            return 0
        data = layout.read(name, MANIFEST_LIMIT)
        total = 0
        try:
            if is_index(_declared_type(data) or "", data):
                return sum(self._needed(layout, c.digest, seen) for c in children(data))
            for blob in blobs(data):
                key = str(blob.digest)
                blob_name = _blob_name(blob.digest)
                if key in seen or not layout.has(blob_name) or self._store.has_blob(blob.digest):
                    continue
                seen.add(key)
                total += layout.size(blob_name)
        except BadManifest:
            return 0  # refused with its digest when it is kept
        return total

    def _run(self, layout: Layout) -> list[str]:
        if not layout.has("index.json"):
            if layout.has("manifest.json"):
                return self._docker_save(layout)
            raise ArchiveError(
                f"{layout.path}: neither index.json (an OCI image layout) nor manifest.json "
                "(docker save)"
            )
        try:
            index = json.loads(layout.read("index.json", MANIFEST_LIMIT))
            entries = index["manifests"]
            assert isinstance(entries, list)
        except (ValueError, KeyError, TypeError, AssertionError):
            raise ArchiveError(f"{layout.path}: index.json is not an image index") from None
        seen: set[str] = set()
        needed = 0
        for entry in entries:
            digest = parse_digest(str(entry.get("digest", ""))) if isinstance(entry, dict) else None
            if digest is not None:
                needed += self._needed(layout, digest, seen)
        self._check_room(layout, needed)
        plans = []
        for entry in entries:
            name = _name_of(entry if isinstance(entry, dict) else {})
            if name is None:
                raise ArchiveError(
                    f"{layout.path}: an image in index.json has no full reference in its "
                    f"annotations ({CONTAINERD_NAME} or {REF_NAME}, e.g. "
                    "docker.io/library/alpine:3.20)"
                )
            try:
                route, reference = route_image(self._config, name)
            except RegistryError as exc:
                raise ArchiveError(f"{layout.path}: {exc.message}") from None
            digest = parse_digest(str(entry.get("digest", "")))
            if digest is None:
                raise ArchiveError(f"{layout.path}: {name} has no digest in index.json")
            keys = self._keep_manifest(layout, digest, str(entry.get("mediaType", "")), route)
            plans.append((name, route, reference, digest, keys))
        names = []
        for _, route, reference, digest, keys in plans:  # everything is in: now the names
            media_type = self._media_types[str(digest)]
            full = image_name(route, reference)
            if parse_digest(reference) is None:
                entry = TagEntry(str(digest), media_type, self._clock())
                self._tags.put(route.upstream.name, route.repository, reference, entry)
            self._store.index.pin(full, sorted(keys))
            names.append(full)
        self.report.images += [name for name in names if name not in self.report.images]
        return names

    def _docker_save(self, layout: Layout) -> list[str]:
        """A `docker save` archive of Docker before 25 (no OCI layout): each image becomes
        an OCI manifest over its config and its uncompressed layer tars (the digests
        `docker save` never had are made here: there is no upstream's to keep)."""
        try:
            images = json.loads(layout.read("manifest.json", MANIFEST_LIMIT))
            assert isinstance(images, list)
        except (ValueError, AssertionError):
            raise ArchiveError(f"{layout.path}: manifest.json is not docker save's") from None
        layer_names = {
            str(name)
            for entry in images
            if isinstance(entry, dict)
            for name in entry.get("Layers", [])
        }
        self._check_room(layout, sum(layout.size(name) for name in layer_names))
        names = []
        for entry in images:
            tags = entry.get("RepoTags") or [] if isinstance(entry, dict) else []
            if not tags:
                continue  # an image saved by ID: no name to serve it under
            config = layout.read(str(entry["Config"]), MANIFEST_LIMIT)
            config_digest = self._keep_bytes(config)
            layers = []
            for name in entry.get("Layers", []):
                digest, size = self._keep_file(layout, str(name))
                layers.append({"mediaType": OCI_LAYER, "digest": str(digest), "size": size})
            manifest = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_MANIFEST,
                    "config": {
                        "mediaType": OCI_CONFIG,
                        "digest": str(config_digest),
                        "size": len(config),
                    },
                    "layers": layers,
                },
                indent=2,
            ).encode()
            digest = digest_of(manifest)
            keys = {manifest_key(digest), blob_key(config_digest)}
            keys |= {blob_key(parse_digest(layer["digest"])) for layer in layers}  # type: ignore[arg-type]
            for tag in tags:
                try:
                    route, reference = route_image(self._config, str(tag))
                except RegistryError as exc:
                    raise ArchiveError(f"{layout.path}: {exc.message}") from None
                if not self._store.put_manifest(
                    digest, manifest, OCI_MANIFEST, route.upstream.name, route.repository
                ):
                    raise ArchiveError(f"the store cannot keep manifest {digest} (a full disk?)")
                self._hold(manifest_key(digest))
                entry_ = TagEntry(str(digest), OCI_MANIFEST, self._clock())
                self._tags.put(route.upstream.name, route.repository, reference, entry_)
                full = image_name(route, reference)
                self._store.index.pin(full, sorted(keys))
                names.append(full)
            self.report.manifests += 1
        self.report.images += names
        return names

    def _keep_bytes(self, data: bytes) -> Digest:
        digest = digest_of(data)
        if not self._store.has_blob(digest):
            self._write_blob(digest, [data])
        self._hold(blob_key(digest))
        return digest

    def _keep_file(self, layout: Layout, name: str) -> tuple[Digest, int]:
        """A file of the archive as a blob: hashed first (its digest is its name in the
        store), then copied and checked again."""
        hasher, size = hashlib.sha256(), 0
        with layout.open(name) as file:
            for chunk in iter(lambda: file.read(CHUNK), b""):
                hasher.update(chunk)
                size += len(chunk)
        digest = Digest("sha256", hasher.hexdigest())
        self._hold(blob_key(digest))
        if self._store.has_blob(digest):
            self.report.present += 1
            return digest, size
        with layout.open(name) as file:
            self._write_blob(digest, iter(lambda: file.read(CHUNK), b""))
        return digest, size

    def _write_blob(self, digest: Digest, chunks: Iterable[bytes]) -> None:
        temp = self._store.begin_blob(digest)
        if temp is None:  # another process writes it (an import, the server): its result
            deadline = time.monotonic() + FOLLOW_SECONDS
            while not self._store.has_blob(digest):
                if time.monotonic() > deadline:
                    raise ArchiveError(f"blob {digest}: another process's write of it stalled")
                time.sleep(0.1)
            self.report.present += 1
            return
        try:
            for chunk in chunks:
                temp.write(chunk)
                self._progress(len(chunk))
            temp.verify()
            temp.sync()
        except DigestMismatch:
            raise ArchiveError(
                f"blob {digest} does not match its content (corrupt archive)"
            ) from None
        except BaseException:
            temp.discard()
            raise
        if not temp.commit():
            raise ArchiveError(f"the store cannot keep blob {digest} (a full disk?)")
        self.report.blobs += 1
        self.report.bytes += temp.written

    def _keep_manifest(
        self, layout: Layout, digest: Digest, declared: str, route: Route
    ) -> set[str]:
        """Keep a manifest and, below it, what the archive holds of its children and blobs;
        the store keys it all takes (to pin)."""
        name = _blob_name(digest)
        if not layout.has(name):
            raise ArchiveError(f"{layout.path}: manifest {digest} is missing")
        data = layout.read(name, MANIFEST_LIMIT)
        media_type = declared if is_manifest_type(declared) else _declared_type(data)
        if media_type is None:
            raise ArchiveError(f"{layout.path}: {digest} is not a manifest")
        if not manifest_matches(digest, data, media_type):
            raise ArchiveError(f"{layout.path}: manifest {digest} does not match its content")
        keys = {manifest_key(digest)}
        try:
            if is_index(media_type, data):
                found = [c for c in children(data) if layout.has(_blob_name(c.digest))]
                if not found:
                    raise ArchiveError(
                        f"{layout.path}: index {digest} has none of its manifests in the archive"
                    )
                for child in found:
                    keys |= self._keep_manifest(layout, child.digest, child.media_type, route)
            else:
                for blob in blobs(data):
                    keys.add(blob_key(blob.digest))
                    self._keep_blob(layout, blob.digest)
        except BadManifest as exc:
            raise ArchiveError(f"{layout.path}: manifest {digest}: {exc}") from None
        stored = self._store.put_manifest(
            digest, data, media_type, route.upstream.name, route.repository
        )
        if not stored:
            raise ArchiveError(f"the store cannot keep manifest {digest} (a full disk?)")
        self._hold(manifest_key(digest))
        self._media_types[str(digest)] = media_type
        self.report.manifests += 1
        return keys

    def _keep_blob(self, layout: Layout, digest: Digest) -> None:
        name = _blob_name(digest)
        self._hold(blob_key(digest))  # before looking: what is there now stays
        if not layout.has(name):
            if self._store.has_blob(digest):
                self.report.present += 1
                return  # a delta: the other side had it
            raise ArchiveError(
                f"{layout.path}: blob {digest} is neither in the archive nor in the store "
                "(a delta archive whose base was not imported?)"
            )
        if self._store.has_blob(digest):
            self.report.present += 1
            return
        try:
            with layout.open(name) as file:
                self._write_blob(digest, iter(lambda: file.read(CHUNK), b""))
        except ArchiveError as exc:
            raise ArchiveError(f"{layout.path}: {exc}") from None


def _declared_type(data: bytes) -> str | None:
    try:
        document = json.loads(data)
        media_type = document.get("mediaType")
    except (ValueError, AttributeError):
        return None
    if isinstance(media_type, str) and is_manifest_type(media_type):
        return media_type
    if isinstance(document, dict) and "manifests" in document:
        return INDEX_TYPE
    if isinstance(document, dict) and "layers" in document:
        return "application/vnd.oci.image.manifest.v1+json"
    return None
