"""One middleware that counts every request in the metrics and writes its access line."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Counter

from ..access.gate import DECISION, IDENTITY
from ..errors import RESULT, Handler
from ..logs import printable
from ..metrics import Metrics
from ..routing import Route
from .handlers import BODY_SENT, ROUTE

log = logging.getLogger("mirror.access")

# Route names (see app.py) and the kind they count as.
KINDS = {"manifest": "manifest", "blob": "blob", "tags": "tags"}
FROM_CACHE = ("hit", "stale")
STATUS_CLASSES = [f"{n}xx" for n in range(10)]


class Observer:
    """Counts each answer in the metrics and writes its access line: for the middleware
    and for the server's fast path alike, so both are seen the same way."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # The counters' children by labels: looking one up in prometheus_client takes a
        # lock and more time than the rest of a cached answer's bookkeeping.
        self._counted: dict[tuple[str, str, str, str], Counter] = {}
        self._served = {
            source: metrics.served_bytes.labels(source) for source in ("cache", "upstream")
        }
        self._answered: dict[tuple[str, str], tuple[Counter, Counter]] = {}

    def count(
        self, kind: str, method: str, status: int, result: str, route: Route | None, sent: int
    ) -> None:
        labels = (kind, method, STATUS_CLASSES[status // 100], result)
        counter = self._counted.get(labels)
        if counter is None:
            counter = self._counted[labels] = self._metrics.requests.labels(*labels)
        counter.inc()
        if kind not in ("manifest", "blob") or status >= 400:
            return
        upstream = route.upstream.name if route is not None else ""
        if status < 300:
            source = "cache" if result in FROM_CACHE else "upstream"
            if sent:
                self._served[source].inc(sent)
            if route is not None:
                by_upstream = (upstream, source)
                children = self._answered.get(by_upstream)
                if children is None:
                    children = self._answered[by_upstream] = (
                        self._metrics.answers.labels(*by_upstream),
                        self._metrics.answered_bytes.labels(*by_upstream),
                    )
                children[0].inc()
                children[1].inc(sent)
        if route is not None:
            self._metrics.count_repository(upstream, route.repository)

    @staticmethod
    def logs_answers() -> bool:
        """Whether access lines are written (not below INFO): their fields are not worth
        gathering otherwise."""
        return log.isEnabledFor(logging.INFO)

    @staticmethod
    def log_line(
        answer: Answered, *, agent: str, identity: str | None = None, decision: str = ""
    ) -> None:
        """The access line (with access rules: who the client was, and what the rules
        made of it)."""
        audit = "" if identity is None else f" user={identity} access={decision}"
        log.info(
            '%s "%s %s" %d %d %.3fs %s %s%s%s',
            answer.remote,
            answer.method,
            answer.path,
            answer.status,
            answer.sent,
            answer.duration,
            answer.result,
            answer.upstream or "-",
            "" if answer.complete else " incomplete",
            audit,
            extra={
                "remote": answer.remote,
                "method": answer.method,
                "path": answer.path,
                "status": answer.status,
                "bytes": answer.sent,
                "complete": answer.complete,
                "duration": round(answer.duration, 6),
                "result": answer.result,
                "upstream": answer.upstream,
                "agent": agent,
                **({} if identity is None else {"user": identity, "access": decision}),
            },
        )


@dataclass(frozen=True)
class Answered:
    """One answer, as its access line tells it."""

    remote: str | None
    method: str
    path: str  # printable
    status: int
    sent: int
    duration: float
    result: str
    upstream: str
    complete: bool


def observe_middleware(observer: Observer) -> Middleware:
    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        response = await handler(request)
        if not response.prepared:
            # Sent here rather than after the middlewares, so the bytes and the time are
            # known when the request is counted and logged.
            with contextlib.suppress(ConnectionError):
                await response.prepare(request)
                await response.write_eof()
        route_name = request.match_info.route.name or ""
        kind = KINDS.get(route_name, "other")
        status = response.status
        result = request.get(RESULT, "error" if status >= 400 else "none")
        sent, complete = _bytes_sent(request, response)
        route = request.get(ROUTE)
        observer.count(kind, request.method, status, result, route, sent)
        if not observer.logs_answers():
            return response
        refused = request.get(DECISION, "").startswith("refused")
        if route_name not in ("metrics", "healthz", "readyz") or refused:
            answer = Answered(
                request.remote,
                request.method,
                printable(request.path),
                status,
                sent,
                time.monotonic() - started,
                result,
                route.upstream.name if route is not None else "",
                complete,
            )
            identity = request.get(IDENTITY)
            observer.log_line(
                answer,
                agent=request.headers.get("User-Agent", ""),
                identity=identity,
                decision=request.get(DECISION, ""),
            )
        return response

    return observe


def _bytes_sent(request: web.Request, response: web.StreamResponse) -> tuple[int, bool]:
    """Body bytes sent, and whether that was the whole body: a streamed or sendfile answer
    counts what it handed to the connection (the client may have left, or the transfer
    broken, before the end)."""
    if request.method == "HEAD":
        return 0, True
    if isinstance(response, web.Response):
        return (len(response.body) if isinstance(response.body, bytes) else 0), True
    sent = request.get(BODY_SENT, 0)
    promised = response.content_length
    return sent, promised is None or sent == promised
