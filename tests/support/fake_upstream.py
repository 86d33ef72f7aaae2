"""A scripted OCI registry that misbehaves on purpose.

A real upstream (distribution) only answers correctly; the mirror must also survive
registries that lie about lengths or digests, stream without a length, trickle bodies, cut
connections, hang, or answer 401 first and 200 after. Each test sets the answers it needs per
(method, path), and reads back what the mirror asked.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.test_utils import TestServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
GENERATED_PIECE = 64 * 1024


@dataclass
class Body:
    """How one answer's body is sent."""

    data: bytes = b""
    content_type: str = OCI_MANIFEST
    status: int = 200
    # Send Docker-Content-Digest: sha256 of the body (or `claimed_digest` when set).
    digest_header: bool = True
    claimed_digest: str | None = None
    # Send Content-Length; False: chunked transfer encoding, no length.
    length_header: bool = True
    # Send this Content-Length instead of the real one (a lie); the body sent is still `data`
    # (whole, even past the declared length), then the connection is closed.
    declared_length: int | None = None
    piece: int | None = None  # write the body in separate pieces of this many bytes
    pause: float = 0.0  # seconds to sleep between pieces (sleep(0) when 0)
    # Instead of `data`, stream this many bytes of b"x" made on the fly in 64 KiB pieces (or
    # `piece`), never holding them all: for bodies of a GiB.
    generated: int | None = None
    cut_after: int | None = None  # close the connection after this many body bytes
    hang: bool = False  # send the headers, then never the body
    hang_before_headers: bool = False  # accept the request, never answer
    # HTTP/1.0 style: no length, not chunked, the body ends when the connection closes
    # (with cut_after: closes early, and nothing in HTTP can tell).
    close_delimited: bool = False
    headers: dict[str, str] = field(default_factory=dict)  # extra (Location, WWW-Authenticate)

    @property
    def size(self) -> int:
        return self.generated if self.generated is not None else len(self.data)

    def pieces(self) -> Iterator[bytes]:
        """The body as the writes that send it."""
        if self.generated is not None:
            step = self.piece or GENERATED_PIECE
            block = b"x" * step
            remaining = self.generated
            while remaining > 0:
                yield block if remaining >= step else block[:remaining]
                remaining -= step
        elif self.piece:
            for start in range(0, len(self.data), self.piece):
                yield self.data[start : start + self.piece]
        elif self.data:
            yield self.data


Answer = Body | list[Body]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@functools.cache
def generated_digest(size: int) -> str:
    """The digest of `size` bytes of b"x", hashed piecewise (never held whole)."""
    hasher = hashlib.sha256()
    block = b"x" * GENERATED_PIECE
    remaining = size
    while remaining > 0:
        hasher.update(block if remaining >= len(block) else block[:remaining])
        remaining -= len(block)
    return "sha256:" + hasher.hexdigest()


def _not_found() -> Body:
    error = {"errors": [{"code": "NOT_FOUND", "message": "not set in the fake upstream"}]}
    return Body(
        json.dumps(error).encode(), content_type="application/json", status=404, digest_header=False
    )


def _base() -> Body:
    """GET /v2/: the API version check every client makes first."""
    return Body(
        b"{}",
        content_type="application/json",
        digest_header=False,
        headers={"Docker-Distribution-API-Version": "registry/2.0"},
    )


@dataclass
class FakeUpstream:
    """A registry that answers what the test sets, and counts what it was asked.

    `routes` maps (method, path without query) to an answer; HEAD falls back to the GET entry
    (same headers, no body). A list of answers is taken one per request, the last repeating;
    the position is per route entry (a HEAD falling back to a GET list takes from it too) and
    starts over when a new list is put in place.
    """

    routes: dict[tuple[str, str], Answer] = field(
        default_factory=lambda: {("GET", "/v2/"): _base()}
    )
    default: Answer | None = None  # for anything not in routes; None: 404 with an OCI error
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    server: TestServer | None = None
    # The list position per route entry, and the connections in the middle of an answer.
    _taken: dict[object, tuple[list[Body], int]] = field(
        default_factory=dict, init=False, repr=False
    )
    _open: set[asyncio.BaseTransport] = field(default_factory=set, init=False, repr=False)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    async def close(self) -> None:
        # Hanging answers would hold the server's shutdown for its whole timeout: cut them.
        for transport in list(self._open):
            transport.close()
        if self.server is not None:
            await self.server.close()

    def set(self, method: str, path: str, body: Answer) -> None:
        self.routes[(method, path)] = body

    def count(self, method: str, fragment: str = "") -> int:
        return sum(1 for m, p, _ in self.requests if m == method and fragment in p)

    def _pick(self, method: str, path: str) -> Body:
        keys = [(method, path), ("GET", path)] if method == "HEAD" else [(method, path)]
        for key in keys:
            if key in self.routes:
                return self._next(key, self.routes[key])
        if self.default is not None:
            return self._next("default", self.default)
        return _not_found()

    def _next(self, key: object, answer: Answer) -> Body:
        if isinstance(answer, Body):
            return answer
        taken, position = self._taken.get(key, (answer, 0))
        if taken is not answer:  # a new list put in place: start it from its first answer
            position = 0
        self._taken[key] = (answer, position + 1)
        return answer[min(position, len(answer) - 1)]

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs, dict(request.headers)))
        body = self._pick(request.method, request.path)
        transport = request.transport
        assert transport is not None
        self._open.add(transport)
        try:
            return await self._send(request, body, transport)
        finally:
            self._open.discard(transport)

    async def _send(
        self, request: web.Request, body: Body, transport: asyncio.BaseTransport
    ) -> web.StreamResponse:
        if body.hang_before_headers:
            await _forever()
        if body.close_delimited:
            return await self._send_close_delimited(body, transport)
        response = web.StreamResponse(status=body.status, headers=body.headers)
        response.content_type = body.content_type
        if body.digest_header:
            response.headers["Docker-Content-Digest"] = await _digest(body)
        declared = body.declared_length if body.declared_length is not None else body.size
        if body.length_header:
            response.content_length = declared
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)  # sends the headers
        if request.method == "HEAD":
            await response.write_eof()
            return response
        if body.hang:
            await _forever()
        try:
            sent = await self._write_pieces(response, body, declared, transport)
        except ConnectionError:
            return response  # the client went away
        whole = body.cut_after is None and (not body.length_header or sent == declared)
        if whole:
            await response.write_eof()
        else:
            transport.close()  # cut, or the declared length was a lie
        return response

    async def _send_close_delimited(
        self, body: Body, transport: asyncio.BaseTransport
    ) -> web.StreamResponse:
        assert isinstance(transport, asyncio.WriteTransport)
        head = f"HTTP/1.1 {body.status} X\r\nContent-Type: {body.content_type}\r\n"
        for name, value in body.headers.items():
            head += f"{name}: {value}\r\n"
        if body.digest_header:
            head += f"Docker-Content-Digest: {await _digest(body)}\r\n"
        transport.write(f"{head}Connection: close\r\n\r\n".encode())
        data = body.data if body.cut_after is None else body.data[: body.cut_after]
        transport.write(data)
        transport.close()
        return web.Response()  # never sent: the connection is closed

    async def _write_pieces(
        self,
        response: web.StreamResponse,
        body: Body,
        declared: int,
        transport: asyncio.BaseTransport,
    ) -> int:
        """Write the body piece by piece, up to `cut_after`; return how many bytes went."""
        limit = body.cut_after
        sent = 0
        for number, chunk in enumerate(body.pieces()):
            if number and body.piece:
                await asyncio.sleep(body.pause)
            if limit is not None and sent + len(chunk) > limit:
                chunk = chunk[: limit - sent]
            # aiohttp drops bytes past the Content-Length it sent; a lie sends them anyway.
            room = len(chunk) if not body.length_header else max(0, declared - sent)
            if chunk[:room]:
                await response.write(chunk[:room])
            if chunk[room:]:
                assert isinstance(transport, asyncio.WriteTransport)
                transport.write(chunk[room:])
            sent += len(chunk)
            if limit is not None and sent >= limit:
                break
        return sent


async def _digest(body: Body) -> str:
    if body.claimed_digest is not None:
        return body.claimed_digest
    if body.generated is not None:
        return await asyncio.to_thread(generated_digest, body.generated)  # 1 GiB: off the loop
    return sha256_digest(body.data)


async def _forever() -> None:
    """Wait until the handler is cancelled (the connection closed)."""
    await asyncio.get_running_loop().create_future()


def manifest_of_size(size: int, *, index: bool = False) -> tuple[bytes, str]:
    """A valid OCI image manifest (or index) of exactly `size` bytes, and its media type.

    Large manifests are what make a mirror's buffering and limits matter; the index holds many
    platform entries plus attestation entries as buildx pushes them. The padding goes in an
    annotation, so the JSON parses and the size is exact.
    """
    pairs = max(1, min(size // 1000, 500)) if index else 0
    while True:
        document = _index(pairs) if index else _image()
        document["annotations"] = {"org.example.padding": ""}
        base = json.dumps(document, separators=(",", ":")).encode()
        if len(base) <= size:
            break
        if pairs <= 1:
            raise ValueError(f"a manifest cannot be as small as {size} bytes")
        pairs //= 2
    document["annotations"] = {"org.example.padding": "x" * (size - len(base))}
    data = json.dumps(document, separators=(",", ":")).encode()
    assert len(data) == size
    return data, OCI_INDEX if index else OCI_MANIFEST


def _fake_digest(label: str) -> str:
    return sha256_digest(label.encode())


def _image() -> dict[str, object]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": _fake_digest("config"), "size": 1234},
        "layers": [
            {"mediaType": OCI_LAYER, "digest": _fake_digest(f"layer {n}"), "size": 1000 * (n + 1)}
            for n in range(3)
        ],
    }


def _index(pairs: int) -> dict[str, object]:
    manifests: list[dict[str, object]] = []
    for n in range(pairs):
        image = _fake_digest(f"image {n}")
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": image,
                "size": 1000 + n,
                "platform": {"architecture": f"arch{n}", "os": "linux"},
            }
        )
        manifests.append(
            {
                "mediaType": OCI_MANIFEST,
                "digest": _fake_digest(f"attestation {n}"),
                "size": 800 + n,
                "annotations": {
                    "vnd.docker.reference.digest": image,
                    "vnd.docker.reference.type": "attestation-manifest",
                },
                "platform": {"architecture": "unknown", "os": "unknown"},
            }
        )
    return {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
