"""What a hosted namespace holds, by repository: the blobs pushed (or mounted) into each,
its manifests with what they refer to (their blobs, their children, their subject), and
its tags. The bytes themselves are in the content-addressed store, pinned there so the LRU
never evicts them; this index says which repository may see what.

SQLite, safe from threads (every call blocks: run it in a thread).
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    repo TEXT NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL, linked REAL NOT NULL,
    PRIMARY KEY (repo, digest)
);
CREATE TABLE IF NOT EXISTS manifests (
    repo TEXT NOT NULL, digest TEXT NOT NULL, media_type TEXT NOT NULL, size INTEGER NOT NULL,
    artifact_type TEXT, subject TEXT, annotations TEXT,
    PRIMARY KEY (repo, digest)
);
CREATE INDEX IF NOT EXISTS manifests_by_subject ON manifests (repo, subject);
-- What each manifest refers to: its config and layers (blobs), its children (manifests).
CREATE TABLE IF NOT EXISTS refs (
    repo TEXT NOT NULL, manifest TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repo, manifest, digest)
);
CREATE INDEX IF NOT EXISTS refs_by_digest ON refs (repo, digest);
CREATE TABLE IF NOT EXISTS tags (
    repo TEXT NOT NULL, tag TEXT NOT NULL, digest TEXT NOT NULL,
    PRIMARY KEY (repo, tag)
);
"""


@dataclass(frozen=True)
class Referrer:
    """A manifest whose `subject` names another: a descriptor in a referrers answer."""

    digest: str
    media_type: str
    size: int
    artifact_type: str | None
    annotations: str | None  # JSON object, as pushed


class HostedIndex:
    """Repositories, blobs, manifests and tags of every hosted namespace (one database)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _run(self, sql: str, params: Sequence[object] = ()) -> int:
        with self._lock:
            return self._db.execute(sql, params).rowcount

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """Statements that land together or not at all (as the usage index's)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # blobs

    def link_blob(self, repo: str, digest: str, size: int) -> None:
        """Link a blob to a repository, or note that it was pushed (or looked for) again:
        its grace before gc starts anew."""
        self._run(
            "INSERT INTO blobs (repo, digest, size, linked) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (repo, digest) DO UPDATE SET linked = excluded.linked",
            (repo, digest, size, time.time()),
        )

    def touch_blob(self, repo: str, digest: str) -> None:
        self._run(
            "UPDATE blobs SET linked = ? WHERE repo = ? AND digest = ?",
            (time.time(), repo, digest),
        )

    def repositories_with(self, digest: str) -> list[str]:
        return [str(r) for (r,) in self._rows("SELECT repo FROM blobs WHERE digest = ?", (digest,))]

    def blob_size(self, repo: str, digest: str) -> int | None:
        rows = self._rows("SELECT size FROM blobs WHERE repo = ? AND digest = ?", (repo, digest))
        return int(rows[0][0]) if rows else None

    def unlink_blob(self, repo: str, digest: str, linked_before: float | None = None) -> bool:
        """Unlink a blob; with `linked_before`, only if it was not linked (or looked for)
        since, checked in the same statement (gc beside pushes)."""
        if linked_before is None:
            return self._run("DELETE FROM blobs WHERE repo = ? AND digest = ?", (repo, digest)) > 0
        return (
            self._run(
                "DELETE FROM blobs WHERE repo = ? AND digest = ? AND linked < ?",
                (repo, digest, linked_before),
            )
            > 0
        )

    def unreferenced_blobs(self, linked_before: float) -> list[tuple[str, str]]:
        """(repo, digest) of blobs no manifest of their repository refers to, linked
        before `linked_before` (a push in progress puts its blobs before its manifest)."""
        return [
            (str(repo), str(digest))
            for repo, digest in self._rows(
                "SELECT repo, digest FROM blobs b WHERE linked < ? AND NOT EXISTS"
                " (SELECT 1 FROM refs r WHERE r.repo = b.repo AND r.digest = b.digest)",
                (linked_before,),
            )
        ]

    # manifests

    def put_manifest(
        self,
        repo: str,
        digest: str,
        media_type: str,
        size: int,
        refers_to: Sequence[str],
        subject: str | None,
        artifact_type: str | None,
        annotations: str | None,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO manifests (repo, digest, media_type, size,"
                " artifact_type, subject, annotations) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (repo, digest, media_type, size, artifact_type, subject, annotations),
            )
            db.executemany(
                "INSERT OR IGNORE INTO refs (repo, manifest, digest) VALUES (?, ?, ?)",
                [(repo, digest, d) for d in refers_to],
            )

    def manifest(self, repo: str, digest: str) -> tuple[str, int] | None:
        """(media type, size) of a manifest the repository holds."""
        rows = self._rows(
            "SELECT media_type, size FROM manifests WHERE repo = ? AND digest = ?", (repo, digest)
        )
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def delete_manifest(self, repo: str, digest: str) -> bool:
        """Drop a manifest and every tag pointing to it."""
        with self._transaction() as db:
            gone = db.execute(
                "DELETE FROM manifests WHERE repo = ? AND digest = ?", (repo, digest)
            ).rowcount
            db.execute("DELETE FROM refs WHERE repo = ? AND manifest = ?", (repo, digest))
            db.execute("DELETE FROM tags WHERE repo = ? AND digest = ?", (repo, digest))
        return gone > 0

    def referrers(self, repo: str, subject: str) -> list[Referrer]:
        return [
            Referrer(str(d), str(t), int(s), a, n)
            for d, t, s, a, n in self._rows(
                "SELECT digest, media_type, size, artifact_type, annotations FROM manifests"
                " WHERE repo = ? AND subject = ? ORDER BY digest",
                (repo, subject),
            )
        ]

    # tags

    def tag(self, repo: str, tag: str, digest: str) -> None:
        self._run(
            "INSERT OR REPLACE INTO tags (repo, tag, digest) VALUES (?, ?, ?)", (repo, tag, digest)
        )

    def resolve(self, repo: str, tag: str) -> str | None:
        rows = self._rows("SELECT digest FROM tags WHERE repo = ? AND tag = ?", (repo, tag))
        return str(rows[0][0]) if rows else None

    def untag(self, repo: str, tag: str) -> bool:
        return self._run("DELETE FROM tags WHERE repo = ? AND tag = ?", (repo, tag)) > 0

    def tags(self, repo: str) -> list[str]:
        return [str(t) for (t,) in self._rows("SELECT tag FROM tags WHERE repo = ?", (repo,))]

    def known(self, repo: str) -> bool:
        """Whether anything was ever pushed to the repository (and is still there)."""
        return bool(
            self._rows("SELECT 1 FROM blobs WHERE repo = ? LIMIT 1", (repo,))
            or self._rows("SELECT 1 FROM manifests WHERE repo = ? LIMIT 1", (repo,))
        )
