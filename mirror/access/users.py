"""The users a mirror knows: an htpasswd file of bcrypt entries (`htpasswd -B`).

The file is read again when it changes on disk (a stat per login, no restart). bcrypt is
slow on purpose, so it runs in a thread, and a password that checked out is remembered
(as a keyed hash, never in clear) until the file changes: a client sending Basic on every
request costs one bcrypt, not one per request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

import bcrypt

log = logging.getLogger("mirror.users")

BCRYPT_PREFIXES = ("$2y$", "$2b$", "$2a$")
BCRYPT_LENGTH = 72  # bytes of a password bcrypt reads (htpasswd -B ignores the rest too)
MAX_REMEMBERED = 4096  # checked passwords kept; all forgotten past it
CHECKERS = 2  # threads for bcrypt, apart from the default pool the store's work uses


def _cost(hashed: bytes) -> int:
    """The work factor of a bcrypt hash ($2y$05$...)."""
    try:
        return int(hashed[4:6])
    except ValueError:
        return 5


def parse_htpasswd(text: str, source: str) -> dict[str, bytes]:
    """user -> bcrypt hash; entries of other kinds are left out, with a warning naming the
    user (MD5, SHA1 and crypt hashes are too weak to accept)."""
    users: dict[str, bytes] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            log.warning("%s line %d: not user:hash, left out", source, number)
        elif not hashed.startswith(BCRYPT_PREFIXES):
            log.warning(
                "%s: user %r is not a bcrypt entry (make it with htpasswd -B), left out",
                source,
                user,
            )
        else:
            users[user] = hashed.encode()
    return users


class UsersFile:
    """The htpasswd file, as it is on disk now."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._version: tuple[int, int, int] | None = None
        self._users: dict[str, bytes] = {}
        self._key = secrets.token_bytes(32)  # for the remembered passwords' hashes
        self._checked: set[bytes] = set()
        self._lock = asyncio.Lock()
        # A hash nobody's password matches, checked for unknown users so they cost what
        # the dearest known one does (made again when the file changes).
        self._decoy = self._make_decoy(5)
        self._checkers = concurrent.futures.ThreadPoolExecutor(
            CHECKERS, thread_name_prefix="bcrypt"
        )

    @staticmethod
    def _make_decoy(cost: int) -> bytes:
        return bcrypt.hashpw(secrets.token_bytes(16).hex().encode(), bcrypt.gensalt(cost))

    def _read(self) -> tuple[dict[str, bytes], bytes]:
        """The users in the file, and a decoy as dear as the dearest of them (a thread)."""
        users = parse_htpasswd(self._path.read_text(errors="replace"), str(self._path))
        cost = max((_cost(hashed) for hashed in users.values()), default=5)
        decoy = self._decoy if _cost(self._decoy) == cost else self._make_decoy(cost)
        return users, decoy

    async def _current(self) -> dict[str, bytes]:
        """The users, read again when the file's inode, size or mtime changed. A file that
        is gone or unreadable means no users (closed, not the last ones known)."""
        try:
            stat = os.stat(self._path)  # a stat: cheap enough for the loop
        except OSError as exc:
            if self._users or self._version is not None:
                log.error("access.users_file %s: %s: nobody can log in", self._path, exc.strerror)
            self._users, self._version = {}, None
            self._checked.clear()
            return self._users
        version = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if version == self._version:
            return self._users
        async with self._lock:
            if version != self._version:
                try:
                    users, self._decoy = await asyncio.to_thread(self._read)
                except OSError as exc:
                    log.error(
                        "access.users_file %s: %s: nobody can log in", self._path, exc.strerror
                    )
                    self._users, self._version = {}, None
                    self._checked.clear()
                    return self._users
                self._users = users
                self._checked.clear()
                self._version = version
                log.info("access.users_file %s: %d users", self._path, len(self._users))
        return self._users

    async def fingerprint(self, user: str) -> str | None:
        """A short digest of `user`'s entry as it is now (None: no such user): a token
        carries it, so a changed password or a removed user ends the tokens before."""
        hashed = (await self._current()).get(user)
        return hashlib.sha256(hashed).hexdigest()[:16] if hashed is not None else None

    async def check(self, user: str, password: str) -> bool:
        """Whether `password` is `user`'s. Takes as long for an unknown user as for a
        wrong password, so the time says nothing of which users exist."""
        users = await self._current()
        proof = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if proof in self._checked and user in users:
            return True
        hashed = users.get(user, self._decoy)
        secret = password.encode()[:BCRYPT_LENGTH]
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._checkers, bcrypt.checkpw, secret, hashed)
        if ok and user in users:
            if len(self._checked) >= MAX_REMEMBERED:
                self._checked.clear()
            self._checked.add(proof)
            return True
        return False
