"""Credentials for more kinds of registries: Basic-challenging registries (Harbor,
Artifactory and ECR answer Basic), Amazon ECR tokens from GetAuthorizationToken (against
moto's server on loopback, with renewal), and Azure's refresh-token exchange."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import bcrypt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MirrorFactory, RelayFactory
from tests.support.clients import skopeo_copy_to_dir
from tests.support.images import Pusher
from tests.support.process import MirrorProcess
from tests.support.registry import Registry, free_port
from tests.support.tokens import AAD_REFRESH_TOKEN, ACR_USER, TokenServer
from tests.support.waiting import until

ECR_PASSWORD = "123456789012-auth-token"  # what moto's GetAuthorizationToken hands out


def _htpasswd(path: Path, users: dict[str, str]) -> Path:
    path.write_text(
        "".join(
            f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
            for user, password in users.items()
        )
    )
    return path


@pytest.fixture(scope="module")
def basic_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Pusher]]:
    """docker-registry with `auth: htpasswd`: it challenges with Basic, as ECR does."""
    root = tmp_path_factory.mktemp("basic-upstream")
    users = {"robot": "robot-secret", "AWS": ECR_PASSWORD}
    registry = Registry(
        root,
        auth={
            "htpasswd": {"realm": "basic-realm", "path": str(_htpasswd(root / "htpasswd", users))}
        },
    )
    import base64

    header = "Basic " + base64.b64encode(b"robot:robot-secret").decode()
    yield registry, Pusher(registry.url, lambda scope: header)
    registry.stop()


async def _status(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as response:
        return response.status, await response.text(errors="replace")


async def test_basic_challenge_with_credentials(
    make_mirror: MirrorFactory,
    basic_upstream: tuple[Registry, Pusher],
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    registry, pusher = basic_upstream
    image = pusher.image("harbor/project", "1")
    mirror = await make_mirror(
        {"docker.io": {"url": registry.url, "username": "robot", "password": "robot-secret"}}
    )
    digest = await skopeo_copy_to_dir(f"{mirror.host}/harbor/project:1", tmp_path / "out")
    assert digest == image.digest
    anonymous = await make_mirror({"docker.io": registry.url})
    status, body = await _status(http, f"{anonymous.url}/v2/harbor/project/manifests/1")
    assert status == 502 and "refused authorization" in body
    wrong = await make_mirror(
        {"docker.io": {"url": registry.url, "username": "robot", "password": "nope"}}
    )
    status, body = await _status(http, f"{wrong.url}/v2/harbor/project/manifests/1")
    assert status == 502 and "docker.io" in body and "nope" not in body


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_takes_a_rotated_password_without_a_restart(
    basic_upstream: tuple[Registry, Pusher],
    tmp_path: Path,
    http: aiohttp.ClientSession,
    workers: int,
) -> None:
    """The secret in `password_file` is rotated (a Kubernetes secret, a vault agent):
    SIGHUP makes every worker log in with the new one; the server is not restarted."""
    registry, pusher = basic_upstream
    pusher.image("rotated/app", "1")
    secret = tmp_path / "secret"
    secret.write_text("the-old-one\n")
    upstream = {"url": registry.url, "username": "robot", "password_file": str(secret)}
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": workers,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": upstream},
        },
    ).start()
    try:
        url = f"{mirror.url}/v2/rotated/app/manifests/1"
        status, body = await _status(http, url)
        assert status == 502 and "the-old-one" not in body
        secret.write_text("robot-secret\n")
        os.kill(mirror.pid, signal.SIGHUP)
        log_lines = "SIGHUP: upstream logins renewed for docker.io"
        await until(
            lambda: mirror.log.read_text().count(log_lines) == workers, "every worker reloaded"
        )
        status, body = await _status(http, url)
        assert status == 200, body
    finally:
        await mirror.stop()


@pytest.fixture(scope="module")
def moto_server() -> Iterator[str]:
    """moto's AWS API server on an ephemeral loopback port."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _token_requests(text: str, outcome: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "mirror_upstream_token_requests_total"
                and sample.labels.get("outcome") == outcome
            ):
                return sample.value
    return 0.0


@pytest.mark.in_process  # counts in one process's metrics
async def test_ecr_tokens_from_get_authorization_token_renewed_without_failures(
    make_mirror: MirrorFactory,
    basic_upstream: tuple[Registry, Pusher],
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
    }.items():
        monkeypatch.setenv(name, value)
    registry, pusher = basic_upstream
    image = pusher.image("ecr/app", "1", layer_sizes=(100, 200, 300, 400))
    mirror = await make_mirror(
        {
            "docker.io": {
                "url": registry.url,
                "ecr": {"region": "us-east-1", "endpoint_url": moto_server},
            }
        },
        manifest_ttl=0,  # every manifest request revalidates upstream: credentials needed
    )
    # moto's tokens say they expired long ago: each is reused for the 5 s floor, so over
    # 7 s of steady requests the mirror renews at least once, and no request fails.
    statuses = []
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        for digest in image.blobs:
            statuses.append((await _status(http, f"{mirror.url}/v2/ecr/app/manifests/1"))[0])
            statuses.append((await _status(http, f"{mirror.url}/v2/ecr/app/blobs/{digest}"))[0])
        await asyncio.sleep(0.2)
    assert set(statuses) == {200}
    _, metrics = await _status(http, f"{mirror.url}/metrics")
    assert _token_requests(metrics, "granted") >= 2
    assert _token_requests(metrics, "failed") == 0
    assert ECR_PASSWORD not in metrics


async def test_ecr_without_aws_credentials_is_a_clean_error(
    make_mirror: MirrorFactory,
    basic_upstream: tuple[Registry, Pusher],
    monkeypatch: pytest.MonkeyPatch,
    http: aiohttp.ClientSession,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    registry, pusher = basic_upstream
    pusher.image("ecr/none", "1")
    mirror = await make_mirror(
        {
            "docker.io": {
                "url": registry.url,
                "ecr": {"region": "us-east-1", "endpoint_url": f"http://127.0.0.1:{free_port()}"},
            }
        }
    )
    status, body = await _status(http, f"{mirror.url}/v2/ecr/none/manifests/1")
    assert status == 502 and "GetAuthorizationToken" in body


@pytest.mark.in_process  # each worker process exchanges once
async def test_acr_refresh_token_exchange(
    make_mirror: MirrorFactory,
    auth_upstream: Registry,
    auth_pusher: Pusher,
    token_server: TokenServer,
    tmp_path: Path,
) -> None:
    image = auth_pusher.image("private/azure", "1")
    token_file = tmp_path / "aad-refresh-token"
    token_file.write_text(AAD_REFRESH_TOKEN + "\n")
    exchanges = len(token_server.exchanges)
    mirror = await make_mirror(
        {
            "docker.io": {
                "url": auth_upstream.url,
                "acr": {
                    "refresh_token_file": str(token_file),
                    "tenant": "contoso",
                    "exchange_url": f"{token_server.url}/oauth2/exchange",
                },
            }
        }
    )
    digest = await skopeo_copy_to_dir(f"{mirror.host}/private/azure:1", tmp_path / "out")
    assert digest == image.digest
    assert len(token_server.exchanges) == exchanges + 1  # one exchange for the whole pull
    form = token_server.exchanges[-1]
    assert form["grant_type"] == "refresh_token" and form["tenant"] == "contoso"
    assert (ACR_USER, "repository:private/azure:pull") in token_server.granted_scopes()


async def test_429_is_passed_on_with_retry_after(
    make_mirror: MirrorFactory,
    make_relay: RelayFactory,
    upstream: Registry,
    http: aiohttp.ClientSession,
) -> None:
    relay = await make_relay(upstream.url, status=429)
    mirror = await make_mirror({"docker.io": relay.url})
    async with http.get(f"{mirror.url}/v2/alpine/manifests/3.20") as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "17"
        assert (await response.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
