"""The most requested repositories over the last hour, in bounded memory.

Counts go into ten-minute buckets; a bucket holding too many names drops its least counted
half, so a flood of junk names can neither grow memory nor freeze the list: a name asked
often enough comes back within one bucket, and buckets older than the window are gone.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable

WINDOW_SECONDS = 3600.0
BUCKET_SECONDS = 600.0
MAX_NAMES = 1000  # names one bucket counts at once


class RecentTally:
    """Requests per name within the last WINDOW_SECONDS."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: deque[tuple[float, Counter[str]]] = deque()

    def count(self, name: str) -> None:
        now = self._clock()
        if not self._buckets or now - self._buckets[-1][0] >= BUCKET_SECONDS:
            self._buckets.append((now, Counter()))
        self._expire(now)
        bucket = self._buckets[-1][1]
        if name not in bucket and len(bucket) >= MAX_NAMES:
            for dropped, _ in bucket.most_common()[MAX_NAMES // 2 :]:
                del bucket[dropped]
        bucket[name] += 1

    def most_common(self, count: int) -> list[tuple[str, int]]:
        self._expire(self._clock())
        total: Counter[str] = Counter()
        for _, bucket in self._buckets:
            total.update(bucket)
        return total.most_common(count)

    def _expire(self, now: float) -> None:
        while self._buckets and now - self._buckets[0][0] >= WINDOW_SECONDS:
            self._buckets.popleft()
