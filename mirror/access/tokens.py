"""Tokens the mirror issues to its own clients (the Docker token flow), signed with a key
kept beside the cache, so every worker (and a restarted mirror) accepts what another
issued. A token carries who it was issued to and until when; what that identity may do
is decided by the rules on each request, so a rule changed or a user removed takes
effect at once.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from ..clock import Clock

PREFIX = "mirror1"


@dataclass(frozen=True)
class Token:
    user: str | None  # None: issued to an anonymous client
    fingerprint: str | None  # of the user's password entry when it was issued
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signing_key(folder: Path) -> bytes:
    """The key in `folder`/token-key, made once (atomically: a worker racing another
    reads the one that won) and readable by this user only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "token-key"
    if not path.exists():
        temporary = folder / f".token-key.{os.getpid()}.{secrets.token_hex(4)}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(32))
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(temporary, path)
        temporary.unlink()
    key = path.read_bytes()
    if len(key) < 32:
        raise OSError(f"{path} is not a signing key (remove it to make a new one)")
    return key


class TokenSigner:
    def __init__(self, key: bytes, clock: Clock) -> None:
        self._key = key
        self._clock = clock

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def issue(
        self,
        user: str | None,
        fingerprint: str | None,
        lifetime: float,
        access: list[dict[str, object]],
    ) -> str:
        now = self._clock()
        claims = {
            "sub": user,
            "pwd": fingerprint,
            "iat": int(now),
            "exp": now + lifetime,
            "access": access,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{PREFIX}.{payload}.{self._sign(payload)}"

    def read(self, token: str) -> Token | None:
        """The token's holder, or None for a token that is not ours, altered or expired."""
        prefix, _, rest = token.partition(".")
        payload, _, signature = rest.partition(".")
        expected = self._sign(payload).encode()
        if prefix != PREFIX or not hmac.compare_digest(signature.encode(), expected):
            return None  # (as bytes: a str that is not ASCII cannot be compared in time)
        try:
            claims = json.loads(_unb64(payload))
            user, fingerprint, expires_at = claims["sub"], claims["pwd"], float(claims["exp"])
        except (ValueError, KeyError, TypeError):
            return None
        if expires_at <= self._clock() or not (user is None or isinstance(user, str)):
            return None
        if not (fingerprint is None or isinstance(fingerprint, str)):
            return None
        return Token(user=user, fingerprint=fingerprint, expires_at=expires_at)
