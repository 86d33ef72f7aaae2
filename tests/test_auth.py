"""Upstream auth as Docker Hub, GHCR and Quay do it: the Bearer token flow against a real
docker-registry behind `auth: token`, with a JWT-issuing token server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import jwt
import pytest

from tests.conftest import MirrorFactory, RelayFactory
from tests.support.clients import skopeo_copy_to_dir
from tests.support.clock import ManualClock
from tests.support.images import Pusher
from tests.support.registry import Registry
from tests.support.tokens import TokenServer

ALICE = {"username": "alice", "password": "wonderland"}


def _access(header: str) -> list[str]:
    """The repositories a Bearer token grants, read from its claims."""
    claims = jwt.decode(header.removeprefix("Bearer "), options={"verify_signature": False})
    return [entry["name"] for entry in claims["access"]]


async def test_private_repository_pulls_with_credentials(
    make_mirror: MirrorFactory,
    auth_upstream: Registry,
    auth_pusher: Pusher,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    image = auth_pusher.image("private/app", "1")
    mirror = await make_mirror({"docker.io": {"url": auth_upstream.url, **ALICE}})
    digest = await skopeo_copy_to_dir(f"{mirror.host}/private/app:1", tmp_path / "out")
    assert digest == image.digest
    assert ("alice", "repository:private/app:pull") in token_server.granted_scopes()


async def test_anonymous_public_pull_and_private_refused_cleanly(
    make_mirror: MirrorFactory,
    auth_upstream: Registry,
    auth_pusher: Pusher,
    tmp_path: Path,
) -> None:
    public = auth_pusher.image("public/app", "1")
    auth_pusher.image("private/secret", "1")
    mirror = await make_mirror({"docker.io": auth_upstream.url})
    digest = await skopeo_copy_to_dir(f"{mirror.host}/public/app:1", tmp_path / "out")
    assert digest == public.digest
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{mirror.url}/v2/private/secret/manifests/1") as response,
    ):
        assert response.status == 502
        error = (await response.json())["errors"][0]
        assert "docker.io" in error["message"]
        assert "repository:private/secret:pull" in error["message"]


async def test_wrong_credentials_are_a_clean_error(
    make_mirror: MirrorFactory, auth_upstream: Registry, auth_pusher: Pusher
) -> None:
    auth_pusher.image("public/wrongpass", "1")
    mirror = await make_mirror(
        {"docker.io": {"url": auth_upstream.url, "username": "alice", "password": "nope"}}
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{mirror.url}/v2/public/wrongpass/manifests/1") as response,
    ):
        assert response.status == 502
        body = await response.text()
    error = (await _json(body))["errors"][0]
    assert "refused" in error["message"] and "docker.io" in error["message"]
    assert "nope" not in body


async def _json(text: str) -> dict[str, list[dict[str, str]]]:
    import json

    return dict(json.loads(text))


@pytest.mark.in_process  # tokens are shared within one process
async def test_token_is_per_repository_and_shared_by_concurrent_requests(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    auth_upstream: Registry,
    auth_pusher: Pusher,
    token_server: TokenServer,
) -> None:
    first = auth_pusher.image("public/one", "1", layer_sizes=(1000, 2000, 3000, 4000))
    second = auth_pusher.image("public/two", "1")
    relay = await make_relay(auth_upstream.url)
    mirror = await make_mirror({"docker.io": {"url": relay.url, **ALICE}})
    before = token_server.requests
    async with aiohttp.ClientSession() as session:

        async def get(path: str) -> bytes:
            async with session.get(mirror.url + path) as response:
                assert response.status == 200
                return await response.read()

        bodies = await asyncio.gather(
            *(get(f"/v2/public/one/blobs/{d}") for d in first.blobs),
        )
        assert sorted(bodies) == sorted(first.blobs.values())
        assert token_server.requests - before == 1  # five requests, one token
        for digest in second.blobs:
            await get(f"/v2/public/two/blobs/{digest}")
    assert token_server.requests - before == 2
    for path, header in relay.authorizations:
        if header is None:
            continue  # the first request of each repository, before the challenge
        repository = path.removeprefix("/v2/").split("/blobs/")[0].split("/manifests/")[0]
        assert _access(header) == [repository]


@pytest.mark.in_process  # moves the mirror's clock
async def test_short_lived_tokens_are_renewed(
    make_mirror: MirrorFactory, tmp_path: Path, clock: ManualClock
) -> None:
    tokens = TokenServer(tmp_path, lifetime=30)
    registry = Registry(tmp_path / "registry", auth=tokens.registry_auth())
    try:
        image = Pusher(registry.url, tokens.admin_authorization).image(
            "public/renew", "1", layer_sizes=(100, 200, 300)
        )
        mirror = await make_mirror({"docker.io": registry.url}, clock=clock)
        blobs = list(image.blobs)
        async with aiohttp.ClientSession() as session:
            for index, digest in enumerate(blobs):
                if index:
                    clock.advance(23)  # past the renewal point (30 s less its margin, 7.5 s)
                async with session.get(f"{mirror.url}/v2/public/renew/blobs/{digest}") as r:
                    assert r.status == 200
                    assert await r.read() == image.blobs[digest]
        assert tokens.requests == len(blobs)
    finally:
        registry.stop()
        tokens.close()


async def test_credentials_are_not_sent_to_a_foreign_realm(
    make_mirror: MirrorFactory,
    auth_upstream: Registry,
    auth_pusher: Pusher,
    token_server: TokenServer,
) -> None:
    auth_pusher.image("public/foreign", "1")
    # The registry is reached as "localhost"; its realm is on 127.0.0.1: another host.
    url = auth_upstream.url.replace("127.0.0.1", "localhost")
    mirror = await make_mirror({"docker.io": {"url": url, **ALICE}})
    before = token_server.requests
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{mirror.url}/v2/public/foreign/manifests/1") as response,
    ):
        assert response.status == 502
        assert "auth_hosts" in (await response.json())["errors"][0]["message"]
    assert token_server.requests == before
    # named in auth_hosts, the same realm is trusted
    trusted = await make_mirror({"docker.io": {"url": url, **ALICE, "auth_hosts": ["127.0.0.1"]}})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{trusted.url}/v2/public/foreign/manifests/1") as response,
    ):
        assert response.status == 200


@pytest.mark.parametrize(
    ("registry", "realm", "allowed"),
    [
        ("https://registry-1.docker.io", "https://auth.docker.io/token", True),
        ("https://ghcr.io", "https://ghcr.io/token", True),
        ("https://quay.io", "https://quay.io/v2/auth", True),
        ("https://registry-1.docker.io", "https://evil.example/token", False),
        ("https://ghcr.io", "https://ghcr.io.evil.example/token", False),
        ("http://127.0.0.1:5000", "http://127.0.0.1:6000/token", True),
        ("http://127.0.0.1:5000", "http://127.0.0.2/token", False),
    ],
)
def test_realm_trust(registry: str, realm: str, allowed: bool) -> None:
    from mirror.upstream.auth import may_send_credentials

    assert may_send_credentials(registry, realm, ()) is allowed
