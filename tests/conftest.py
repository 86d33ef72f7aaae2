"""Shared fixtures: real upstream registries (plain and behind token auth), seeded once per
session with images the tests make, and mirrors built on the app under test."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mirror.app import create_app
from mirror.clock import system_clock
from mirror.config import from_mapping
from mirror.http.server import Serving
from tests.support.clock import ManualClock
from tests.support.fake_upstream import FakeUpstream
from tests.support.images import Image, Pusher
from tests.support.process import MirrorProcess
from tests.support.registry import Registry
from tests.support.relay import Faults, Relay
from tests.support.tokens import TokenServer

BIG_LAYER = 100 * 1024 * 1024


@dataclass
class Seeded:
    """What the plain upstream holds, made once per session."""

    oci: Image  # library/alpine:3.20 (a one-part Docker Hub name once routed)
    docker: Image  # team/app:v1, Docker schema2
    index: Image  # multi/arch:latest, an OCI index of two platforms
    big: Image  # big/layer:1, one layer of 100 MB


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("upstream"))
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def seeded(upstream: Registry) -> Seeded:
    pusher = Pusher(upstream.url)
    return Seeded(
        oci=pusher.image("library/alpine", "3.20"),
        docker=pusher.image("team/app", "v1", docker=True),
        index=pusher.index("multi/arch", "latest"),
        big=pusher.image("big/layer", "1", layer_sizes=(BIG_LAYER,)),
    )


@pytest.fixture(scope="session")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    server = TokenServer(tmp_path_factory.mktemp("tokens"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def auth_upstream(
    tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer
) -> Iterator[Registry]:
    registry = Registry(tmp_path_factory.mktemp("auth-upstream"), auth=token_server.registry_auth())
    yield registry
    registry.stop()


@pytest.fixture(scope="session")
def auth_pusher(auth_upstream: Registry, token_server: TokenServer) -> Pusher:
    return Pusher(auth_upstream.url, token_server.admin_authorization)


# MIRROR_TEST_WORKERS=N runs every mirror of the HTTP-level tests as a real `mirror serve`
# process with `workers: N`; tests that look inside the app are marked in_process.
TEST_WORKERS = int(os.environ.get("MIRROR_TEST_WORKERS", "0"))


@dataclass
class Mirror:
    host: str
    storage: Path
    server: Serving | None = None
    process: MirrorProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def app(self) -> web.Application:
        assert self.server is not None, "an in_process test: this mirror runs in a process"
        return self.server.app

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()
        if self.process is not None:
            await self.process.stop()


MirrorFactory = Callable[..., Awaitable[Mirror]]


@pytest.fixture
async def make_mirror(tmp_path: Path) -> AsyncIterator[MirrorFactory]:
    """Start mirrors (real TCP servers on ephemeral loopback ports) over given upstreams:
    in this process, or as `mirror serve` processes when MIRROR_TEST_WORKERS is set."""
    mirrors: list[Mirror] = []

    async def factory(
        upstreams: dict[str, Any],
        storage: Path | None = None,
        max_size: int | str = "10GiB",
        clock: ManualClock | None = None,
        storage_settings: dict[str, Any] | None = None,
        **settings: Any,
    ) -> Mirror:
        storage = storage or tmp_path / f"cache{len(mirrors)}"
        raw = {
            "storage": {"path": str(storage), "max_size": max_size, **(storage_settings or {})},
            "default_upstream": "docker.io",
            "upstreams": {
                name: value if isinstance(value, dict) else {"url": value}
                for name, value in upstreams.items()
            },
            **settings,
        }
        if TEST_WORKERS:
            assert clock is None, "a test that moves the clock looks inside: mark it in_process"
            process = await MirrorProcess(tmp_path, {"workers": TEST_WORKERS, **raw}).start()
            mirror = Mirror(process.host, storage, process=process)
        else:
            config = from_mapping({"listen": "127.0.0.1:0", **raw}, env={})
            app = await create_app(config, clock=clock or system_clock)
            # Served as `mirror serve` serves it (the fast path included).
            server = await Serving.start(app, "127.0.0.1", 0)
            mirror = Mirror(f"127.0.0.1:{server.port}", storage, server=server)
        mirrors.append(mirror)
        return mirror

    yield factory
    for mirror in mirrors:
        await mirror.stop()


@pytest.fixture
async def mirror(make_mirror: MirrorFactory, upstream: Registry) -> Mirror:
    """A mirror with the plain registry as docker.io (the default) and as ghcr.io."""
    return await make_mirror({"docker.io": upstream.url, "ghcr.io": upstream.url})


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the test's own requests."""
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def make_relay() -> AsyncIterator[RelayFactory]:
    """Start fault-injecting relays in front of a registry; closed after the test."""
    relays: list[Relay] = []

    async def factory(target: str, **faults: Any) -> Relay:
        relay = await Relay(target, Faults(**faults)).start()
        relays.append(relay)
        return relay

    yield factory
    for relay in relays:
        await relay.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    """A scripted upstream that misbehaves as the test says (beside the real registry)."""
    server = await FakeUpstream().start()
    yield server
    await server.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount small tmpfs file systems (real ENOSPC, for SQLite too); unmounted after."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounts)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"mounting a tmpfs needs root: {result.stderr}"
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.fixture
def clock() -> ManualClock:
    """Time for what expires, moved by the test (pass it to make_mirror)."""
    return ManualClock()
