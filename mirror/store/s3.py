"""The shared tier: verified blobs and manifests in an S3-compatible bucket (AWS S3,
SeaweedFS, MinIO, Ceph RGW), behind every replica's disk. A replica missing a blob looks
here before its upstream; what it fetched from an upstream it uploads here once verified.

Only verified content is uploaded, and an object appears whole or not at all (a PUT, or a
multipart upload completed at the end), so the bucket holds nothing half-written. It is
still not trusted more than an upstream: what is read back is checked against its digest
by whoever reads it. aiobotocore is the client: botocore's signing, retries and
credential chain (the standard AWS environment, files and roles), on the event loop.

The tier helps; it is never needed. When a call fails the tier is left alone for a few
seconds, the replica says so once, and pulls go on from the disk and the upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import ClientError

from ..config import S3Config
from ..reference import Digest

log = logging.getLogger("mirror.s3")

TIER_REST = 15.0  # seconds the tier is left alone after it failed
CONNECT_TIMEOUT = 2.0  # seconds to reach the object store
# Seconds an answer may take to begin (a HEAD, a GET's headers, a manifest): a store that
# hangs costs a pull this once, then is rested, not timeouts.read per request.
ANSWER_TIMEOUT = 3.0
READ_CHUNK = 1024 * 1024
PART_SIZE = 16 * 1024 * 1024  # multipart upload part (S3's minimum is 5 MiB); read one at a time
SINGLE_PUT_MAX = 2 * PART_SIZE  # blobs up to this go up in one PUT


class TierUnavailable(Exception):
    """The object store did not answer (or failed): go on without it."""


class S3Tier:
    """One bucket (and key prefix) shared by every replica."""

    def __init__(self, config: S3Config, read_timeout: float) -> None:
        self._config = config
        self._read_timeout = read_timeout
        self._client: Any = None
        self._bucket_ready = False
        self._exit = contextlib.AsyncExitStack()
        self._opening = asyncio.Lock()
        self._resting_until = 0.0  # monotonic
        self.reachable = True

    def _key(self, kind: str, digest: Digest) -> str:
        return f"{self._config.prefix}{kind}/{digest.algorithm}/{digest.hex}"

    async def _s3(self) -> Any:
        """The client, made on first use (inside the loop that uses it)."""
        if time.monotonic() < self._resting_until:
            raise TierUnavailable("resting after a failure")
        async with self._opening:
            if self._client is None:
                config = self._config
                session = get_session()
                self._client = await self._exit.enter_async_context(
                    session.create_client(
                        "s3",
                        endpoint_url=config.endpoint,
                        region_name=config.region,
                        aws_access_key_id=config.access_key,
                        aws_secret_access_key=config.secret_key,
                        config=AioConfig(
                            connect_timeout=CONNECT_TIMEOUT,
                            read_timeout=self._read_timeout,
                            # No retries: a call that fails falls back to the disk or
                            # the upstream at once, which costs a pull less than waiting.
                            retries={"max_attempts": 1, "mode": "standard"},
                            s3={"addressing_style": "path"},
                            # Plain Content-MD5/none, as every S3-compatible store takes.
                            request_checksum_calculation="when_required",
                            response_checksum_validation="when_required",
                        ),
                    )
                )
            if not self._bucket_ready:
                await self._ensure_bucket(self._client)
                self._bucket_ready = True
        return self._client

    async def _ensure_bucket(self, s3: Any) -> None:
        """Create the bucket when it does not exist yet (a fresh SeaweedFS or MinIO); a
        store that refuses (no right to) is left to fail the calls that need it."""
        try:
            await s3.head_bucket(Bucket=self._config.bucket)
        except ClientError as exc:
            if _not_found(exc) or exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                with contextlib.suppress(ClientError):
                    await s3.create_bucket(Bucket=self._config.bucket)
                    log.info("created bucket %s for the shared tier", self._config.bucket)

    def _failed(self, what: str, exc: BaseException) -> TierUnavailable:
        self._resting_until = time.monotonic() + TIER_REST
        if self.reachable:
            log.warning(
                "the shared tier (s3 bucket %s) failed %s: %s; going on with the disk and the "
                "upstreams",
                self._config.bucket,
                what,
                (str(exc) or type(exc).__name__).splitlines()[0],
            )
        self.reachable = False
        return TierUnavailable(str(exc))

    def _answered(self) -> None:
        if not self.reachable:
            log.warning("the shared tier (s3 bucket %s) answers again", self._config.bucket)
            self.reachable = True

    async def start(self) -> None:
        """Make the client and find the bucket now, so the first pull does not pay it."""
        try:
            await self._s3()
        except Exception as exc:  # (said once; the first pull tries again after the rest)
            self._failed("at start-up", exc)

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # (TimeoutError: a store that hangs)
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await self._exit.aclose()

    async def blob_size(self, digest: Digest) -> int | None:
        """The blob's length when the tier has it; None when it does not or is away."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                head = await (await self._s3()).head_object(
                    Bucket=self._config.bucket, Key=self._key("blobs", digest)
                )
        except TierUnavailable:
            return None
        except ClientError as exc:
            if _not_found(exc):
                self._answered()
                return None
            self._failed("a HEAD", exc)
            return None
        except Exception as exc:
            self._failed("a HEAD", exc)
            return None
        self._answered()
        return int(head["ContentLength"])

    async def blob_chunks(
        self, digest: Digest, *, started: Callable[[int | None, bool], None]
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes; `started(length, False)` before the first. Raises
        TierUnavailable when the tier fails (also part-way: the caller's fill then fails)."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                answer = await (await self._s3()).get_object(
                    Bucket=self._config.bucket, Key=self._key("blobs", digest)
                )
        except TierUnavailable:
            raise
        except Exception as exc:
            raise self._failed("a GET", exc) from None
        body = answer["Body"]
        try:
            started(int(answer["ContentLength"]), False)
            while True:
                try:
                    chunk = await body.read(READ_CHUNK)
                except Exception as exc:
                    raise self._failed("mid-GET", exc) from None
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()
        self._answered()

    async def put_blob(self, digest: Digest, fd: int, size: int) -> bool:
        """Upload a verified blob from an open file; True once it is in the tier."""
        key = self._key("blobs", digest)
        try:
            s3 = await self._s3()
            if size <= SINGLE_PUT_MAX:
                data = await asyncio.to_thread(os.pread, fd, size, 0)
                await s3.put_object(Bucket=self._config.bucket, Key=key, Body=data)
            else:
                await self._multipart(s3, key, fd, size)
        except TierUnavailable:
            return False
        except Exception as exc:
            self._failed(f"uploading {digest}", exc)
            return False
        self._answered()
        return True

    async def _multipart(self, s3: Any, key: str, fd: int, size: int) -> None:
        """A large blob in parts, one in memory at a time; visible only once completed."""
        bucket = self._config.bucket
        upload = await s3.create_multipart_upload(Bucket=bucket, Key=key)
        upload_id = upload["UploadId"]
        try:
            parts = []
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                data = await asyncio.to_thread(os.pread, fd, min(PART_SIZE, size - offset), offset)
                part = await s3.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
            await s3.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            raise

    async def remove_blob(self, digest: Digest) -> None:
        """Drop a blob that did not verify when read back, so the next reader goes upstream."""
        with contextlib.suppress(Exception):
            await (await self._s3()).delete_object(
                Bucket=self._config.bucket, Key=self._key("blobs", digest)
            )

    async def get_manifest(self, digest: Digest) -> tuple[bytes, str] | None:
        """A manifest's exact bytes and media type, when the tier has them and they match."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                answer = await (await self._s3()).get_object(
                    Bucket=self._config.bucket, Key=self._key("manifests", digest)
                )
                async with answer["Body"] as body:
                    data = await body.read()
        except TierUnavailable:
            return None
        except ClientError as exc:
            if not _not_found(exc):
                self._failed("a manifest GET", exc)
            return None
        except Exception as exc:
            self._failed("a manifest GET", exc)
            return None
        self._answered()
        hasher = digest.hasher()
        hasher.update(data)
        if hasher.hexdigest() != digest.hex:
            log.warning("the shared tier's copy of manifest %s does not match it: ignored", digest)
            return None
        return data, str(answer.get("ContentType") or "application/octet-stream")

    async def put_manifest(self, digest: Digest, data: bytes, media_type: str) -> None:
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await (await self._s3()).put_object(
                    Bucket=self._config.bucket,
                    Key=self._key("manifests", digest),
                    Body=data,
                    ContentType=media_type,
                )
        except TierUnavailable:
            return
        except Exception as exc:
            self._failed(f"uploading manifest {digest}", exc)
            return
        self._answered()


def _not_found(exc: ClientError) -> bool:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 404 or error.get("Code") in ("404", "NoSuchKey", "NotFound")
