"""Cached manifests answered from a request's raw head, before aiohttp parses it.

The hot request of a fleet is a manifest the mirror can answer from memory alone: a tag
trusted for its TTL, a manifest by digest held here. aiohttp's request machinery (parsing
into a request object, routing, the middlewares, a response object) costs more than the
answer itself, so such a request is answered here, from its head's bytes. The decision is
the policy's own (`Proxy.manifest_at_hand`, what the handler answers in that case); the
headers are the handler's (`manifest_headers`); it is counted and logged by the same
`Observer` as any request. Anything else, or anything unusual about the request, is
declined (None) and aiohttp answers it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from ..access.gate import ALLOWED, ANONYMOUS, Gate
from ..config import Config
from ..errors import RegistryError
from ..policy.answers import Manifest
from ..policy.proxy import Proxy
from ..reference import is_valid_tag, looks_like_digest, parse_digest
from ..routing import Route, resolve
from .forwarded import client_address
from .handlers import API_HEADERS, INERT_HEADERS, PING, manifest_headers
from .observe import Answered, Observer

# `GET|HEAD /v2/<name>/manifests/<reference> HTTP/1.1`, in the characters names, upstream
# names, tags and digests are made of (a percent-encoding, a query or any other character
# goes to aiohttp). The reference has no '/': the last `/manifests/` splits, as aiohttp's
# route does.
REQUEST_LINE = re.compile(
    rb"(GET|HEAD) (/v2/([-a-z0-9._/:]+)/manifests/([A-Za-z0-9_.:+=-]+)) HTTP/1\.1"
)
# The API check dockerd and podman open each connection with: answered here (without
# access rules), so the manifests asked next on the connection are too.
PING_LINE = re.compile(rb"(GET|HEAD) /v2/ HTTP/1\.1")
PING_BODY = b"{}"
# Fields as RFC 9110 writes them, in lines ending in CRLF: a token, a colon, a value of
# visible characters, spaces, tabs and obs-text (no other control byte, no bare CR or LF).
FIELDS = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*)*"
)
MAX_FIELDS = 100  # more is aiohttp's to judge
# Fields that change what the answer would be, or ask for more than an answer: aiohttp's.
# (aiohttp closes after an answer to `Proxy-Connection: close` as to `Connection: close`.)
DECLINED_FIELDS = frozenset(
    (
        b"if-none-match",
        b"content-length",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"proxy-connection",
    )
)
# With access rules, credentials are the gate's to check.
DECLINED_WITH_ACCESS = DECLINED_FIELDS | {b"authorization"}
HEADS_KEPT = 4096  # request heads read, and answers' status lines and fields, kept
HEAD_KEPT = 1024  # bytes of a request head kept as read


@dataclass(frozen=True)
class Request:
    """What a request head asks of the fast path."""

    method: str
    path: str
    route: Route
    reference: str
    accept: str  # every Accept field, joined (clients may send one per media type)
    agent: str
    close: bool  # Connection: close
    forwarded_for: str  # X-Forwarded-For ("": none)

    @property
    def head(self) -> bool:
        return self.method == "HEAD"


@dataclass(frozen=True)
class Ping:
    """What a `GET|HEAD /v2/` head asks of the fast path."""

    method: str
    agent: str
    close: bool
    forwarded_for: str


UNREAD = object()


def _read(config: Config, head: bytes) -> Request | Ping | None:
    """The request in `head`, when it is one for the fast path: anything aiohttp might read
    otherwise, or refuse (a control byte, a bare CR or LF, a field twice, no Host, too
    many fields), is declined, so both paths always agree on where a request ends."""
    line_end = head.find(b"\r\n")
    if line_end < 0:
        return None  # (no Host)
    request = REQUEST_LINE.fullmatch(head, 0, line_end)
    ping = None if request else PING_LINE.fullmatch(head, 0, line_end)
    if ping is not None and config.access is not None:
        return None  # (the gate's to challenge or admit)
    if (request is None and ping is None) or FIELDS.fullmatch(head, line_end + 2) is None:
        return None
    declined = DECLINED_FIELDS if config.access is None else DECLINED_WITH_ACCESS
    fields: dict[bytes, bytes] = {}
    accept: list[str] = []
    for field in head[line_end + 2 :].split(b"\r\n"):
        name, _, value = field.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"accept":
            accept.append(value.decode("utf-8", "surrogateescape"))
        elif name in fields or name in declined:
            return None
        fields[name] = value
    if b"host" not in fields or len(fields) + len(accept) > MAX_FIELDS:
        return None
    options = {option.strip().lower() for option in fields.get(b"connection", b"").split(b",")}
    if b"upgrade" in options:
        return None
    agent = fields.get(b"user-agent", b"").decode("utf-8", "surrogateescape")
    forwarded_for = fields.get(b"x-forwarded-for", b"").decode("latin-1")
    close = b"close" in options
    if request is None:
        assert ping is not None
        return Ping(ping[1].decode(), agent, close, forwarded_for)
    reference = request[4].decode()
    try:
        route = resolve(config, request[3].decode(), None)
    except RegistryError:
        return None
    if route.upstream.hosted:
        return None
    if looks_like_digest(reference):
        if parse_digest(reference) is None:
            return None
    elif not is_valid_tag(reference):
        return None
    method = request[1].decode()
    return Request(
        method,
        request[2].decode(),
        route,
        reference,
        ", ".join(accept),
        agent,
        close,
        forwarded_for,
    )


class FastAnswers:
    """Answers the requests memory alone can answer, from their raw heads."""

    def __init__(self, config: Config, proxy: Proxy, observer: Observer, gate: Gate) -> None:
        self._config = config
        self._proxy = proxy
        self._observer = observer
        self._gate = gate
        self._gated = config.access is not None  # (the access line then says who and how)
        # What each request head asks (None: not for the fast path): a function of the
        # head and the config alone.
        self._requests: dict[bytes, Request | Ping | None] = {}
        # What precedes the Date field, by (digest, type, source, size, GET or HEAD).
        self._heads: dict[tuple[str, str, str, int, bool], bytes] = {}
        self._second = 0
        self._date = b""
        self._pong_head = _ok_head(
            {
                **API_HEADERS,
                "Content-Type": "application/json; charset=utf-8",
                **INERT_HEADERS,
                "Content-Length": str(len(PING_BODY)),
            }
        )

    def answer(self, head: bytes, remote: str | None) -> tuple[bytes, bool] | None:
        """The whole response to the request whose head (up to its blank line) is `head`,
        and whether the connection then closes; None: aiohttp's to answer."""
        started = time.monotonic()
        request = self._requests.get(head, UNREAD)
        if request is UNREAD:
            request = _read(self._config, head)
            if len(head) <= HEAD_KEPT:  # (clients send the same few heads again and again)
                if len(self._requests) >= HEADS_KEPT:
                    self._requests.clear()
                self._requests[head] = request
        if request is None:
            return None
        assert isinstance(request, Request | Ping)
        if request.forwarded_for:
            remote = client_address(remote, request.forwarded_for, self._config.trusted_proxies)
        if isinstance(request, Ping):
            return self._pong(request, remote, started), request.close
        if self._gated and not self._gate.lets_anyone_pull(request.route, remote):
            return None  # (the gate's challenge or refusal, from aiohttp)
        answer = self._proxy.manifest_at_hand(
            request.route, request.reference, request.accept, head=request.head
        )
        if answer is None:
            return None
        response = self._response(answer, request.head, request.close)
        sent = 0 if answer.data is None else answer.size
        self._observer.count("manifest", request.method, 200, answer.source, request.route, sent)
        if self._observer.logs_answers():
            line = Answered(
                remote,
                request.method,
                request.path,
                200,
                sent,
                time.monotonic() - started,
                answer.source,
                request.route.upstream.name,
                True,
            )
            if self._gated:
                self._observer.log_line(
                    line, agent=request.agent, identity=ANONYMOUS, decision=ALLOWED
                )
            else:
                self._observer.log_line(line, agent=request.agent)
        return response, request.close

    def _pong(self, ping: Ping, remote: str | None, started: float) -> bytes:
        """The handler's answer to the API check, counted and logged as it would be."""
        head = ping.method == "HEAD"
        sent = 0 if head else len(PING_BODY)
        self._observer.count("other", ping.method, 200, PING, None, sent)
        if self._observer.logs_answers():
            line = Answered(
                remote, ping.method, "/v2/", 200, sent, time.monotonic() - started, PING, "", True
            )
            self._observer.log_line(line, agent=ping.agent)
        return self._whole(self._pong_head, ping.close, b"" if head else PING_BODY)

    def _response(self, answer: Manifest, head: bool, close: bool) -> bytes:
        key = (answer.digest, answer.media_type, answer.source, answer.size, head)
        prepared = self._heads.get(key)
        if prepared is None:
            if len(self._heads) >= HEADS_KEPT:
                self._heads.clear()
            prepared = self._heads[key] = _ok_head(
                {
                    **manifest_headers(answer),
                    **INERT_HEADERS,
                    "Content-Length": str(answer.size),
                }
            )
        return self._whole(prepared, close, answer.data or b"")

    def _whole(self, prepared: bytes, close: bool, body: bytes) -> bytes:
        """A prepared head with its Date (made once a second), the end of the head, the
        body."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._date = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        end = b"Connection: close\r\n\r\n" if close else b"\r\n"
        return b"".join((prepared, self._date, end, body))


def _ok_head(fields: dict[str, str]) -> bytes:
    """A 200's status line and `fields` (and Server, as aiohttp sends it), up to Date."""
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"HTTP/1.1 200 OK\r\n{lines}Server: {SERVER_SOFTWARE}\r\n".encode()


FAST_ANSWERS = web.AppKey("fast_answers", FastAnswers)
