"""Blob uploads in progress: one folder per upload under `storage.path/uploads`, its bytes
in a file appended to as chunks arrive, so an upload survives a restart. Nothing in here
is visible to pulls: a finished upload is checked against its digest and only then put in
the store. An upload not touched for `storage.upload_expiry` is removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

HASH_CHUNK = 1024 * 1024


class UploadUnknown(Exception):
    """No upload by that id in that repository (never begun, finished, cancelled, or
    expired)."""


class Uploads:
    """The uploads of every hosted repository (blocking calls: run them in a thread)."""

    def __init__(self, folder: Path, expiry: float) -> None:
        self._folder = folder
        self._expiry = expiry
        folder.mkdir(parents=True, exist_ok=True)

    def _dir(self, upload: str) -> Path:
        """An upload's folder; its id only as the mirror spells it (one upload, one id)."""
        try:
            canonical = str(uuid.UUID(upload))
        except ValueError:
            raise UploadUnknown(upload) from None
        if canonical != upload:
            raise UploadUnknown(upload)
        return self._folder / canonical

    def begin(self, repo: str) -> str:
        upload = str(uuid.uuid4())
        folder = self._folder / upload
        folder.mkdir()
        (folder / "data").touch()
        (folder / "meta.json").write_text(json.dumps({"repo": repo, "started": time.time()}))
        return upload

    def _checked(self, repo: str, upload: str) -> Path:
        folder = self._dir(upload)
        try:
            meta = json.loads((folder / "meta.json").read_text())
            data = folder / "data"
            if meta.get("repo") != repo:
                raise UploadUnknown(upload)
            if time.time() - data.stat().st_mtime > self._expiry:
                shutil.rmtree(folder, ignore_errors=True)
                raise UploadUnknown(upload)
        except (OSError, ValueError):
            raise UploadUnknown(upload) from None
        return data

    def size(self, repo: str, upload: str) -> int:
        return self._checked(repo, upload).stat().st_size

    def open(self, repo: str, upload: str) -> int:
        """The upload's file, open to append to (the caller locks it, then asks
        `size_held`, and closes it)."""
        return os.open(self._checked(repo, upload), os.O_WRONLY | os.O_APPEND)

    def size_held(self, repo: str, upload: str, fd: int) -> int:
        """The size of an upload whose file the caller holds locked; UploadUnknown when
        it was finished or cancelled while the caller waited for the lock."""
        if not self._checked(repo, upload).exists():
            raise UploadUnknown(upload)
        return os.fstat(fd).st_size

    def bytes_in_progress(self) -> int:
        """Bytes of every upload in progress (what the hosted bound counts besides)."""
        total = 0
        for folder in self._folder.iterdir():
            with contextlib.suppress(OSError):
                total += (folder / "data").stat().st_size
        return total

    def path(self, repo: str, upload: str) -> Path:
        return self._checked(repo, upload)

    def remove(self, repo: str, upload: str) -> None:
        self._checked(repo, upload)
        shutil.rmtree(self._dir(upload), ignore_errors=True)

    def expire(self) -> int:
        """Remove the uploads past their expiry; how many."""
        removed = 0
        for folder in self._folder.iterdir():
            data = folder / "data"
            try:
                stale = time.time() - data.stat().st_mtime > self._expiry
            except OSError:
                stale = True
            if stale:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        return removed
