"""`create_app(config)`: the aiohttp application, its routes, and the lifetime of its state.

All state lives on the app (typed AppKeys); nothing is kept in module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from . import snapshots
from .access.gate import Gate
from .access.tokens import TokenSigner, signing_key
from .clock import Clock, system_clock
from .cluster.health import share_health
from .config import Config
from .core import Core
from .errors import Handler, error_middleware
from .hosted.registry import MANIFEST_MAX
from .http.fastpath import FAST_ANSWERS, FastAnswers
from .http.forwarded import forwarded_middleware
from .http.handlers import INERT_HEADERS, RegistryHandlers
from .http.observe import Observer, observe_middleware
from .http.push import PushHandlers
from .http.status import status_handler
from .images.warm import keep_warm
from .metrics import LiveState, Metrics, shared_folder
from .policy.proxy import Proxy
from .store.base import BlobStore
from .store.disk import DiskStore
from .store.tags import TagIndex
from .upstream.pool import Upstreams

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", Proxy)
STORE = web.AppKey("store", DiskStore)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
TAGS = web.AppKey("tags", TagIndex)
GATE = web.AppKey("gate", Gate)
CORE = web.AppKey("core", Core)
OBSERVER = web.AppKey("observer", Observer)

STOP_LIMIT = 10.0  # seconds the app's own clean-up may take at stop
USE_FLUSH_SECONDS = 1.0  # how often the housekeeping task looks whether uses are due


async def health(request: web.Request) -> web.Response:
    """The process is up."""
    return web.Response(text="ok\n")


async def ready(request: web.Request) -> web.Response:
    """The store is usable. Upstreams are reported, not required: a mirror with a cache is
    useful while they are down."""
    store, metrics = request.app[STORE], request.app[METRICS]
    state = store.state()
    upstreams = {
        name: {
            "reachable": metrics.upstream(name).reachable,
            "last_error": metrics.upstream(name).last_error,
            "retry_in": round(metrics.upstream(name).retry_in(), 1),
        }
        for name in request.app[CONFIG].upstreams
    }
    body: dict[str, object] = {"store": state, "upstreams": upstreams}
    cluster = request.app[CORE].cluster
    if cluster.shared is not None or cluster.tier is not None:
        # Reported, not required: replicas serve without either.
        body["cluster"] = {
            "redis": None if cluster.shared is None else cluster.shared.reachable,
            "s3": None if cluster.tier is None else cluster.tier.reachable,
        }
    return web.json_response(body, status=503 if state == "unavailable" else 200)


async def inert_content(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.update(INERT_HEADERS)


async def metrics_page(request: web.Request) -> web.Response:
    body = request.app[METRICS].render()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def _operations(gate: Gate, handler: Handler, *, ops_port: bool = False) -> Handler:
    """`handler` for whom access.operations allows (everyone, with no access configured)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        await gate.operations(request, ops_port=ops_port)
        return await handler(request)

    return guarded


def _forwarded(config: Config) -> list[Middleware]:
    """The middleware that reads a trusted proxy's X-Forwarded-For, where one is trusted."""
    return [forwarded_middleware(config.trusted_proxies)] if config.trusted_proxies else []


def _ops_app(app: web.Application, gate: Gate) -> web.Application:
    """The plain-HTTP operations port (ops_listen): health, readiness, metrics and the
    status page, so probes and Prometheus work whatever the main port serves."""
    config, metrics, store = app[CONFIG], app[METRICS], app[STORE]
    ops = web.Application(
        middlewares=[*_forwarded(config), observe_middleware(app[OBSERVER]), error_middleware]
    )
    ops[CONFIG], ops[METRICS], ops[STORE], ops[CORE] = config, metrics, store, app[CORE]
    ops.router.add_get("/healthz", health, name="healthz")
    ops.router.add_get("/readyz", ready, name="readyz")
    ops.router.add_get("/metrics", _operations(gate, metrics_page, ops_port=True), name="metrics")
    status = status_handler(config, metrics, store, app[TAGS])
    ops.router.add_get("/", _operations(gate, status, ops_port=True), name="status")
    ops.on_response_prepare.append(inert_content)
    return ops


async def _lifetime(app: web.Application) -> AsyncIterator[None]:
    housekeeping = asyncio.create_task(_housekeeping(app[STORE], app[METRICS]))
    config = app[CONFIG]
    sharing = None
    tier = app[CORE].cluster.tier
    starting = asyncio.create_task(tier.start()) if tier is not None else None
    shared = app[CORE].cluster.shared
    if shared is not None:
        sharing = asyncio.create_task(share_health(shared, app[UPSTREAMS].by_name))
    warming = None
    if config.warm is not None:
        warming = asyncio.create_task(keep_warm(app[CORE], config.warm))
    ops_runner = None
    if config.ops_listen is not None:
        ops_runner = web.AppRunner(_ops_app(app, app[GATE]), access_log=None)
        await ops_runner.setup()
        host, port = config.ops_listen
        await web.TCPSite(ops_runner, host, port, reuse_port=config.workers > 1).start()
    yield
    watchdog = _stop_watchdog(asyncio.get_running_loop())
    if ops_runner is not None:
        await ops_runner.cleanup()
    background = [task for task in (housekeeping, warming, sharing, starting) if task is not None]
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await app[CORE].close()
    watchdog.cancel()
    logging.getLogger("mirror").info("stopped: connections closed, the store and index flushed")


def _stop_watchdog(loop: asyncio.AbstractEventLoop) -> threading.Timer:
    """A stop that has not ended in STOP_LIMIT seconds ends the process anyway, saying
    what was still waiting: a server asked to stop always stops."""

    def overdue() -> None:
        log = logging.getLogger("mirror")
        with contextlib.suppress(Exception):  # (a look from another thread: best effort)
            for task in asyncio.all_tasks(loop):
                log.error("still waiting at stop: %r", task)
        log.error("stop took over %gs: exiting without finishing it", STOP_LIMIT)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(STOP_LIMIT, overdue)
    timer.daemon = True
    timer.start()
    return timer


async def _housekeeping(store: BlobStore, metrics: Metrics) -> None:
    """Now and then, in a thread: write the store's noted uses (for its LRU; a hit never
    waits for the index) and, with worker processes, this worker's snapshot for the
    status page."""
    folder = shared_folder()
    while True:
        await asyncio.sleep(USE_FLUSH_SECONDS)
        await asyncio.to_thread(store.flush_uses)
        if folder is not None:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(snapshots.write, folder, metrics)


async def create_app(
    config: Config, *, repair_store: bool = True, clock: Clock = system_clock
) -> web.Application:
    """Build the app for `config`; must run inside the event loop that will serve it.
    Worker processes pass repair_store=False: their parent repaired the store once. Tests
    pass a `clock` they move by hand (what has expired is decided by it)."""
    core = Core.open(config, repair_store=repair_store, clock=clock)
    metrics, store, tags, upstreams, proxy = (
        core.metrics,
        core.store,
        core.tags,
        core.upstreams,
        core.proxy,
    )
    observer = Observer(metrics)
    app = web.Application(
        middlewares=[*_forwarded(config), observe_middleware(observer), error_middleware],
        client_max_size=MANIFEST_MAX,  # a pushed manifest read whole (blobs are streamed)
    )
    metrics.live = LiveState(
        cache_bytes=store.usage,
        cache_bound=store.max_size,
        evictions=store.evictions,
        disk_full=lambda: store.counters.disk_full,
        transfers_in_flight=proxy.transfers_in_flight,
        waiting_clients=proxy.waiting_clients,
    )
    app[CORE] = core
    app[CONFIG] = config
    app[METRICS] = metrics
    app[STORE] = store
    app[TAGS] = tags
    app[UPSTREAMS] = upstreams
    app[PROXY] = proxy
    app[OBSERVER] = observer
    signer = None
    if config.access is not None:
        signer = TokenSigner(signing_key(config.storage.path / "access"), clock)
    gate = app[GATE] = Gate(config, metrics, clock, signer)
    app[FAST_ANSWERS] = FastAnswers(config, proxy, observer, gate)
    app.cleanup_ctx.append(_lifetime)
    app.on_response_prepare.append(inert_content)

    handlers = RegistryHandlers(config, proxy, gate, core.hosted)
    router = app.router
    if core.hosted is not None:
        push = PushHandlers(config, core.hosted, gate)
        uploads = "/v2/{name:.+}/blobs/uploads"
        router.add_post(uploads + "/", push.start_upload, name="upload")
        router.add_post(uploads, push.start_upload)
        router.add_get(uploads + "/{upload}", push.upload_status, name="upload-status")
        router.add_patch(uploads + "/{upload}", push.upload_chunk, name="upload-chunk")
        router.add_put(uploads + "/{upload}", push.finish_upload, name="upload-finish")
        router.add_delete(uploads + "/{upload}", push.cancel_upload, name="upload-cancel")
        router.add_put("/v2/{name:.+}/manifests/{reference}", push.put_manifest, name="push")
        router.add_delete(
            "/v2/{name:.+}/manifests/{reference}", push.delete_manifest, name="delete-manifest"
        )
        router.add_delete("/v2/{name:.+}/blobs/{digest}", push.delete_blob, name="delete-blob")
    router.add_get("/v2/", handlers.base, name="base")
    router.add_get("/v2/_catalog", handlers.catalog, name="catalog")
    router.add_get("/v2/{name:.+}/manifests/{reference}", handlers.manifest, name="manifest")
    router.add_get("/v2/{name:.+}/blobs/{digest}", handlers.blob, name="blob")
    router.add_get("/v2/{name:.+}/tags/list", handlers.tags, name="tags")
    router.add_get("/v2/{name:.+}/referrers/{digest}", handlers.referrers, name="referrers")
    router.add_route("*", "/v2/{tail:.*}", handlers.other, name="other")
    if config.access is not None:  # the token endpoint of the mirror's own clients
        router.add_get("/token", gate.token, name="token")
    router.add_get(
        "/", _operations(gate, status_handler(config, metrics, store, tags)), name="status"
    )
    router.add_get("/healthz", health, name="healthz")
    router.add_get("/readyz", ready, name="readyz")
    router.add_get("/metrics", _operations(gate, metrics_page), name="metrics")
    return app
