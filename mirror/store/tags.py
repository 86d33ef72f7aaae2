"""What each tag pointed to when last asked, kept on disk with the cache.

A tag's answer (digest and media type) is trusted for `manifest_ttl` seconds after it was
last confirmed upstream; it survives a restart so a restarted mirror knows its tags.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diskcache

from ..clock import Clock, system_clock
from .base import WRITE_ERRORS


@dataclass(frozen=True)
class TagEntry:
    digest: str
    media_type: str
    confirmed_at: float  # wall-clock time of the last upstream confirmation

    def age(self, now: float) -> float:
        return now - self.confirmed_at


MISSING_SLACK = 60.0  # seconds a remembered 404 stays on disk past its end
MEMORY_ENTRIES = 100_000  # tag answers also kept in memory, so a hit never reads the disk


class TagIndex:
    """(upstream, repository, tag) -> TagEntry, in a diskcache database, written through
    an in-memory copy that serves the hot path."""

    def __init__(
        self,
        folder: Path,
        write_failed: Callable[[str, BaseException], None] | None = None,
        clock: Clock = system_clock,
    ) -> None:
        self._clock = clock
        self._cache = diskcache.Cache(str(folder), eviction_policy="none")
        self._memory: OrderedDict[str, TagEntry] = OrderedDict()
        self._lock = threading.Lock()  # writes come from threads (off the loop)
        # Told when the disk cannot take a write: the answer is kept in memory only.
        self._write_failed = write_failed or (lambda what, exc: None)

    def _remember(self, key: str, entry: TagEntry) -> None:
        with self._lock:
            self._memory[key] = entry
            self._memory.move_to_end(key)
            if len(self._memory) > MEMORY_ENTRIES:
                self._memory.popitem(last=False)

    @staticmethod
    def _key(upstream: str, repository: str, tag: str) -> str:
        return f"{upstream}/{repository}:{tag}"

    def get(self, upstream: str, repository: str, tag: str) -> TagEntry | None:
        key = self._key(upstream, repository, tag)
        with self._lock:
            entry = self._memory.get(key)
        if entry is not None:
            return entry
        value = self._cache.get(key)
        if not isinstance(value, tuple) or len(value) != 3:
            return None
        entry = TagEntry(*value)
        self._remember(key, entry)
        return entry

    def put(self, upstream: str, repository: str, tag: str, entry: TagEntry) -> None:
        key = self._key(upstream, repository, tag)
        self._remember(key, entry)
        try:
            self._cache.set(key, (entry.digest, entry.media_type, entry.confirmed_at))
        except WRITE_ERRORS as exc:
            self._write_failed(f"recording tag {key}", exc)

    def entries(self) -> list[tuple[str, str, str, TagEntry]]:
        """(upstream, repository, tag, entry) of every tag known (a scan: not on the loop)."""
        found = []
        for key in self._cache.iterkeys():
            if not isinstance(key, str):
                continue  # a remembered 404
            # Read past the in-memory copy: a scan must not push the hot answers out of it.
            value = self._cache.get(key)
            if not isinstance(value, tuple) or len(value) != 3:
                continue
            upstream, _, rest = key.partition("/")
            repository, _, tag = rest.rpartition(":")
            found.append((upstream, repository, tag, TagEntry(*value)))
        return found

    def repositories(self) -> list[tuple[str, str]]:
        """(upstream, repository) of every tag known, sorted (a scan: not on the loop)."""
        return sorted({(upstream, repository) for upstream, repository, _, _ in self.entries()})

    def forget(self, upstream: str, repository: str, tag: str) -> None:
        key = self._key(upstream, repository, tag)
        with self._lock:
            self._memory.pop(key, None)
        self._cache.delete(key)

    # Upstream 404s for manifests, remembered for a short while in the same database, so
    # every worker process sees them and a retry loop does not hammer the upstream.

    def remember_missing(self, upstream: str, repository: str, reference: str, ttl: float) -> None:
        if ttl <= 0:
            return
        until = self._clock() + ttl
        try:
            # diskcache's own expiry (real time) only clears the row away later.
            key = ("missing", upstream, repository, reference)
            self._cache.set(key, until, expire=ttl + MISSING_SLACK)
        except WRITE_ERRORS as exc:
            self._write_failed(f"recording a 404 for {upstream}/{repository}:{reference}", exc)

    def known_missing(self, upstream: str, repository: str, reference: str) -> bool:
        until = self._cache.get(("missing", upstream, repository, reference))
        return isinstance(until, float) and self._clock() < until

    def close(self) -> None:
        self._cache.close()
