"""The shared tier's contract, against a real S3 server (SeaweedFS): what is put is read
back exactly, whole or not at all; what does not match its digest is not taken; a store
that is away answers "not there" at once and never raises into a pull."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mirror.config import S3Config
from mirror.reference import Digest, digest_of
from mirror.store.s3 import PART_SIZE, S3Tier, TierUnavailable
from tests.support.engines import SeaweedS3, free_port, seaweed_s3


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    with seaweed_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


def _config(s3: SeaweedS3, prefix: str, **changes: str) -> S3Config:
    fields = {
        "bucket": s3.bucket,
        "endpoint": s3.endpoint,
        "prefix": prefix,
        "access_key": s3.access_key,
        "secret_key": s3.secret_key,
        **changes,
    }
    return S3Config(**fields)


@pytest.fixture
async def tier(s3: SeaweedS3, request: pytest.FixtureRequest) -> AsyncIterator[S3Tier]:
    shared = S3Tier(_config(s3, f"{request.node.name}/"), read_timeout=10)
    yield shared
    await shared.close()


async def _read(tier: S3Tier, digest: Digest) -> tuple[int | None, bytes]:
    told: list[int | None] = []
    data = b"".join(
        [chunk async for chunk in tier.blob_chunks(digest, started=lambda n, r: told.append(n))]
    )
    return told[0], data


def _put(tier: S3Tier, tmp_path: Path, data: bytes) -> tuple[Digest, int]:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return digest_of(data), os.open(path, os.O_RDONLY)


async def test_a_blob_is_read_back_exactly_small_or_in_parts(tier: S3Tier, tmp_path: Path) -> None:
    for size in (10_000, 2 * PART_SIZE + 12345):  # one PUT; a multipart upload of 3 parts
        data = os.urandom(size)
        digest, fd = _put(tier, tmp_path, data)
        try:
            assert await tier.blob_size(digest) is None
            assert await tier.put_blob(digest, fd, size)
        finally:
            os.close(fd)
        assert await tier.blob_size(digest) == size
        assert await _read(tier, digest) == (size, data)


async def test_manifests_keep_exact_bytes_and_type_and_wrong_bytes_are_not_taken(
    tier: S3Tier, s3: SeaweedS3, request: pytest.FixtureRequest
) -> None:
    data = b'{"schemaVersion": 2,   "odd":  "spacing"}' + b" " * 10_000
    digest = digest_of(data)
    media_type = "application/vnd.oci.image.manifest.v1+json"
    assert await tier.get_manifest(digest) is None
    await tier.put_manifest(digest, data, media_type)
    assert await tier.get_manifest(digest) == (data, media_type)
    # Someone else's bytes under the key: not taken for the manifest.
    key = f"{request.node.name}/manifests/sha256/{digest.hex}"
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=data + b" ")
    assert await tier.get_manifest(digest) is None


async def test_a_store_that_is_away_answers_not_there_at_once(s3: SeaweedS3) -> None:
    away = S3Tier(_config(s3, "away/", endpoint=f"http://127.0.0.1:{free_port()}"), 10)
    digest = digest_of(b"never there")
    try:
        started = time.monotonic()
        assert await away.blob_size(digest) is None
        assert not away.reachable
        # Rested after a failure: the next calls do not even try.
        assert await away.get_manifest(digest) is None
        assert await away.put_blob(digest, 0, 11) is False
        with pytest.raises(TierUnavailable):
            await _read(away, digest)
        assert time.monotonic() - started < 10
    finally:
        await away.close()


async def test_wrong_credentials_are_a_store_that_is_away(s3: SeaweedS3) -> None:
    wrong = S3Tier(_config(s3, "wrong/", secret_key="not-the-secret"), 10)
    try:
        assert await wrong.blob_size(digest_of(b"x")) is None
        assert not wrong.reachable
    finally:
        await wrong.close()
