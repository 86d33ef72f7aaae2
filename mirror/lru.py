"""The LRU index of the store: what is kept, its exact size, and when it was last used.

SQLite (WAL) rather than diskcache here: eviction needs the least recently used entries in
order and the sum of sizes of files diskcache does not own, which diskcache's API does not
offer. Every change to the store is written here first as `pending` and confirmed after
the file operation, so start-up repairs a crash by looking at pending rows only: its time
does not grow with the size of the cache.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

TOUCH_FLUSH_SECONDS = 5.0  # access times are batched in memory this long before written

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,         -- "blob:sha256:<hex>" or "manifest:sha256:<hex>"
    size INTEGER NOT NULL,        -- bytes of the file
    atime REAL NOT NULL,          -- last use, wall clock
    pending INTEGER NOT NULL,     -- 1 while the file operation it records is under way
    upstream TEXT NOT NULL DEFAULT '',
    repository TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS entries_by_atime ON entries (atime);
CREATE INDEX IF NOT EXISTS entries_pending ON entries (pending) WHERE pending = 1;

-- The sum of sizes and the count, kept up to date by triggers: reading usage, as every
-- commit does to keep the bound, is one row, not a scan of every entry.
CREATE TABLE IF NOT EXISTS totals (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    bytes INTEGER NOT NULL,
    entries INTEGER NOT NULL
);
-- Counted once, when an index made before this table is first opened; then kept.
INSERT OR IGNORE INTO totals (id, bytes, entries)
    SELECT 0, COALESCE(SUM(size), 0), COUNT(*) FROM entries;
CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries BEGIN
    UPDATE totals SET bytes = bytes + NEW.size, entries = entries + 1;
END;
CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.size, entries = entries - 1;
END;
CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF size ON entries BEGIN
    UPDATE totals SET bytes = bytes - OLD.size + NEW.size;
END;
"""


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    atime: float
    upstream: str
    repository: str


class UsageIndex:
    """Sizes and access times of everything in the store, in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.created = not path.exists()
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._touched: dict[str, float] = {}
        self._flushed_at = time.monotonic()
        self.flush_seconds = TOUCH_FLUSH_SECONDS

    def close(self) -> None:
        self.flush()
        self._db.close()

    # changes, each recorded before and confirmed after its file operation

    def begin(self, key: str, size: int, upstream: str = "", repository: str = "") -> None:
        self._db.execute(
            # An upsert, not INSERT OR REPLACE: its hidden delete would skip the triggers.
            "INSERT INTO entries (key, size, atime, pending, upstream, repository)"
            " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (key) DO UPDATE SET size = excluded.size,"
            " atime = excluded.atime, pending = 1, upstream = excluded.upstream,"
            " repository = excluded.repository",
            (key, size, time.time(), upstream, repository),
        )

    def confirm(self, key: str) -> None:
        self._db.execute("UPDATE entries SET pending = 0 WHERE key = ?", (key,))

    def mark_pending(self, key: str) -> None:
        self._db.execute("UPDATE entries SET pending = 1 WHERE key = ?", (key,))

    def remove(self, key: str) -> None:
        self._touched.pop(key, None)
        self._db.execute("DELETE FROM entries WHERE key = ?", (key,))

    def add(self, key: str, size: int, upstream: str = "", repository: str = "") -> None:
        """Record a file that is already in place (adoption after a check)."""
        self.begin(key, size, upstream, repository)
        self.confirm(key)

    # use

    def touch(self, key: str) -> None:
        self._touched[key] = time.time()
        if time.monotonic() - self._flushed_at > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        self._flushed_at = time.monotonic()
        if not self._touched:
            return
        touched, self._touched = self._touched, {}
        try:
            self._db.executemany(
                "UPDATE entries SET atime = MAX(atime, ?) WHERE key = ?",
                [(atime, key) for key, atime in touched.items()],
            )
        except sqlite3.Error:
            # A full disk or a busy database: access times are a hint for the LRU, not
            # worth failing a hit for. They are tried again with the next flush.
            self._touched = touched | self._touched

    # reading

    def total(self) -> tuple[int, int]:
        """(bytes, entries) in the store."""
        size, count = self._db.execute("SELECT bytes, entries FROM totals").fetchone()
        return int(size), int(count)

    def get(self, key: str) -> Entry | None:
        row = self._db.execute(
            "SELECT key, size, atime, upstream, repository FROM entries WHERE key = ?", (key,)
        ).fetchone()
        return Entry(*row) if row else None

    def oldest(self, limit: int, used_before: float) -> list[Entry]:
        """The least recently used confirmed entries, last used before `used_before`."""
        self.flush()
        rows = self._db.execute(
            "SELECT key, size, atime, upstream, repository FROM entries"
            " WHERE pending = 0 AND atime < ? ORDER BY atime LIMIT ?",
            (used_before, limit),
        ).fetchall()
        return [Entry(*row) for row in rows]

    def is_pending(self, key: str) -> bool:
        row = self._db.execute("SELECT pending FROM entries WHERE key = ?", (key,)).fetchone()
        return bool(row and row[0])

    def pending(self) -> list[Entry]:
        rows = self._db.execute(
            "SELECT key, size, atime, upstream, repository FROM entries WHERE pending = 1"
        ).fetchall()
        return [Entry(*row) for row in rows]

    def entries(self) -> Iterator[Entry]:
        self.flush()
        cursor = self._db.execute("SELECT key, size, atime, upstream, repository FROM entries")
        for row in cursor:
            yield Entry(*row)

    def usage_by(self) -> list[tuple[str, str, int, int]]:
        """(upstream, repository, bytes, entries), largest first."""
        rows = self._db.execute(
            "SELECT upstream, repository, SUM(size), COUNT(*) FROM entries"
            " GROUP BY upstream, repository ORDER BY SUM(size) DESC"
        ).fetchall()
        return [(str(u), str(r), int(s), int(c)) for u, r, s, c in rows]
