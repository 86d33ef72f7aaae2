"""A mark every process of one store rewrites when it removes a manifest, read on a hit
without a system call.

Manifest hits are answered from memory; a manifest `mirror gc`, `mirror rm` or another
worker removed must be gone for this process too. Looking at the disk on every hit costs
more than the answer, so each removal writes fresh random bytes into a small shared
mapped file, and a process looks at the disk again only when the mark changed.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

SIZE = 16


class RemovalMark:
    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)

    def read(self) -> bytes:
        return self._map[:SIZE]

    def removed(self) -> None:
        """Tell every process of the store that something was removed."""
        self._map[:SIZE] = os.urandom(SIZE)

    def close(self) -> None:
        self._map.close()
