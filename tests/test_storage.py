"""The store contract, run against every BlobStore implementation."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from mirror.reference import Digest, digest_of
from mirror.storage import BlobStore, DigestMismatch, DiskStore

STORES: dict[str, Callable[[Path], BlobStore]] = {"disk": lambda p: DiskStore(p, 1 << 30)}


@pytest.fixture(params=sorted(STORES))
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], BlobStore]:
    factory = STORES[request.param]
    return lambda: factory(tmp_path / "store")


def test_blob_is_visible_only_after_a_verified_commit(make_store: Callable[[], BlobStore]) -> None:
    store = make_store()
    data = b"layer bytes" * 1000
    digest = digest_of(data)
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.write(data[:100])
    assert store.blob_path(digest) is None
    temp.write(data[100:])
    path = temp.commit()
    assert store.blob_path(digest) == path
    assert path.read_bytes() == data


def test_wrong_bytes_are_discarded(make_store: Callable[[], BlobStore]) -> None:
    store = make_store()
    digest = digest_of(b"the right bytes")
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.write(b"the wrong bytes")
    with pytest.raises(DigestMismatch):
        temp.commit()
    assert store.blob_path(digest) is None
    assert not temp.path.exists()


def test_one_writer_per_digest(make_store: Callable[[], BlobStore]) -> None:
    store = make_store()
    digest = digest_of(b"x")
    first = store.begin_blob(digest)
    assert first is not None
    assert store.begin_blob(digest) is None  # taken, even by this same process
    first.discard()
    second = store.begin_blob(digest)
    assert second is not None
    second.write(b"x")
    second.commit()


def test_manifests_keep_exact_bytes_and_type(make_store: Callable[[], BlobStore]) -> None:
    store = make_store()
    data = b'{"schemaVersion": 2,   "odd":  "spacing"}'
    digest = digest_of(data)
    store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    assert store.get_manifest(digest) == (data, "application/vnd.oci.image.manifest.v1+json")
    with pytest.raises(DigestMismatch):
        store.put_manifest(digest_of(b"other"), data, "application/json")
    missing = Digest("sha256", hashlib.sha256(b"missing").hexdigest())
    assert store.get_manifest(missing) is None


def test_restart_removes_dead_writers_temporaries(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", 1 << 30)
    digest = digest_of(b"abc")
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.write(b"ab")
    part = temp.path
    # a writer that died: its lock went with its process; simulate by closing our handles
    temp._release()  # type: ignore[attr-defined]
    part.write_bytes(b"ab")
    DiskStore(tmp_path / "store", 1 << 30)
    assert not part.exists()
    assert list((tmp_path / "store" / "tmp").iterdir()) == []
