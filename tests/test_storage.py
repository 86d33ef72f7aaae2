"""The store contract, run against every BlobStore implementation (disk and memory), then
what only the disk store does: crash repair, and the fill protocol across processes."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mirror import maintenance
from mirror.inflight import TransferFailed
from mirror.reference import Digest, digest_of
from mirror.store import disk
from mirror.store.base import BlobStore, DigestMismatch, blob_key, manifest_key
from mirror.store.disk import DiskStore
from mirror.store.memory import MemoryStore


class Clock:
    """Wall-clock time the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


# Every BlobStore implementation, by name: (folder, max_size, clock) -> store.
STORES: dict[str, Callable[[Path, int, Clock], BlobStore]] = {
    "disk": lambda folder, max_size, clock: DiskStore(folder, max_size, clock=clock),
    "memory": lambda folder, max_size, clock: MemoryStore(max_size, clock=clock),
}

StoreFactory = Callable[..., BlobStore]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=sorted(STORES))
def make_store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> StoreFactory:
    factory = STORES[request.param]
    return lambda max_size=1 << 30: factory(tmp_path / "store", max_size, clock)


async def _read(store: BlobStore, digest: Digest) -> bytes | None:
    stored = store.open_blob(digest)
    if stored is None:
        return None
    try:
        return b"".join([bytes(c) async for c in stored.chunks(0, stored.size)])
    finally:
        stored.close()


async def test_blob_is_visible_only_after_a_verified_commit(make_store: StoreFactory) -> None:
    store = make_store()
    data = b"layer bytes" * 1000
    digest = digest_of(data)
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.write(data[:100])
    assert not store.has_blob(digest) and store.open_blob(digest) is None
    temp.write(data[100:])
    back = temp.read_back()
    assert back is not None and back.pread(100, 11) == data[100:111]  # for late readers
    assert temp.commit() is True
    assert store.has_blob(digest) and store.blob_size(digest) == len(data)
    assert await _read(store, digest) == data


def test_wrong_bytes_are_discarded(make_store: StoreFactory) -> None:
    store = make_store()
    digest = digest_of(b"the right bytes")
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.write(b"the wrong bytes")
    with pytest.raises(DigestMismatch):
        temp.commit()
    assert not store.has_blob(digest)
    assert store.usage() == (0, 0)
    assert store.begin_blob(digest) is not None  # the digest is free again


def test_one_writer_per_digest(make_store: StoreFactory) -> None:
    store = make_store()
    digest = digest_of(b"x")
    first = store.begin_blob(digest)
    assert first is not None
    assert store.begin_blob(digest) is None  # taken, even by this same process
    first.discard()
    second = store.begin_blob(digest)
    assert second is not None
    second.write(b"x")
    assert second.commit() is True


def test_manifests_keep_exact_bytes_and_type(make_store: StoreFactory) -> None:
    store = make_store()
    data = b'{"schemaVersion": 2,   "odd":  "spacing"}'
    digest = digest_of(data)
    assert store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    assert store.get_manifest(digest) == (data, "application/vnd.oci.image.manifest.v1+json")
    with pytest.raises(DigestMismatch):
        store.put_manifest(digest_of(b"other"), data, "application/json")
    missing = Digest("sha256", hashlib.sha256(b"missing").hexdigest())
    assert store.get_manifest(missing) is None


def _put_blob(store: BlobStore, data: bytes, upstream: str = "", repository: str = "") -> Digest:
    digest = digest_of(data)
    temp = store.begin_blob(digest, upstream, repository)
    assert temp is not None
    temp.write(data)
    assert temp.commit() is True
    return digest


def test_usage_is_exact_and_the_least_recently_used_go_first(
    make_store: StoreFactory, clock: Clock
) -> None:
    store = make_store(3000)
    first = _put_blob(store, b"a" * 1000)
    second = _put_blob(store, b"b" * 1000)
    assert store.usage() == (2000, 2)
    clock.now += 10  # past the eviction grace
    opened = store.open_blob(first)  # used: now the most recent
    assert opened is not None
    opened.close()
    store.flush_uses()
    clock.now += 10
    third = _put_blob(store, b"c" * 1500)
    assert not store.has_blob(second)  # the least recently used went
    assert store.has_blob(first) and store.has_blob(third)
    assert store.usage() == (2500, 2)
    assert store.evictions() == (1, 1000)


def test_content_used_within_the_grace_is_not_evicted(
    make_store: StoreFactory, clock: Clock
) -> None:
    store = make_store(1500)
    first = _put_blob(store, b"a" * 1000)
    _put_blob(store, b"b" * 1000)  # over the bound, but the first was just used
    assert store.has_blob(first) and store.usage() == (2000, 2)
    clock.now += 10
    _put_blob(store, b"c" * 10)
    assert not store.has_blob(first)


def test_content_over_the_bound_is_not_kept(make_store: StoreFactory) -> None:
    store = make_store(100)
    data = b"z" * 200
    temp = store.begin_blob(digest_of(data))
    assert temp is not None
    temp.write(data)
    assert temp.commit(keep=len(data) <= store.max_size) is False
    assert not store.has_blob(digest_of(data)) and store.usage() == (0, 0)


def test_a_spilled_fill_keeps_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    data = b"s" * 5000
    temp = store.begin_blob(digest_of(data))
    assert temp is not None
    temp.write(data[:1000])
    temp.spill()  # the disk filled
    temp.write(data[1000:])
    temp.verify()  # the content was still checked
    assert temp.commit() is False
    assert not store.has_blob(digest_of(data)) and store.usage() == (0, 0)


def test_usage_by_repository_and_oldest(make_store: StoreFactory, clock: Clock) -> None:
    store = make_store()
    _put_blob(store, b"1" * 300, "docker.io", "library/alpine")
    clock.now += 1
    _put_blob(store, b"2" * 200, "docker.io", "library/alpine")
    clock.now += 1
    newest = _put_blob(store, b"3" * 100, "ghcr.io", "org/app")
    assert store.usage_by() == [
        ("docker.io", "library/alpine", 500, 2),
        ("ghcr.io", "org/app", 100, 1),
    ]
    oldest = store.oldest(2, used_before=clock.now + 1)
    assert [entry.size for entry in oldest] == [300, 200]
    store.evict(oldest[0])
    assert store.usage() == (300, 2) and store.evictions() == (1, 300)
    assert store.has_blob(newest) and store.state() == "ok"
    # whom each entry was fetched for (what access rules check a hit against)
    assert store.owner(blob_key(newest)) == ("ghcr.io", "org/app")
    data = b'{"schemaVersion": 2}'
    store.put_manifest(digest_of(data), data, "application/json", "quay.io", "org/tool")
    assert store.owner(manifest_key(digest_of(data))) == ("quay.io", "org/tool")
    assert store.owner(blob_key(digest_of(b"never kept"))) is None


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


def test_pending_rows_are_settled_at_start_up(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = DiskStore(root, 1 << 30)
    kept = _put_blob(store, b"kept")
    # A crash between the index row and the rename: a pending row, no file.
    store.index.begin(f"blob:{digest_of(b'lost')}", 4)
    # A crash after the rename, before the confirmation: a pending row and its file.
    landed = _put_blob(store, b"landed")
    store.index.mark_pending(f"blob:{landed}")
    # A pending row whose file is corrupt.
    corrupt = _put_blob(store, b"corrupt")
    store.index.mark_pending(f"blob:{corrupt}")
    store.final_path(corrupt).write_bytes(b"CORRUPT")
    store.close()

    reopened = DiskStore(root, 1 << 30)
    assert reopened.index.pending() == []
    assert reopened.has_blob(kept) and reopened.has_blob(landed)
    assert not reopened.has_blob(corrupt)
    assert reopened.usage() == (len(b"kept") + len(b"landed"), 2)


def test_a_lost_index_is_rebuilt_from_verified_files(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = DiskStore(root, 1 << 30)
    good = _put_blob(store, b"good")
    bad = _put_blob(store, b"bad")
    store.put_manifest(digest_of(b"{}"), b"{}", "application/json")
    store.close()
    store.final_path(bad).write_bytes(b"tampered")
    for name in ("lru.sqlite", "lru.sqlite-wal", "lru.sqlite-shm"):
        (root / name).unlink(missing_ok=True)
    rebuilt = DiskStore(root, 1 << 30)
    assert rebuilt.usage() == (len(b"good") + 2, 2)
    assert rebuilt.has_blob(good) and not rebuilt.has_blob(bad)


def test_a_file_removed_by_hand_is_forgotten(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", 1 << 30)
    digest = _put_blob(store, b"gone")
    store.final_path(digest).unlink()
    assert store.open_blob(digest) is None
    assert store.usage() == (4, 1)  # noted on the loop, dropped off it:
    store.flush_uses()
    assert store.usage() == (0, 0)


def test_a_manifest_removed_elsewhere_is_gone_here_without_a_look_at_every_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hit does not look at the disk every time (that cost more than the answer): a
    manifest `mirror gc` or another worker removes is gone here at once (they rewrite the
    store's removal mark), one removed by hand within RECHECK_SECONDS."""
    now = [1000.0]
    monkeypatch.setattr(disk.time, "monotonic", lambda: now[0])
    server = DiskStore(tmp_path / "store", 1 << 30)
    manifests = [b'{"schemaVersion": 2, "n": %d}' % n for n in range(2)]
    digests = [digest_of(data) for data in manifests]
    for digest, data in zip(digests, manifests, strict=True):
        server.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
        assert server.get_manifest(digest) is not None
    other = DiskStore(tmp_path / "store", 1 << 30, repair=False)  # `mirror gc`, a worker
    (entry,) = [
        e for e in other.oldest(10, used_before=time.time() + 10) if e.key.endswith(digests[0].hex)
    ]
    other.evict(entry)
    assert server.get_manifest(digests[0]) is None  # at once
    assert server.get_manifest(digests[1]) is not None  # looked at again, still there
    server.manifest_path(digests[1]).unlink()  # by hand: no mark
    assert server.get_manifest(digests[1]) is not None  # trusted a moment longer
    now[0] += disk.RECHECK_SECONDS + 0.1
    assert server.get_manifest(digests[1]) is None
    other.close()
    server.close()


async def _follow_to_the_end(store: DiskStore, digest: Digest, into: bytearray) -> None:
    followed = store.follow(digest)
    assert followed is not None
    await followed.wait_started(1)
    async for chunk in followed.read():
        into += chunk


async def test_another_process_gets_the_last_byte_once_verified_not_after_the_fsync(
    tmp_path: Path,
) -> None:
    """A worker following another's fill (workers: N) must not wait for the fsync and
    rename to finish its clients' responses, nor see the last byte before the check."""
    store = DiskStore(tmp_path / "store", 1 << 30)
    data = os.urandom(300_000)
    digest = digest_of(data)
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.announce(len(data))
    temp.write(data)
    got = bytearray()
    reader = asyncio.create_task(_follow_to_the_end(store, digest, got))
    await asyncio.sleep(0.2)
    assert len(got) == len(data) - 1 and not reader.done()
    temp.verify()
    await asyncio.wait_for(reader, 2)
    assert bytes(got) == data and not store.has_blob(digest)  # not committed yet
    assert temp.commit() is True and store.has_blob(digest)


async def test_a_follower_of_wrong_bytes_never_gets_the_last_one(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", 1 << 30)
    digest = digest_of(b"the right bytes")
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.announce(15)
    temp.write(b"the wrong bytes")
    got = bytearray()
    reader = asyncio.create_task(_follow_to_the_end(store, digest, got))
    await asyncio.sleep(0.1)
    with pytest.raises(DigestMismatch):
        temp.verify()
    with pytest.raises(TransferFailed):
        await asyncio.wait_for(reader, 2)
    assert bytes(got) == b"the wrong byte"


async def test_a_follower_of_a_failed_fill_fails_even_when_a_new_fill_succeeds_at_once(
    tmp_path: Path,
) -> None:
    """workers: 2. The writer this follower follows fails its check; another fill of the
    same digest begins and verifies before the follower looks again. The follower must
    not take that one's word for its own file (it would send the failed fill's bytes as
    a whole answer)."""
    data = os.urandom(200_000)
    digest = digest_of(data)
    first = DiskStore(tmp_path / "store", 1 << 30)
    temp = first.begin_blob(digest)
    assert temp is not None
    temp.announce(len(data))
    temp.write(data[:-10] + b"X" * 10)  # wrong bytes
    follower_side = DiskStore(tmp_path / "store", 1 << 30, repair=False)
    got = bytearray()
    reader = asyncio.create_task(_follow_to_the_end(follower_side, digest, got))
    await asyncio.sleep(0.05)
    with pytest.raises(DigestMismatch):
        temp.verify()
    second = DiskStore(tmp_path / "store", 1 << 30, repair=False)
    retry = second.begin_blob(digest)  # at once, before the follower polls again
    assert retry is not None
    retry.announce(len(data))
    retry.write(data)
    retry.verify()
    with pytest.raises(TransferFailed):
        await asyncio.wait_for(reader, 2)
    assert len(got) < len(data)
    assert retry.commit() is True
    for store in (first, follower_side, second):
        store.close()


async def test_a_followed_range_gets_its_last_byte_only_once_verified(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store", 1 << 30)
    data = os.urandom(100_000)
    digest = digest_of(data)
    temp = store.begin_blob(digest)
    assert temp is not None
    temp.announce(len(data))
    temp.write(data)
    followed = store.follow(digest)
    assert followed is not None
    await followed.wait_started(1)
    got = bytearray()

    async def read_range() -> None:
        async for chunk in followed.read(1000, 2000):
            got.extend(chunk)

    reader = asyncio.create_task(read_range())
    await asyncio.sleep(0.1)
    assert len(got) == 999 and not reader.done()  # all written, but not yet verified
    temp.verify()
    await asyncio.wait_for(reader, 2)
    assert bytes(got) == data[1000:2000]
    assert temp.commit() is True
    store.close()


def test_a_short_write_still_stores_the_whole_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """os.write may write less than asked (a signal, a nearly full disk): the rest must
    follow, or the file on disk is a cut manifest."""
    store = DiskStore(tmp_path / "store", 1 << 30)
    data = b'{"schemaVersion": 2, "padding": "' + b"p" * 50_000 + b'"}'
    digest = digest_of(data)
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, chunk: real_write(fd, bytes(chunk)[:1000]))
    assert store.put_manifest(digest, data, "application/vnd.oci.image.manifest.v1+json")
    monkeypatch.undo()
    assert store.manifest_path(digest).read_bytes() == data


def test_one_manifest_kept_by_many_threads_at_once(tmp_path: Path) -> None:
    """Two tags naming one manifest are kept at once from two threads (warm, a server):
    each write has its own temporary, so none removes another's."""
    import concurrent.futures

    store = DiskStore(tmp_path / "store", 10**9)
    media_type = "application/vnd.oci.image.manifest.v1+json"
    for round_ in range(10):
        data = b'{"schemaVersion": 2, "layers": []}' + b" " * (5000 + round_)
        digest = digest_of(data)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            jobs = [pool.submit(store.put_manifest, digest, data, media_type) for _ in range(16)]
            kept = [job.result() for job in jobs]
        assert all(kept) and store.get_manifest(digest) is not None
    assert store.counters.disk_full == 0
    store.close()


def test_gc_dry_run_says_what_gc_would_evict_and_evicts_nothing(tmp_path: Path) -> None:
    now = [time.time() - 3600]  # written an hour ago, a second apart
    store = DiskStore(tmp_path / "store", 1 << 30, clock=lambda: now[0])
    for n in range(5):
        _put_blob(store, bytes([n]) * 1000)
        now[0] += 1
    store.flush_uses()
    out = io.StringIO()
    assert maintenance.gc(store, out, 2500, None, dry_run=True) == 3000
    assert out.getvalue().startswith("would evict 3 entries, ")
    assert "nothing evicted" in out.getvalue()
    assert store.usage() == (5000, 5)
    assert maintenance.gc(store, io.StringIO(), 2500, None) == 3000  # the same three
    assert store.usage() == (2000, 2)
    out = io.StringIO()
    assert maintenance.gc(store, out, None, 10.0, dry_run=True) == 2000  # by age: the rest
    assert store.usage() == (2000, 2)
    store.close()
