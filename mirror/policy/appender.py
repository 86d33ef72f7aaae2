"""A fill's bytes appended to its temporary and handed to its readers, chunk by chunk; where
the store cannot take them (over its bound, or the disk is full), streamed on without
keeping.

Written on the loop: into the page cache, each chunk is one copy (a thread, a batch at a
time, doubled peak memory for no gain: docs/performance.md).
"""

from __future__ import annotations

import errno
import logging

from ..inflight import Transfer
from ..reference import Digest
from ..store.base import BlobStore, TempBlob

log = logging.getLogger("mirror.proxy")

FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write refused for want of space


class Appender:
    """Appends one fill's chunks to its temporary, then hands them to its readers."""

    def __init__(
        self, store: BlobStore, temp: TempBlob, transfer: Transfer, digest: Digest
    ) -> None:
        self._store = store
        self._temp = temp
        self._transfer = transfer
        self._digest = digest

    def add(self, chunk: bytes) -> None:
        temp = self._temp
        if not temp.spilled and temp.written + len(chunk) > self._store.max_size:
            self.spill("over the store's bound")
        try:
            temp.write(chunk)
        except OSError as exc:
            if exc.errno not in FULL:
                raise
            self._store.counters.write_failed(f"writing {self._digest}", exc)
            self.spill(f"the disk is full at byte {temp.written}")
            temp.write(chunk)  # once spilled only the hash takes it
        self._transfer.advance(chunk)

    def spill(self, why: str) -> None:
        """Stop keeping: the rest is streamed through, in a bounded window."""
        if not self._temp.spilled:
            log.warning("streaming %s through without keeping it: %s", self._digest, why)
        self._temp.spill()
        self._transfer.spill()
