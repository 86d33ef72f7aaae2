"""The LRU index of the store: what is kept, its exact size, and when it was last used.

SQLite (WAL) rather than diskcache here: eviction needs the least recently used entries in
order and the sum of sizes of files diskcache does not own, which diskcache's API does not
offer. Every change to the store is written here first as `pending` and confirmed after
the file operation, so start-up repairs a crash by looking at pending rows only: its time
does not grow with the size of the cache.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TOUCH_FLUSH_SECONDS = 5.0  # access times are batched in memory this long before written
BUSY_SECONDS = 5.0  # a call waits this long at most for another process's write

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

-- Evictions by every process on the store (the server, its workers, `mirror gc`).
CREATE TABLE IF NOT EXISTS evictions (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    entries INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT OR IGNORE INTO evictions (id, entries, bytes) VALUES (0, 0, 0);

-- Content an image holds on to (imported for a site with no upstream): never evicted
-- while any image pins it. `ref` is the image's full reference.
CREATE TABLE IF NOT EXISTS pins (
    ref TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (ref, key)
);
CREATE INDEX IF NOT EXISTS pins_by_key ON pins (key);
"""


@dataclass(frozen=True)
class Entry:
    key: str
    size: int
    atime: float
    upstream: str
    repository: str


class UsageIndex:
    """Sizes and access times of everything in the store, in one SQLite file.

    Safe to call from the event loop and from worker threads alike (one lock around the
    connection), so writes can run off the loop. A busy database (`mirror gc` in another
    process) makes a call wait BUSY_SECONDS at most.
    """

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._clock = clock  # wall-clock time of uses; injected by tests
        self.created = not path.exists()
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            path, isolation_level=None, timeout=BUSY_SECONDS, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        # The one-row reads the event loop makes (usage for /metrics and the status page)
        # go through a connection of their own: a thread holding the main one (waiting on
        # `mirror gc`'s write lock, or evicting) never makes the loop wait.
        self._reader = sqlite3.connect(path, timeout=BUSY_SECONDS, check_same_thread=False)
        self._read_lock = threading.Lock()
        self._touched: dict[str, float] = {}
        self._flushed_at = time.monotonic()
        self.flush_seconds = TOUCH_FLUSH_SECONDS

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()
        with self._read_lock:
            self._reader.close()

    def _one_row(self, sql: str) -> tuple[Any, ...]:
        with self._read_lock:
            row: tuple[Any, ...] = self._reader.execute(sql).fetchone()
            return row

    def _run(self, sql: str, params: Sequence[object] = ()) -> None:
        with self._lock:
            self._db.execute(sql, params)

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # changes, each recorded before and confirmed after its file operation

    def begin(self, key: str, size: int, upstream: str = "", repository: str = "") -> None:
        self._run(
            # An upsert, not INSERT OR REPLACE: its hidden delete would skip the triggers.
            "INSERT INTO entries (key, size, atime, pending, upstream, repository)"
            " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (key) DO UPDATE SET size = excluded.size,"
            " atime = excluded.atime, pending = 1, upstream = excluded.upstream,"
            " repository = excluded.repository",
            (key, size, self._clock(), upstream, repository),
        )

    def confirm(self, key: str) -> None:
        self._run("UPDATE entries SET pending = 0 WHERE key = ?", (key,))

    def mark_pending(self, key: str) -> None:
        self._run("UPDATE entries SET pending = 1 WHERE key = ?", (key,))

    def remove(self, key: str, *, evicted: bool = False) -> None:
        """Drop an entry; `evicted` counts it as an eviction, in the same transaction."""
        with self._transaction():
            self._touched.pop(key, None)
            if evicted:
                self._db.execute(
                    "UPDATE evictions SET entries = entries + 1,"
                    " bytes = bytes + COALESCE((SELECT size FROM entries WHERE key = ?), 0)",
                    (key,),
                )
            self._db.execute("DELETE FROM entries WHERE key = ?", (key,))

    def add(self, key: str, size: int, upstream: str = "", repository: str = "") -> None:
        """Record a file that is already in place (adoption after a check)."""
        self.begin(key, size, upstream, repository)
        self.confirm(key)

    # pins

    def pin(self, ref: str, keys: Sequence[str]) -> None:
        with self._transaction():
            self._db.executemany(
                "INSERT OR IGNORE INTO pins (ref, key) VALUES (?, ?)", [(ref, k) for k in keys]
            )

    def unpin(self, ref: str) -> int:
        """Release what `ref` pinned; the number of entries it held."""
        with self._transaction():
            count = self._db.execute("SELECT COUNT(*) FROM pins WHERE ref = ?", (ref,)).fetchone()
            self._db.execute("DELETE FROM pins WHERE ref = ?", (ref,))
        return int(count[0])

    def is_pinned(self, key: str) -> bool:
        return bool(self._rows("SELECT 1 FROM pins WHERE key = ? LIMIT 1", (key,)))

    def unpin_key(self, ref: str, key: str) -> None:
        """Release one entry `ref` pinned."""
        self._run("DELETE FROM pins WHERE ref = ? AND key = ?", (ref, key))

    def pinned_bytes(self, refs_like: str = "%") -> int:
        """Bytes of the entries pinned by refs matching `refs_like` (SQL LIKE; all by
        default): what eviction cannot free."""
        rows = self._rows(
            "SELECT COALESCE(SUM(size), 0) FROM entries"
            " WHERE key IN (SELECT key FROM pins WHERE ref LIKE ?)",
            (refs_like,),
        )
        return int(rows[0][0])

    def pinned(self) -> dict[str, set[str]]:
        """ref -> the keys it pins."""
        found: dict[str, set[str]] = {}
        for ref, key in self._rows("SELECT ref, key FROM pins"):
            found.setdefault(str(ref), set()).add(str(key))
        return found

    # use

    def touch(self, key: str) -> None:
        """Note a use; written with others once `flush_seconds` have passed."""
        self._touched[key] = self._clock()

    def flush_due(self) -> bool:
        return bool(self._touched) and time.monotonic() - self._flushed_at > self.flush_seconds

    def flush(self) -> None:
        """Write the noted uses (blocking: the server runs it in a thread)."""
        self._flushed_at = time.monotonic()
        with self._lock:
            touched, self._touched = self._touched, {}
        if not touched:
            return
        try:
            with self._lock:
                self._db.executemany(
                    "UPDATE entries SET atime = MAX(atime, ?) WHERE key = ?",
                    [(atime, key) for key, atime in touched.items()],
                )
        except sqlite3.Error:
            # A full disk or a busy database: access times are a hint for the LRU, not
            # worth failing a hit for. They are tried again with the next flush.
            with self._lock:
                self._touched = touched | self._touched

    # reading

    def evictions(self) -> tuple[int, int]:
        """(entries, bytes) evicted, by every process on the store."""
        entries, size = self._one_row("SELECT entries, bytes FROM evictions")
        return int(entries), int(size)

    def total(self) -> tuple[int, int]:
        """(bytes, entries) in the store."""
        size, count = self._one_row("SELECT bytes, entries FROM totals")
        return int(size), int(count)

    def get(self, key: str) -> Entry | None:
        rows = self._rows(
            "SELECT key, size, atime, upstream, repository FROM entries WHERE key = ?", (key,)
        )
        return Entry(*rows[0]) if rows else None

    def oldest(self, limit: int, used_before: float) -> list[Entry]:
        """The least recently used confirmed entries, last used before `used_before`."""
        self.flush()
        rows = self._rows(
            "SELECT key, size, atime, upstream, repository FROM entries"
            " WHERE pending = 0 AND atime < ? AND key NOT IN (SELECT key FROM pins)"
            " ORDER BY atime LIMIT ?",
            (used_before, limit),
        )
        return [Entry(*row) for row in rows]

    def is_pending(self, key: str) -> bool:
        rows = self._rows("SELECT pending FROM entries WHERE key = ?", (key,))
        return bool(rows and rows[0][0])

    def pending(self) -> list[Entry]:
        rows = self._rows(
            "SELECT key, size, atime, upstream, repository FROM entries WHERE pending = 1"
        )
        return [Entry(*row) for row in rows]

    def entries(self) -> list[Entry]:
        self.flush()
        rows = self._rows("SELECT key, size, atime, upstream, repository FROM entries")
        return [Entry(*row) for row in rows]

    def usage_by(self) -> list[tuple[str, str, int, int]]:
        """(upstream, repository, bytes, entries), largest first (a scan: not on the loop)."""
        rows = self._rows(
            "SELECT upstream, repository, SUM(size), COUNT(*) FROM entries"
            " GROUP BY upstream, repository ORDER BY SUM(size) DESC"
        )
        return [(str(u), str(r), int(s), int(c)) for u, r, s, c in rows]
