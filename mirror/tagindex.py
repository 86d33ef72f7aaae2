"""What each tag pointed to when last asked, kept on disk with the cache.

A tag's answer (digest and media type) is trusted for `manifest_ttl` seconds after it was
last confirmed upstream; it survives a restart so a restarted mirror knows its tags.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import diskcache


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    confirmed_at: float  # wall-clock time of the last upstream confirmation

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.confirmed_at


class TagIndex:
    """(upstream, repository, tag) -> TagEntry, in a diskcache database."""

    def __init__(self, folder: Path) -> None:
        self._cache = diskcache.Cache(str(folder), eviction_policy="none")

    @staticmethod
    def _key(upstream: str, repository: str, tag: str) -> str:
        return f"{upstream}/{repository}:{tag}"

    def get(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        value = self._cache.get(self._key(upstream, repository, tag))
        if not isinstance(value, tuple) or len(value) != 3:
            return None
        return TagEntry(*value)

    def put(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        self._cache.set(
            self._key(upstream, repository, tag),
            (entry.digest, entry.media_type, entry.confirmed_at),
        )

    def close(self) -> None:
        self._cache.close()
