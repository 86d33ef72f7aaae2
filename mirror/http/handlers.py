"""Thin aiohttp handlers, one per route: parse and check the request, ask the proxy, answer.

Errors are raised, never rendered here: `errors.error_middleware` renders them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from ..access.gate import Gate
from ..config import Config
from ..errors import (
    RESULT,
    DigestInvalid,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    PaginationInvalid,
    RangeInvalid,
    Unsupported,
)
from ..hosted.registry import Hosted
from ..inflight import BlobStream, FileRegion, TransferFailed
from ..logs import printable
from ..policy.answers import HIT, MISS, Manifest
from ..policy.proxy import Proxy
from ..reference import Digest, is_valid_tag, looks_like_digest, parse_digest
from ..routing import Route, resolve
from ..store.base import StoredBlob
from .sendfile import FileShrank, send_file

log = logging.getLogger("mirror.handlers")

API_HEADERS = {"Docker-Distribution-Api-Version": "registry/2.0"}
# On every answer: none is ever sniffed into something a browser runs (an upstream controls
# what manifests and pages say, and the status page shares their origin).
INERT_HEADERS = {"X-Content-Type-Options": "nosniff"}
PING = "ping"  # how GET /v2/ counts: neither a hit nor a miss
CATALOG_PAGE = 1000  # repositories in a /v2/_catalog answer when the client names no n
CATALOG_MAX = 10_000
WRITE_METHODS = ("PUT", "POST", "PATCH", "DELETE")
# Where an answer came from: hit, miss, or stale (the upstream could not confirm it).
CACHE_HEADER = "X-Mirror-Cache"
ROUTE = web.RequestKey("route", Route)  # the Route a request was given
# Body bytes of a streamed or sendfile answer handed to the connection so far: what the
# client was really sent, when it left (or the transfer broke) before the end.
BODY_SENT = web.RequestKey("body_sent", int)
BACKWARDS_RANGE = re.compile(r"bytes=(\d+)-(\d+)")
EMPTY_SUFFIX_RANGE = re.compile(r"bytes=-0+")


def _digest(text: str) -> Digest:
    digest = parse_digest(text)
    if digest is None:
        raise DigestInvalid(f"invalid or unsupported digest {text!r}", detail={"digest": text})
    return digest


def _byte_range(request: web.Request, size: int) -> tuple[int, int] | None:
    """The [start, end) a `Range` header asks of `size` bytes; None for all of them."""
    if "Range" not in request.headers:
        return None
    try:
        wanted = request.http_range
    except ValueError:
        # A Range we cannot read is ignored, as HTTP allows; one that ends before it
        # starts cannot be satisfied (416, as the conformance suite asks).
        backwards = BACKWARDS_RANGE.fullmatch(request.headers["Range"].strip())
        if backwards and int(backwards.group(1)) > int(backwards.group(2)):
            raise RangeInvalid(
                f"range not satisfiable for {size} bytes",
                headers={"Content-Range": f"bytes */{size}"},
            ) from None
        return None
    first = wanted.start or 0
    if wanted.start is not None and wanted.start < 0:
        first = max(0, size + wanted.start)
    last = size if wanted.stop is None else min(wanted.stop, size)
    # The last 0 bytes ask for no byte at all (RFC 9110 14.1.1), but read as the whole.
    empty = EMPTY_SUFFIX_RANGE.fullmatch(request.headers["Range"].strip()) is not None
    if empty or first >= size or first >= last:
        raise RangeInvalid(
            f"range not satisfiable for {size} bytes",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return None if (first, last) == (0, size) else (first, last)


def _tags_document(body: bytes) -> dict[str, Any] | None:
    """A tags list answer, parsed (None: not one)."""
    try:
        document = json.loads(body)
    except ValueError:
        return None
    tags = document.get("tags") if isinstance(document, dict) else None
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        return None
    return document  # type: ignore[no-any-return]


def _paged(tags: list[str], request: web.Request) -> tuple[list[str], str | None]:
    """The tags the request's `n` and `last` ask for, in the spec's (lexical) order, and
    the query of the next page (None: this is the last)."""
    count, last = _page_request(request)
    ordered = sorted(tags)
    after = [tag for tag in ordered if tag > last] if last else ordered
    if count is None or len(after) <= count:
        return after, None
    page = after[:count]
    return page, urlencode({"n": count, "last": page[-1]}) if page else None


def _page_request(request: web.Request) -> tuple[int | None, str]:
    """(`n`, `last`) of a paginated list request; n None: no limit asked."""
    text = request.query.get("n")
    try:
        count = None if text is None else int(text)
    except ValueError:
        count = -1
    if count is not None and count < 0:
        raise PaginationInvalid("n must be a whole number, 0 or more")
    return count, request.query.get("last", "")


def _not_modified(request: web.Request, headers: dict[str, str]) -> web.Response:
    """304: the client has these bytes (a digest names them forever)."""
    request[RESULT] = HIT
    return web.Response(status=304, headers={**headers, CACHE_HEADER: HIT})


def manifest_headers(answer: Manifest) -> dict[str, str]:
    """A manifest answer's headers, but for its length (for the handler and the fast path)."""
    return {
        **API_HEADERS,
        "Docker-Content-Digest": answer.digest,
        "ETag": f'"{answer.digest}"',
        "Content-Type": answer.media_type,
        CACHE_HEADER: answer.source,
    }


def _etag_matches(request: web.Request, digest: str) -> bool:
    header = request.headers.get("If-None-Match", "")
    return any(tag.strip().strip('"') == digest for tag in header.split(",")) if header else False


class RegistryHandlers:
    """The OCI pull API over one Proxy."""

    def __init__(
        self, config: Config, proxy: Proxy, gate: Gate, hosted: Hosted | None = None
    ) -> None:
        self._config = config
        self._proxy = proxy
        self._gate = gate
        self._hosted = hosted  # the hosted namespaces, read from here too

    async def _route(self, request: web.Request) -> Route:
        """Where the request goes, once the access rules let it (before anything is read
        from the cache or asked of an upstream)."""
        route = resolve(self._config, request.match_info["name"], request.query.get("ns"))
        request[ROUTE] = route
        await self._gate.pull(request, route)
        return route

    async def base(self, request: web.Request) -> web.StreamResponse:
        """GET|HEAD /v2/: the API version check every client starts with."""
        await self._gate.base(request)
        request[RESULT] = PING
        return web.json_response({}, headers=API_HEADERS)

    async def manifest(self, request: web.Request) -> web.StreamResponse:
        """GET|HEAD /v2/<name>/manifests/<tag|digest>."""
        route = await self._route(request)
        reference = request.match_info["reference"]
        if looks_like_digest(reference):
            _digest(reference)
        elif not is_valid_tag(reference):
            # No manifest can have that name: unknown (404), as the conformance suite asks.
            raise ManifestUnknown(f"no manifest is tagged {reference!r}: not a valid tag")
        head = request.method == "HEAD"
        # Clients may send one Accept header per media type: take them all.
        accept = ", ".join(request.headers.getall("Accept", []))
        answer: Manifest
        if route.upstream.hosted and self._hosted is not None:
            pushed = await self._hosted.manifest(route, reference)
            answer = Manifest(pushed.digest, pushed.media_type, len(pushed.data), pushed.data, HIT)
        else:
            answer = await self._proxy.manifest(route, reference, accept, head=head)
        request[RESULT] = answer.source
        headers = manifest_headers(answer)
        if _etag_matches(request, answer.digest):
            return web.Response(status=304, headers=headers)
        if head:
            headers["Content-Length"] = str(answer.size)
            return web.Response(headers=headers)
        return web.Response(body=answer.data, headers=headers)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """GET|HEAD /v2/<name>/blobs/<digest>: a hit by sendfile, a miss as it arrives."""
        route = await self._route(request)
        digest = _digest(request.match_info["digest"])
        headers = {
            **API_HEADERS,
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
            "ETag": f'"{digest}"',  # the content's name: it never changes
        }
        if route.upstream.hosted and self._hosted is not None:
            return await self._pushed_blob(request, route, digest, headers)
        if _etag_matches(request, str(digest)):
            # The client has these bytes (a digest names them forever): nothing to fetch.
            return _not_modified(request, headers)
        if request.method == "HEAD":
            size, request[RESULT] = await self._proxy.blob_size(route, digest)
            headers["Content-Length"] = str(size)
            headers["Accept-Ranges"] = "bytes"
            headers[CACHE_HEADER] = request[RESULT]
            return web.Response(headers=headers)
        source, result = await self._proxy.open_blob(route, digest)
        request[RESULT] = result
        headers[CACHE_HEADER] = result
        if not isinstance(source, StoredBlob):
            return await self._stream(request, source, headers)
        with contextlib.closing(source):
            return await self._send_stored(request, source, headers)

    async def _pushed_blob(
        self, request: web.Request, route: Route, digest: Digest, headers: dict[str, str]
    ) -> web.StreamResponse:
        """A blob of a hosted namespace: 404 unless the repository holds it, whatever the
        client says it has."""
        assert self._hosted is not None
        request[RESULT] = headers[CACHE_HEADER] = HIT
        if request.method == "HEAD":
            size = await self._hosted.blob_size(route, digest)
            await self._hosted.seen(route, digest)  # a pusher asking: its grace anew
            if _etag_matches(request, str(digest)):
                return _not_modified(request, headers)
            headers["Content-Length"] = str(size)
            headers["Accept-Ranges"] = "bytes"
            return web.Response(headers=headers)
        with contextlib.closing(await self._hosted.open_blob(route, digest)) as pushed:
            if _etag_matches(request, str(digest)):
                return _not_modified(request, headers)
            return await self._send_stored(request, pushed, headers)

    async def _start(
        self, request: web.Request, size: int | None, headers: dict[str, str]
    ) -> tuple[web.StreamResponse, AbstractStreamWriter, int, int | None]:
        """Prepare a blob response (206 for a Range of it; an impossible Range raises an OCI
        416 before any header is sent): the response, its writer, and the [start, end) of
        the blob it carries."""
        start, end = 0, size
        status = 200
        if size is not None and (wanted := _byte_range(request, size)) is not None:
            start, end, status = wanted[0], wanted[1], 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        headers["Accept-Ranges"] = "bytes"
        response = web.StreamResponse(status=status, headers=headers)
        if end is not None:
            response.content_length = end - start
        writer = await response.prepare(request)
        assert writer is not None
        return response, writer, start, end

    async def _send_stored(
        self, request: web.Request, stored: StoredBlob, headers: dict[str, str]
    ) -> web.StreamResponse:
        """A hit: sent by the kernel from the page cache (sendfile) when the store has a
        file for it, else in chunks."""
        response, writer, start, end = await self._start(request, stored.size, headers)
        assert end is not None
        transport = request.transport
        if transport is None:
            return response  # the client left
        request[BODY_SENT] = 0

        def sent(count: int) -> None:
            request[BODY_SENT] += count

        fd = stored.fileno()
        try:
            if fd is not None:
                await send_file(response, writer, transport, fd, start, end - start, sent)
            else:
                async for chunk in stored.chunks(start, end):
                    await response.write(chunk)
                    sent(len(chunk))
        except (FileShrank, OSError) as exc:
            if isinstance(exc, ConnectionError):
                return response  # the client left
            log.error("aborting %s: cached blob %s", printable(request.path), exc)
            transport.abort()
            return response
        await response.write_eof()
        return response

    async def _stream(
        self, request: web.Request, transfer: BlobStream, headers: dict[str, str]
    ) -> web.StreamResponse:
        """Send a blob while it is being fetched; abort the connection if the fetch fails.
        What is already in the fill's file goes by sendfile, so a herd of clients behind
        one fill costs the kernel's copies, not Python's."""
        response, writer, start, end = await self._start(request, transfer.size, headers)
        transport = request.transport
        if transport is None:
            return response  # the client left
        request[BODY_SENT] = 0

        def sent(count: int) -> None:
            request[BODY_SENT] += count

        # sendfile writes past aiohttp's chunked framing: only for a body of known length.
        pieces = transfer.pieces if response.content_length is not None else transfer.read
        try:
            async for piece in pieces(start, end):
                if isinstance(piece, FileRegion):
                    await send_file(
                        response, writer, transport, piece.fd, piece.offset, piece.count, sent
                    )
                else:
                    await response.write(piece)
                    sent(len(piece))
        except ConnectionError:
            return response  # the client left; the fill goes on without it
        except (TransferFailed, FileShrank, OSError) as exc:
            log.warning("aborting %s: %s", printable(request.path), exc)
            transport.abort()
            return response
        await response.write_eof()
        return response

    async def tags(self, request: web.Request) -> web.StreamResponse:
        """GET /v2/<name>/tags/list, with `n`, `last` and the upstream's `Link` kept."""
        route = await self._route(request)
        params = {k: request.query[k] for k in ("n", "last") if k in request.query}
        if route.upstream.hosted and self._hosted is not None:
            request[RESULT] = HIT
            tags, next_query = _paged(await self._hosted.tags(route), request)
            body = json.dumps({"name": request.match_info["name"], "tags": tags}).encode()
            return self._page_response(request, body, "application/json", next_query)
        page = await self._proxy.page(route, "tags/list", params, NameUnknown)
        request[RESULT] = MISS
        body, next_query = page.body, page.next_query
        document = _tags_document(body) if params else None
        if document is not None:
            # The spec's n and last, kept even by an upstream that does not (docker-registry
            # 2.8 answers the tag named by last too, and in its own order).
            tags, ours = _paged(document["tags"], request)
            next_query = ours or next_query  # (cut here, or by the upstream)
            body = json.dumps({**document, "tags": tags}).encode()
        return self._page_response(request, body, page.content_type, next_query)

    async def referrers(self, request: web.Request) -> web.StreamResponse:
        """GET /v2/<name>/referrers/<digest>, passed through."""
        route = await self._route(request)
        digest = _digest(request.match_info["digest"])
        if route.upstream.hosted and self._hosted is not None:
            wanted = request.query.get("artifactType")
            index = await self._hosted.referrers(route, digest, wanted)
            request[RESULT] = HIT
            headers = {**API_HEADERS, "Content-Type": "application/vnd.oci.image.index.v1+json"}
            if wanted is not None:
                headers["OCI-Filters-Applied"] = "artifactType"
            return web.Response(body=json.dumps(index).encode(), headers=headers)
        params = {k: request.query[k] for k in ("artifactType",) if k in request.query}
        page = await self._proxy.page(route, f"referrers/{digest}", params, ManifestUnknown)
        request[RESULT] = MISS
        return self._page_response(request, page.body, page.content_type, page.next_query)

    def _page_response(
        self, request: web.Request, body: bytes, content_type: str, next_query: str | None
    ) -> web.Response:
        headers = {**API_HEADERS, "Content-Type": content_type}
        if next_query is not None:
            query = next_query
            if "ns" in request.query:
                query += "&" + urlencode({"ns": request.query["ns"]})
            headers["Link"] = f'<{request.path}?{query}>; rel="next"'
        return web.Response(body=body, headers=headers)

    async def catalog(self, request: web.Request) -> web.StreamResponse:
        """GET /v2/_catalog: the cached repositories this client may pull, by the names it
        would pull them with, `n` at a time after `last`, with a `Link` to the next page."""
        allowed = await self._gate.visible(request)
        try:
            count = min(int(request.query.get("n", CATALOG_PAGE)), CATALOG_MAX)
        except ValueError:
            count = -1
        if count < 0:
            raise PaginationInvalid("n must be a whole number, 0 or more")
        last = request.query.get("last", "")
        names = []
        for upstream, repository in await self._proxy.repositories():
            config = self._config.upstreams.get(upstream)
            if config is None or not allowed(Route(config, repository)):
                continue
            default = upstream == self._config.default_upstream
            names.append(repository if default else f"{upstream}/{repository}")
        names = sorted(name for name in names if name > last)
        page = names[: max(count, 0)]
        headers = dict(API_HEADERS)
        if len(names) > len(page) and page:
            query = urlencode({"last": page[-1], "n": count})
            headers["Link"] = f'</v2/_catalog?{query}>; rel="next"'
        request[RESULT] = HIT
        return web.json_response({"repositories": page}, headers=headers)

    async def other(self, request: web.Request) -> web.StreamResponse:
        """Anything else under /v2/: writes are refused, the rest is unknown."""
        if request.method in WRITE_METHODS:
            raise Unsupported(f"{request.method} is not supported: this mirror is read-only")
        if request.method not in ("GET", "HEAD"):
            raise Unsupported(f"{request.method} is not supported")
        raise NotFound(f"no route for {request.method} {request.path}")
