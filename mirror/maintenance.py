"""The store's maintenance commands: verify, gc and du, with a progress bar on a terminal.

They work on the store directly (files and LRU index), so they run beside a serving mirror
or with it stopped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .store.base import BlobStore
from .store.disk import DiskStore

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def human(size: float) -> str:
    for unit in UNITS:
        if abs(size) < 1024 or unit == UNITS[-1]:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


class Progress:
    """A one-line progress bar on a terminal; silent when the output is not one."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self._drawn = 0.0

    def advance(self, amount: int) -> None:
        self.done += amount
        now = time.monotonic()
        if self.enabled and (now - self._drawn > 0.1 or self.done >= self.total):
            self._drawn = now
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 30)
            self.stream.write(f"\r{self.label} [{bar:<30}] {share:6.1%} {human(self.done)}")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0  # evicted since it was listed


@dataclass
class VerifyReport:
    checked: int = 0
    corrupt: int = 0
    missing: int = 0


def verify(store: DiskStore, out: TextIO) -> VerifyReport:
    """Re-hash every stored blob and manifest; remove and report those that do not match."""
    report = VerifyReport()
    files = list(store.walk_files())
    total = sum(_size(path) for _, path in files)
    progress = Progress(total, "verify")
    for key, _ in files:
        # A live server may evict or put back files as we go: only a file that is still
        # the one we hashed, and wrong, is corrupt.
        inode = store.inode(key)
        state = store.check(key, progress.advance) if inode is not None else "gone"
        if state == "gone":
            continue
        report.checked += 1
        if state == "corrupt" and store.remove_if_unchanged(key, inode or 0):
            report.corrupt += 1
            out.write(f"corrupt, removed: {key}\n")
    on_disk = {key for key, _ in files}
    for key in sorted(store.indexed_keys() - on_disk):
        if store.has_file(key):
            continue  # put in place by a live server since the walk
        report.missing += 1
        store.forget(key)
        out.write(f"missing file, entry dropped: {key}\n")
    progress.close()
    out.write(
        f"verified {report.checked} files: {report.corrupt} corrupt, "
        f"{report.missing} index entries without a file\n"
    )
    return report


def gc(
    store: BlobStore,
    out: TextIO,
    max_size: int | None,
    older_than: float | None,
    *,
    dry_run: bool = False,
) -> int:
    """Evict unused content: everything unused for `older_than` seconds, then down to
    `max_size` bytes by least recent use. Returns the bytes freed (or, with `dry_run`,
    that would be: nothing is evicted)."""
    if dry_run:
        return _gc_plan(store, out, max_size, older_than)
    freed = 0
    count = 0
    progress = Progress(store.usage()[0], "gc")  # the share of the cache evicted so far
    if older_than is not None:
        cutoff = time.time() - older_than
        while batch := store.oldest(256, used_before=cutoff):
            for entry in batch:
                store.evict(entry)
                progress.advance(entry.size)
                freed += entry.size
                count += 1
    if max_size is not None:
        used, _ = store.usage()
        while used > max_size:
            batch = store.oldest(256, used_before=time.time())
            if not batch:
                break
            for entry in batch:
                if used <= max_size:
                    break
                store.evict(entry)
                progress.advance(entry.size)
                used -= entry.size
                freed += entry.size
                count += 1
    progress.close()
    used, entries = store.usage()
    out.write(
        f"evicted {_count(count, 'entry', 'entries')}, {human(freed)}; "
        f"now {human(used)} in {_count(entries, 'entry', 'entries')}\n"
    )
    return freed


def _gc_plan(store: BlobStore, out: TextIO, max_size: int | None, older_than: float | None) -> int:
    """What `gc` would evict, in the same order, evicting nothing."""
    used, entries = store.usage()
    now = time.time()
    oldest = store.oldest(max(entries, 1), used_before=now)  # least recently used first
    chosen = 0
    freed = 0
    for entry in oldest:
        too_old = older_than is not None and entry.atime < now - older_than
        too_big = max_size is not None and used - freed > max_size
        if not (too_old or too_big):
            break  # the rest is newer still, and the bound is kept
        chosen += 1
        freed += entry.size
    out.write(
        f"would evict {_count(chosen, 'entry', 'entries')}, {human(freed)}; "
        f"would leave {human(used - freed)} in {_count(entries - chosen, 'entry', 'entries')} "
        "(dry run: nothing evicted)\n"
    )
    return freed


def du(store: BlobStore, out: TextIO) -> None:
    """Usage by upstream and repository, largest first (one query: no progress to show)."""
    used, entries = store.usage()
    out.write(
        f"total {human(used)} in {_count(entries, 'entry', 'entries')}, "
        f"bound {human(store.max_size)} "
        f"({used / store.max_size:.1%})\n"
    )
    by_upstream: dict[str, int] = {}
    rows = store.usage_by()
    for upstream, _, size, _ in rows:
        by_upstream[upstream or "-"] = by_upstream.get(upstream or "-", 0) + size
    for upstream, size in sorted(by_upstream.items(), key=lambda item: -item[1]):
        out.write(f"{human(size):>12}  {upstream}\n")
        for up, repository, repo_size, count in rows:
            if (up or "-") == upstream:
                out.write(
                    f"{human(repo_size):>12}    {repository or '-'} "
                    f"({_count(count, 'entry', 'entries')})\n"
                )
