"""What the cache holds, by image: `mirror ls`, `mirror rm`, `mirror unpin` and the
repositories of `GET /v2/_catalog`. Reads the tag index and the store (blocking: the
server calls it in a thread).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from ..reference import Digest, parse_digest
from ..store.base import blob_key, manifest_key
from ..store.disk import DiskStore
from ..store.tags import TagIndex
from .contents import BadManifest, blobs, children, is_index

CONFIG_LIMIT = 1024 * 1024  # an image config read for its platform, at most


@dataclass
class CachedImage:
    reference: str  # docker.io/library/alpine:3.20
    digest: str
    media_type: str
    platforms: list[str] = field(default_factory=list)
    size: int = 0  # bytes of its manifests and blobs in the store
    complete: bool = True  # every blob of its cached manifests is in the store
    last_used: float = 0.0
    pinned: bool = False


def image_keys(store: DiskStore, digest: Digest) -> tuple[set[str], list[str], bool]:
    """The store keys an image's cached manifests and blobs take, its cached platforms,
    and whether every blob they name is there."""
    keys: set[str] = set()
    platforms: list[str] = []
    complete = True

    def walk(digest: Digest) -> None:
        nonlocal complete
        found = store.get_manifest(digest, use=False)
        if found is None:
            return
        keys.add(manifest_key(digest))
        data, media_type = found
        try:
            if is_index(media_type, data):
                for child in children(data):
                    if store.get_manifest(child.digest, use=False) is not None:
                        p = child.platform
                        platforms.append(
                            "/".join(
                                str(p.get(k)) for k in ("os", "architecture", "variant") if p.get(k)
                            )
                        )
                        walk(child.digest)
                return
            for blob in blobs(data):
                if store.has_blob(blob.digest):
                    keys.add(blob_key(blob.digest))
                else:
                    complete = False
        except BadManifest:
            complete = False

    walk(digest)
    if not platforms:  # one image manifest: its platform is in its config
        found = store.get_manifest(digest, use=False)
        platform = _config_platform(store, found[0]) if found is not None else ""
        platforms = [platform] if platform else []
    return keys, platforms, complete


def _config_platform(store: DiskStore, manifest: bytes) -> str:
    """os/architecture[/variant] from an image manifest's config, when it is kept."""
    try:
        document = json.loads(manifest)
        config = parse_digest(str(document.get("config", {}).get("digest", "")))
    except (ValueError, AttributeError):
        return ""
    blob = store.open_blob(config, use=False) if config is not None else None
    if blob is None or blob.size > CONFIG_LIMIT:
        if blob is not None:
            blob.close()
        return ""
    try:
        fd = blob.fileno()
        fields = json.loads(os.pread(fd, blob.size, 0)) if fd is not None else None
    except (OSError, ValueError):
        return ""
    finally:
        blob.close()
    if not isinstance(fields, dict):
        return ""
    return "/".join(str(fields[k]) for k in ("os", "architecture", "variant") if fields.get(k))


def cached_images(store: DiskStore, tags: TagIndex) -> list[CachedImage]:
    """Every cached tag's image, and every image pinned by digest."""
    pinned = store.index.pinned()
    named = [
        (f"{upstream}/{repository}:{tag}", entry.digest, entry.media_type)
        for upstream, repository, tag, entry in sorted(tags.entries(), key=lambda e: e[:3])
    ]
    for ref in sorted(pinned):
        if "@" in ref:
            found = parse_digest(ref.partition("@")[2])
            kept = store.get_manifest(found, use=False) if found is not None else None
            if kept is not None:
                named.append((ref, str(found), kept[1]))
    images = []
    for reference, digest_text, media_type in named:
        digest = parse_digest(digest_text)
        if digest is None or store.get_manifest(digest, use=False) is None:
            continue  # its manifest was evicted: nothing of it to list
        keys, platforms, complete = image_keys(store, digest)
        used = [e.atime for key in keys if (e := store.index.get(key)) is not None]
        images.append(
            CachedImage(
                reference,
                digest_text,
                media_type,
                sorted({p for p in platforms if p}),
                sum(e.size for key in keys if (e := store.index.get(key)) is not None),
                complete,
                max(used, default=0.0),
                reference in pinned,
            )
        )
    return images


def to_json(images: list[CachedImage]) -> str:
    return json.dumps([asdict(image) for image in images], indent=2)


def remove_image(
    store: DiskStore, tags: TagIndex, upstream: str, repository: str, reference: str
) -> int | None:
    """Forget a tag (or an image pinned by digest), and drop what only its image used
    (what another cached tag or a pin holds stays); the bytes freed, None when there was
    no such image."""
    by_digest = parse_digest(reference)
    if by_digest is not None:
        name = f"{upstream}/{repository}@{reference}"
        if not store.index.unpin(name) and store.get_manifest(by_digest, use=False) is None:
            return None
        digest: Digest | None = by_digest
    else:
        entry = tags.get(upstream, repository, reference)
        if entry is None:
            return None
        digest = parse_digest(entry.digest)
        tags.forget(upstream, repository, reference)
        store.index.unpin(f"{upstream}/{repository}:{reference}")
    if digest is None:
        return 0
    mine, _, _ = image_keys(store, digest)
    others: set[str] = set()
    for _, _, _, other in tags.entries():
        other_digest = parse_digest(other.digest)
        if other_digest is not None:
            others |= image_keys(store, other_digest)[0]
    for held in store.index.pinned().values():
        others |= held
    freed = 0
    for key in sorted(mine - others):
        found = store.index.get(key)
        store.remove(key)
        freed += found.size if found is not None else 0
    return freed
