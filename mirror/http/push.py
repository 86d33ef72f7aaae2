"""The push half of the distribution API, for hosted namespaces: uploads (monolithic,
chunked, streamed), cross-repository mounts, manifest pushes by tag or digest, deletes.
Elsewhere every write is refused (405, UNSUPPORTED): a mirrored namespace is read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from urllib.parse import quote, urlencode

import aiohttp
from aiohttp import web

from ..access.gate import Gate
from ..config import Config
from ..errors import (
    RESULT,
    BlobUploadInvalid,
    DigestInvalid,
    ManifestTooLarge,
    RangeInvalid,
    RegistryError,
    TagInvalid,
    Unsupported,
)
from ..hosted.registry import MANIFEST_MAX, Hosted
from ..reference import is_valid_tag, parse_digest
from ..routing import Route, resolve
from .handlers import API_HEADERS, ROUTE

PUSHED = "push"  # how a write counts in the metrics
CHUNK = 1024 * 1024
CONTENT_RANGE = re.compile(r"^(?:bytes[ =])?(\d+)-(\d+)$")


class PushHandlers:
    """Writes under /v2/, for hosted namespaces."""

    def __init__(self, config: Config, hosted: Hosted, gate: Gate) -> None:
        self._config = config
        self._hosted = hosted
        self._gate = gate

    async def _route(self, request: web.Request) -> Route:
        """The hosted namespace written to, once the access rules let this client push."""
        route = resolve(self._config, request.match_info["name"], request.query.get("ns"))
        request[ROUTE] = route
        if not route.upstream.hosted:
            raise Unsupported(
                f"{request.method} is not supported: {route.upstream.name} is mirrored, "
                "read-only (push to a hosted namespace)"
            )
        await self._gate.push(request, route)
        request[RESULT] = PUSHED
        return route

    def _base(self, request: web.Request) -> str:
        return f"/v2/{request.match_info['name']}"

    def _ns(self, request: web.Request) -> str:
        """The `ns=` the client routed by, kept in the Locations it is sent on to."""
        return f"?{urlencode({'ns': request.query['ns']})}" if "ns" in request.query else ""

    def _upload_answer(
        self, request: web.Request, upload: str, size: int, status: int = 202
    ) -> web.Response:
        location = f"{self._base(request)}/blobs/uploads/{upload}{self._ns(request)}"
        return web.Response(
            status=status,
            headers={
                **API_HEADERS,
                "Location": location,
                "Range": f"0-{size - 1}" if size else "0-0",
                "Docker-Upload-UUID": upload,
            },
        )

    def _blob_created(self, request: web.Request, digest: str) -> web.Response:
        return web.Response(
            status=201,
            headers={
                **API_HEADERS,
                "Location": f"{self._base(request)}/blobs/{digest}",
                "Docker-Content-Digest": digest,
            },
        )

    async def start_upload(self, request: web.Request) -> web.StreamResponse:
        """POST /v2/<name>/blobs/uploads/: a mount (`mount=`, `from=`), a monolithic
        upload (`digest=` with the body), or a new upload session (202)."""
        route = await self._route(request)
        mount = request.query.get("mount")
        if mount is not None:
            mounted = None
            for source in await self._mount_sources(request, mount):
                mounted = await self._hosted.mount(route, mount, source)
                if mounted is not None:
                    break
            if mounted is not None:
                return self._blob_created(request, str(mounted))
        elif "digest" in request.query:
            digest = await self._hosted.put_blob(route, request.query["digest"], _body(request))
            return self._blob_created(request, str(digest))
        upload = await self._hosted.begin_upload(route)
        return self._upload_answer(request, upload, 0)

    async def _mount_sources(self, request: web.Request, digest: str) -> list[Route]:
        """The repositories a mount may take `digest` from: `from=`, or without it every
        hosted repository holding it; only those this client may pull (the others are
        not named: the mount fails, and an upload begins, as for a blob not there)."""
        allowed = await self._gate.visible(request)
        candidates: list[Route] = []
        if "from" in request.query:
            with contextlib.suppress(RegistryError):
                candidates.append(resolve(self._config, request.query["from"], None))
        else:
            for upstream, repository in await self._hosted.holders(digest):
                config = self._config.upstreams.get(upstream)
                if config is not None and config.hosted:
                    candidates.append(Route(config, repository))
        return [route for route in candidates if route.upstream.hosted and allowed(route)]

    async def upload_status(self, request: web.Request) -> web.StreamResponse:
        """GET /v2/<name>/blobs/uploads/<id>: how much was received (204)."""
        route = await self._route(request)
        upload = request.match_info["upload"]
        size = await self._hosted.upload_size(route, upload)
        return self._upload_answer(request, upload, size, status=204)

    async def upload_chunk(self, request: web.Request) -> web.StreamResponse:
        """PATCH /v2/<name>/blobs/uploads/<id>: a chunk (with Content-Range) or the rest
        of a streamed upload (without)."""
        route = await self._route(request)
        upload = request.match_info["upload"]
        start, length = _content_range(request)
        size = await self._hosted.append(route, upload, _body(request), start, length)
        return self._upload_answer(request, upload, size)

    async def finish_upload(self, request: web.Request) -> web.StreamResponse:
        """PUT /v2/<name>/blobs/uploads/<id>?digest=: the last chunk (if any), checked."""
        route = await self._route(request)
        upload = request.match_info["upload"]
        if request.can_read_body:
            start, length = _content_range(request)
            await self._hosted.append(route, upload, _body(request), start, length)
        digest = await self._hosted.finish(route, upload, request.query.get("digest"))
        return self._blob_created(request, str(digest))

    async def cancel_upload(self, request: web.Request) -> web.StreamResponse:
        """DELETE /v2/<name>/blobs/uploads/<id>."""
        route = await self._route(request)
        await self._hosted.cancel_upload(route, request.match_info["upload"])
        return web.Response(status=204, headers=API_HEADERS)

    async def put_manifest(self, request: web.Request) -> web.StreamResponse:
        """PUT /v2/<name>/manifests/<tag|digest>[?tag=...]."""
        route = await self._route(request)
        reference = request.match_info["reference"]
        if parse_digest(reference) is None and not is_valid_tag(reference):
            if ":" in reference:
                raise DigestInvalid(f"invalid digest {reference!r}")
            raise TagInvalid(f"invalid tag {reference!r}", detail={"tag": reference})
        tags = request.query.getall("tag", [])
        for tag in tags:
            if not is_valid_tag(tag):
                raise TagInvalid(f"invalid tag {tag!r}", detail={"tag": tag})
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ManifestTooLarge(
                f"a manifest of over {MANIFEST_MAX} bytes is not taken"
            ) from None
        digest, subject = await self._hosted.put_manifest(
            route, reference, data, request.headers.get("Content-Type", ""), tags
        )
        headers = {
            **API_HEADERS,
            "Location": f"{self._base(request)}/manifests/{quote(str(digest))}",
            "Docker-Content-Digest": str(digest),
        }
        if subject is not None:
            headers["OCI-Subject"] = subject
        response = web.Response(status=201, headers=headers)
        for tag in tags:  # each tag= taken, as the spec asks of registries taking them
            response.headers.add("OCI-Tag", tag)
        return response

    async def delete_manifest(self, request: web.Request) -> web.StreamResponse:
        """DELETE /v2/<name>/manifests/<digest> (the manifest) or <tag> (the tag)."""
        route = await self._route(request)
        await self._hosted.delete_manifest(route, request.match_info["reference"])
        return web.Response(status=202, headers=API_HEADERS)

    async def delete_blob(self, request: web.Request) -> web.StreamResponse:
        """DELETE /v2/<name>/blobs/<digest>: the repository no longer holds it."""
        route = await self._route(request)
        digest = parse_digest(request.match_info["digest"])
        if digest is None:
            raise DigestInvalid(f"invalid digest {request.match_info['digest']!r}")
        await self._hosted.delete_blob(route, digest)
        return web.Response(status=202, headers=API_HEADERS)


def _content_range(request: web.Request) -> tuple[int | None, int | None]:
    """(first byte, length) a chunk says it is (Content-Range, Content-Length)."""
    length = request.content_length
    text = request.headers.get("Content-Range")
    if text is None:
        return None, length
    match = CONTENT_RANGE.fullmatch(text.strip())
    if match is None:
        raise RangeInvalid(f"Content-Range {text!r} is not <start>-<end>")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise RangeInvalid(f"Content-Range {text!r} ends before it starts")
    if length is not None and length != end - start + 1:
        raise RangeInvalid(f"Content-Range {text!r} does not match Content-Length {length}")
    return start, end - start + 1


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """A request's body as it arrives; a client that stops sending mid-way is an upload
    not taken (its chunk is dropped), not an internal error."""
    try:
        async for chunk in request.content.iter_chunked(CHUNK):
            yield chunk
    except (ConnectionError, asyncio.IncompleteReadError, aiohttp.ClientPayloadError) as exc:
        raise BlobUploadInvalid(
            f"the client stopped sending: {exc or type(exc).__name__}"
        ) from None
