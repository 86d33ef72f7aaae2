"""The OCI distribution grammar for repository names, tags and digests (pure functions)."""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from dataclasses import dataclass

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
MAX_NAME_LENGTH = 255

# Algorithms the mirror can verify, with the length of their lowercase hex encoding.
_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_LOWER_HEX = re.compile(r"[0-9a-f]*")


def is_valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return TAG_RE.fullmatch(tag) is not None


@dataclass(frozen=True)
class Digest:
    """A content digest the mirror can verify, e.g. sha256:<64 hex>."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def matches(self, data: bytes) -> bool:
        return hashlib.new(self.algorithm, data).hexdigest() == self.hex


@functools.lru_cache(maxsize=4096)  # (the hot path asks of the same few, again and again)
def parse_digest(text: str) -> Digest | None:
    """The digest in `text`, or None when it is malformed or of an algorithm we cannot verify."""
    if DIGEST_RE.fullmatch(text) is None:
        return None
    algorithm, _, encoded = text.partition(":")
    length = _HEX_LENGTH.get(algorithm)
    if length is None or len(encoded) != length or _LOWER_HEX.fullmatch(encoded) is None:
        return None
    return Digest(algorithm, encoded)


def digest_of(data: bytes, algorithm: str = "sha256") -> Digest:
    return Digest(algorithm, hashlib.new(algorithm, data).hexdigest())


def looks_like_digest(reference: str) -> bool:
    """A manifest reference is a digest when it has a colon (tags cannot)."""
    return ":" in reference


SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
# The media types a manifest may have; an upstream answer of any other type is refused.
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    SCHEMA1_SIGNED,
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)


def is_manifest_type(media_type: str) -> bool:
    return media_type.lower() in MANIFEST_TYPES


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def schema1_payload(data: bytes) -> bytes | None:
    """The signed payload of a Docker schema1 manifest, which its digest is taken over.

    A signature's protected header gives `formatLength` (bytes of the body before the
    signatures) and `formatTail` (what closes the JSON after them).
    """
    try:
        signatures = json.loads(data)["signatures"]
        protected = json.loads(_b64url(signatures[0]["protected"]))
        length, tail = int(protected["formatLength"]), _b64url(protected["formatTail"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    if not 0 < length <= len(data):
        return None
    return data[:length] + tail


def manifest_matches(digest: Digest, data: bytes, media_type: str) -> bool:
    """Whether manifest bytes are what `digest` names (schema1: its signed payload)."""
    if digest.matches(data):
        return True
    if media_type == SCHEMA1_SIGNED:
        payload = schema1_payload(data)
        return payload is not None and digest.matches(payload)
    return False
