"""One middleware that counts every request in the metrics and writes its access line."""

from __future__ import annotations

import contextlib
import logging
import time

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Counter

from ..access.gate import DECISION, IDENTITY
from ..errors import RESULT, Handler
from ..logs import printable
from ..metrics import Metrics
from .handlers import BODY_SENT, ROUTE

log = logging.getLogger("mirror.access")

# Route names (see app.py) and the kind they count as.
KINDS = {"manifest": "manifest", "blob": "blob", "tags": "tags"}
FROM_CACHE = ("hit", "stale")
STATUS_CLASSES = [f"{n}xx" for n in range(10)]


def observe_middleware(metrics: Metrics) -> Middleware:
    # The counters' children by labels: looking one up in prometheus_client takes a lock
    # and more time than the rest of a cached answer's bookkeeping.
    counted: dict[tuple[str, str, str, str], Counter] = {}
    served = {source: metrics.served_bytes.labels(source) for source in ("cache", "upstream")}
    answered: dict[tuple[str, str], tuple[Counter, Counter]] = {}

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
        labels = (kind, request.method, STATUS_CLASSES[status // 100], result)
        counter = counted.get(labels)
        if counter is None:
            counter = counted[labels] = metrics.requests.labels(*labels)
        counter.inc()
        sent, complete = _bytes_sent(request, response)
        route = request.get(ROUTE)
        upstream = route.upstream.name if route is not None else ""
        if kind in ("manifest", "blob") and status < 300:
            source = "cache" if result in FROM_CACHE else "upstream"
            if sent:
                served[source].inc(sent)
            if route is not None:
                by_upstream = (upstream, source)
                children = answered.get(by_upstream)
                if children is None:
                    children = answered[by_upstream] = (
                        metrics.answers.labels(*by_upstream),
                        metrics.answered_bytes.labels(*by_upstream),
                    )
                children[0].inc()
                children[1].inc(sent)
        if route is not None and kind in ("manifest", "blob") and status < 400:
            metrics.count_repository(upstream, route.repository)
        if not log.isEnabledFor(logging.INFO):
            return response
        refused = request.get(DECISION, "").startswith("refused")
        if route_name not in ("metrics", "healthz", "readyz") or refused:
            duration = time.monotonic() - started
            # With access rules: who the client was, and what the rules made of it.
            identity = request.get(IDENTITY)
            audit = "" if identity is None else f" user={identity} access={request[DECISION]}"
            log.info(
                '%s "%s %s" %d %d %.3fs %s %s%s%s',
                request.remote,
                request.method,
                printable(request.path),
                status,
                sent,
                duration,
                result,
                upstream or "-",
                "" if complete else " incomplete",
                audit,
                extra={
                    "remote": request.remote,
                    "method": request.method,
                    "path": printable(request.path),
                    "status": status,
                    "bytes": sent,
                    "complete": complete,
                    "duration": round(duration, 6),
                    "result": result,
                    "upstream": upstream,
                    "agent": request.headers.get("User-Agent", ""),
                    **({} if identity is None else {"user": identity, "access": request[DECISION]}),
                },
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
