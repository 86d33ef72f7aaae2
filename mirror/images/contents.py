"""What an image is made of: an index's platform entries, a manifest's config and layers,
and which platforms a command asked for. Pure: it reads manifest bytes, never a store.
"""

from __future__ import annotations

import json
import platform as host_platform
from dataclasses import dataclass, field
from typing import Any

from ..reference import Digest, parse_digest

INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
_ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}


class BadManifest(ValueError):
    """A manifest that is not the JSON document its media type says."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """`linux/amd64`, `linux/arm64/v8`."""
        parts = text.strip().lower().split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise ValueError(f"{text!r} is not a platform like linux/amd64 or linux/arm/v7")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def here(cls) -> Platform:
        machine = host_platform.machine().lower()
        return cls("linux", _ARCHITECTURES.get(machine, machine))

    def matches(self, entry: dict[str, Any]) -> bool:
        os_name = str(entry.get("os", "")).lower()
        architecture = str(entry.get("architecture", "")).lower()
        variant = str(entry.get("variant", "")).lower()
        if (os_name, architecture) != (self.os, self.architecture):
            return False
        return not self.variant or not variant or variant == self.variant

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    platform: dict[str, Any] = field(default_factory=dict)


def _document(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except ValueError:
        raise BadManifest("not JSON") from None
    if not isinstance(document, dict):
        raise BadManifest("not a JSON object")
    return document


def _descriptor(entry: object) -> Descriptor:
    if not isinstance(entry, dict):
        raise BadManifest("a descriptor that is not an object")
    digest = parse_digest(str(entry.get("digest", "")))
    size = entry.get("size")
    if digest is None or not isinstance(size, int) or size < 0:
        raise BadManifest(f"a descriptor without a digest and size: {entry!r:.200}")
    platform = entry.get("platform")
    return Descriptor(
        str(entry.get("mediaType", "")),
        digest,
        size,
        platform if isinstance(platform, dict) else {},
    )


def is_index(media_type: str, data: bytes) -> bool:
    if media_type.lower() in INDEX_TYPES:
        return True
    return media_type == "application/json" and "manifests" in _document(data)


def children(data: bytes) -> list[Descriptor]:
    """An index's entries."""
    entries = _document(data).get("manifests")
    if not isinstance(entries, list):
        raise BadManifest("an index without manifests")
    return [_descriptor(entry) for entry in entries]


def blobs(data: bytes) -> list[Descriptor]:
    """An image manifest's config and layers (schema1: its fsLayers)."""
    document = _document(data)
    if document.get("schemaVersion") == 1:
        layers = document.get("fsLayers")
        sums = [
            parse_digest(str(x.get("blobSum", ""))) for x in layers or [] if isinstance(x, dict)
        ]
        unique = dict.fromkeys(d for d in sums if d is not None)
        return [Descriptor("application/octet-stream", d, -1) for d in unique]
    config = document.get("config")
    layers = document.get("layers", [])
    if not isinstance(layers, list):
        raise BadManifest("layers is not a list")
    found = ([_descriptor(config)] if config is not None else []) + [
        _descriptor(layer) for layer in layers
    ]
    return list({d.digest: d for d in found}.values())


def wanted(entry: Descriptor, platforms: list[Platform] | None) -> bool:
    """Whether an index entry is one of `platforms` (None: every entry)."""
    if platforms is None:
        return True
    return any(p.matches(entry.platform) for p in platforms)
