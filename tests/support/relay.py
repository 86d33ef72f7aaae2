"""A fault-injecting HTTP relay between the mirror and a real upstream.

It forwards every request to the target registry and can slow blob bodies down, corrupt
one byte of them, answer with a fixed status, or send blob GETs through a redirect to a
second host (as registries do to object storage) that records the headers it received.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
}


@dataclass
class Faults:
    rate: float | None = None  # bytes per second for blob bodies; None: full speed
    corrupt_blobs: bool = False  # flip one byte in the middle of every blob body
    corrupt_manifests: bool = False  # change one byte of every manifest body
    status: int | None = None  # answer every /v2/<name>/ request with this status
    redirect_blobs: bool = False  # send blob GETs to the second host with a 307
    paginate_tags: bool = False  # page tags lists by n/last with a Link, as distribution 3 does
    cut_after: int | None = None  # close the connection after this many bytes of a blob body
    stall_after: int | None = None  # stop sending (but keep the connection) after this many
    faulty_bodies: int = 1  # how many blob bodies the cut or stall applies to
    ratelimit: tuple[int, int] | None = None  # (limit, remaining) headers, as Docker Hub sends
    latency: float = 0.0  # seconds added before each answer: a far registry's round trip


@dataclass
class Relay:
    target: str
    faults: Faults = field(default_factory=Faults)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    authorizations: list[tuple[str, str | None]] = field(default_factory=list)  # (path, header)
    ranges: list[tuple[str, str]] = field(default_factory=list)  # (path, Range header)
    blob_bodies_in_flight: int = 0
    most_blob_bodies_in_flight: int = 0
    redirected_headers: list[dict[str, str]] = field(default_factory=list)
    server: TestServer | None = None
    cdn: TestServer | None = None
    session: aiohttp.ClientSession | None = None
    # How the second host authenticates to the target (as a signed URL would): scope -> header.
    cdn_authorization: Callable[[str], str] | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self) -> Relay:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        cdn = web.Application()
        cdn.router.add_get("/cdn/{tail:.*}", self._cdn)
        self.cdn = TestServer(cdn, host="localhost")  # another host name than 127.0.0.1
        await self.cdn.start_server()
        return self

    async def close(self) -> None:
        for server in (self.server, self.cdn):
            if server is not None:
                await server.close()
        if self.session is not None:
            await self.session.close()

    def count(self, method: str, fragment: str = "") -> int:
        return sum(1 for m, p in self.requests if m == method and fragment in p)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.redirected_headers.append(dict(request.headers))
        path = "/" + request.match_info["tail"]
        extra = {}
        if self.cdn_authorization is not None:
            repository = path.removeprefix("/v2/").split("/blobs/")[0]
            extra["Authorization"] = self.cdn_authorization(f"repository:{repository}:pull")
        return await self._proxy(request, path, dict(request.query), extra)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        self.authorizations.append((request.path, request.headers.get("Authorization")))
        if "Range" in request.headers:
            self.ranges.append((request.path, request.headers["Range"]))
        if (
            self.faults.status is not None
            and request.path.startswith("/v2/")
            and request.path != "/v2/"
        ):
            return web.json_response(
                {"errors": [{"code": "UNAVAILABLE", "message": "injected"}]},
                status=self.faults.status or 500,
                headers={"Retry-After": "17"} if self.faults.status == 429 else None,
            )
        if self.faults.redirect_blobs and "/blobs/" in request.path and request.method == "GET":
            assert self.cdn is not None
            location = f"http://localhost:{self.cdn.port}/cdn{request.path}"
            return web.Response(status=307, headers={"Location": location})
        if self.faults.paginate_tags and request.path.endswith("/tags/list"):
            return await self._paged_tags(request)
        return await self._proxy(request, request.path, dict(request.query))

    async def _paged_tags(self, request: web.Request) -> web.Response:
        assert self.session is not None
        async with self.session.get(self.target + request.path) as upstream:
            listing = await upstream.json()
        tags = sorted(listing["tags"])
        if "last" in request.query:
            tags = [t for t in tags if t > request.query["last"]]
        headers = {}
        if "n" in request.query and len(tags) > int(request.query["n"]):
            tags = tags[: int(request.query["n"])]
            query = urlencode({"last": tags[-1], "n": request.query["n"]})
            headers["Link"] = f'<{request.path}?{query}>; rel="next"'
        return web.json_response({"name": listing["name"], "tags": tags}, headers=headers)

    async def _proxy(
        self,
        request: web.Request,
        path: str,
        query: dict[str, str],
        extra: dict[str, str] | None = None,
    ) -> web.StreamResponse:
        assert self.session is not None
        # A multidict: clients send one Accept header per media type, and all must pass.
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        )
        for key, value in (extra or {}).items():
            headers[key] = value
        body = await request.read()
        async with self.session.request(
            request.method,
            self.target + path,
            params=query,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if self.faults.ratelimit is not None:
                limit, remaining = self.faults.ratelimit
                out_headers["ratelimit-limit"] = f"{limit};w=21600"
                out_headers["ratelimit-remaining"] = f"{remaining};w=21600"
            if request.method == "HEAD":
                head = web.Response(status=upstream.status, headers=out_headers)
                if upstream.content_length is not None:
                    head.headers["Content-Length"] = str(upstream.content_length)
                return head
            # A range of a blob (206) is a blob body too: capped, and corrupted when asked.
            is_blob = "/blobs/" in path and upstream.status in (200, 206)
            is_manifest = "/manifests/" in path and upstream.status == 200
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if is_blob:
                self.blob_bodies_in_flight += 1
                self.most_blob_bodies_in_flight = max(
                    self.most_blob_bodies_in_flight, self.blob_bodies_in_flight
                )
            try:
                return await self._send_body(request, upstream, response, is_blob, is_manifest)
            finally:
                if is_blob:
                    self.blob_bodies_in_flight -= 1

    async def _send_body(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
        is_blob: bool,
        is_manifest: bool,
    ) -> web.StreamResponse:
        sent = 0
        middle = (upstream.content_length or 0) // 2
        faults = self.faults
        limit = None
        if is_blob and faults.faulty_bodies > 0:
            limit = faults.cut_after if faults.cut_after is not None else faults.stall_after
            if limit is not None:
                faults.faulty_bodies -= 1
        # Paced against the clock from the body's start, as a CDN's per-connection cap is:
        # the relay's own work on a busy machine does not lower the rate below the cap.
        began = asyncio.get_running_loop().time()
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            if limit is not None and sent + len(chunk) > limit:
                await response.write(chunk[: limit - sent])
                if faults.stall_after is not None:
                    await asyncio.sleep(3600)  # stalled: the peer's read timeout ends it
                assert request.transport is not None
                request.transport.close()
                return response
            if (is_blob and self.faults.corrupt_blobs) or (
                is_manifest and self.faults.corrupt_manifests
            ):
                chunk = _flip(chunk, middle - sent)
            if is_blob and self.faults.rate:
                due = began + (sent + len(chunk)) / self.faults.rate
                await asyncio.sleep(max(0.0, due - asyncio.get_running_loop().time()))
            sent += len(chunk)
            try:
                await response.write(chunk)
            except ConnectionError:
                break
        await response.write_eof()
        return response


def _flip(chunk: bytes, position: int) -> bytes:
    if 0 <= position < len(chunk):
        return chunk[:position] + bytes([chunk[position] ^ 0xFF]) + chunk[position + 1 :]
    return chunk
