"""What the policy answers with: where an answer came from, and a manifest answer."""

from __future__ import annotations

from dataclasses import dataclass

HIT, MISS, STALE, COALESCED = "hit", "miss", "stale", "coalesced"


@dataclass(frozen=True)
class Manifest:
    """A manifest answer: digest, type and length always; the bytes when a GET needs them."""

    digest: str
    media_type: str
    size: int
    data: bytes | None
    source: str  # HIT, MISS or STALE
