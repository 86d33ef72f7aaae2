"""Office networks: registries behind a private CA, registries that require a client
certificate, a lab registry with verification off, and the only way out a forward proxy
(Debian's tinyproxy), set per upstream or by HTTPS_PROXY / HTTP_PROXY / NO_PROXY."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.config import UpstreamConfig
from mirror.upstream.network import Network, bypasses, environment_warnings
from tests.conftest import MirrorFactory, Seeded
from tests.support.clients import skopeo_copy_to_dir
from tests.support.pki import Pki, make_pki
from tests.support.registry import Registry, free_port

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tls_registry(root: Path, seeded_root: Path, pki: Pki, *, client_ca: bool) -> Registry:
    """A TLS registry serving the seeded upstream's content (a copy of its storage)."""
    shutil.copytree(seeded_root / "data", root / "data")
    tls: dict[str, Any] = {"certificate": str(pki.server_cert), "key": str(pki.server_key)}
    probe = ssl.create_default_context(cafile=str(pki.ca))
    if client_ca:
        tls["clientcas"] = [str(pki.ca)]
        probe.load_cert_chain(pki.client_cert, pki.client_key)
    return Registry(root, tls=tls, probe=probe)


@pytest.fixture(scope="module")
def tls_upstreams(
    tmp_path_factory: pytest.TempPathFactory, upstream: Registry, seeded: Seeded, pki: Pki
) -> Iterator[tuple[Registry, Registry]]:
    """(private CA, private CA and client certificates required)."""
    plain = _tls_registry(tmp_path_factory.mktemp("tls"), upstream.root, pki, client_ca=False)
    mutual = _tls_registry(tmp_path_factory.mktemp("mtls"), upstream.root, pki, client_ca=True)
    yield plain, mutual
    plain.stop()
    mutual.stop()


async def _pull(http: aiohttp.ClientSession, mirror_url: str, seeded: Seeded) -> tuple[int, str]:
    """A manifest and its first layer through the mirror: the worst status, and why."""
    image = seeded.oci
    async with http.get(f"{mirror_url}/v2/library/alpine/manifests/3.20", headers=ACCEPT) as r:
        body = await r.read()
        if r.status != 200:
            return r.status, body.decode()
        assert body == image.manifest
    layer = image.layers[0]
    async with http.get(f"{mirror_url}/v2/library/alpine/blobs/{layer}") as r:
        data = await r.read()
        assert r.status == 200 and "sha256:" + hashlib.sha256(data).hexdigest() == layer
    return 200, ""


async def test_a_registry_behind_a_private_ca(
    make_mirror: MirrorFactory,
    tls_upstreams: tuple[Registry, Registry],
    pki: Pki,
    seeded: Seeded,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    registry, _ = tls_upstreams
    untrusting = await make_mirror({"docker.io": registry.url})
    status, why = await _pull(http, untrusting.url, seeded)
    assert status == 502 and "TLS certificate is not trusted" in why
    trusting = await make_mirror({"docker.io": {"url": registry.url, "ca_file": str(pki.ca)}})
    assert await _pull(http, trusting.url, seeded) == (200, "")
    # and a real client, pulling a whole image through the mirror
    target = tmp_path / "pulled"
    assert await skopeo_copy_to_dir(f"{trusting.host}/team/app:v1", target) == seeded.docker.digest


async def test_a_registry_that_requires_a_client_certificate(
    make_mirror: MirrorFactory,
    tls_upstreams: tuple[Registry, Registry],
    pki: Pki,
    seeded: Seeded,
    http: aiohttp.ClientSession,
) -> None:
    _, registry = tls_upstreams
    without = await make_mirror({"docker.io": {"url": registry.url, "ca_file": str(pki.ca)}})
    status, why = await _pull(http, without.url, seeded)
    assert status == 502 and "client certificate" in why, why
    mutual = {
        "url": registry.url,
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client_cert),
        "key_file": str(pki.client_key),
    }
    with_certificate = await make_mirror({"docker.io": mutual})
    assert await _pull(http, with_certificate.url, seeded) == (200, "")


@pytest.mark.in_process  # reads this process's log
async def test_a_lab_registry_with_verification_off_is_loud(
    make_mirror: MirrorFactory,
    tls_upstreams: tuple[Registry, Registry],
    seeded: Seeded,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry, _ = tls_upstreams
    mirror = await make_mirror({"docker.io": {"url": registry.url, "tls_verify": False}})
    assert await _pull(http, mirror.url, seeded) == (200, "")
    assert any("tls_verify is false" in r.getMessage() for r in caplog.records)


@dataclass
class Tinyproxy:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def requests(self) -> str:
        time.sleep(0.2)  # it writes its log just after the request
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def _tinyproxy(root: Path, settings: str = "") -> Iterator[Tinyproxy]:
    """Debian's tinyproxy on an ephemeral port, with extra `settings` lines."""
    binary = shutil.which("tinyproxy")
    assert binary, "tinyproxy is installed by scripts/test"
    port = free_port()
    log = root / "tinyproxy.log"
    config = root / "tinyproxy.conf"
    config.write_text(
        f'Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\nLogFile "{log}"\n'
        f"LogLevel Connect\nMaxClients 50\nDisableViaHeader Yes\n{settings}"
    )
    process = subprocess.Popen(
        [binary, "-d", "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert time.monotonic() < deadline, "tinyproxy did not start"
            time.sleep(0.05)
    try:
        yield Tinyproxy(f"http://127.0.0.1:{port}", log, process)
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    with _tinyproxy(tmp_path) as proxy:
        yield proxy


async def test_an_upstream_through_its_own_proxy(
    make_mirror: MirrorFactory,
    upstream: Registry,
    tinyproxy: Tinyproxy,
    seeded: Seeded,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    mirror = await make_mirror({"docker.io": {"url": upstream.url, "proxy": tinyproxy.url}})
    assert await _pull(http, mirror.url, seeded) == (200, "")
    target = tmp_path / "pulled"
    assert await skopeo_copy_to_dir(f"{mirror.host}/team/app:v1", target) == seeded.docker.digest
    seen = tinyproxy.requests()
    assert f"{upstream.url}/v2/library/alpine/manifests/3.20" in seen
    assert f"/v2/library/alpine/blobs/{seeded.oci.layers[0]}" in seen


@pytest.mark.in_process  # sets this process's environment for the mirror it starts
async def test_https_proxy_from_the_environment_and_no_proxy(
    make_mirror: MirrorFactory,
    tls_upstreams: tuple[Registry, Registry],
    pki: Pki,
    upstream: Registry,
    tinyproxy: Tinyproxy,
    seeded: Seeded,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry, _ = tls_upstreams
    monkeypatch.setenv("HTTPS_PROXY", tinyproxy.url)
    monkeypatch.setenv("HTTP_PROXY", tinyproxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    through = await make_mirror({"docker.io": {"url": registry.url, "ca_file": str(pki.ca)}})
    assert await _pull(http, through.url, seeded) == (200, "")
    assert f"CONNECT 127.0.0.1:{registry.port}" in tinyproxy.requests()  # TLS, tunnelled
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    before = tinyproxy.requests().count("/v2/")
    bypassing = await make_mirror({"docker.io": upstream.url})
    assert await _pull(http, bypassing.url, seeded) == (200, "")
    assert tinyproxy.requests().count("/v2/") == before  # NO_PROXY: straight there


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("*", "ghcr.io", 443, True),
        (".corp.example", "registry.corp.example", 443, True),
        ("*.corp.example", "registry.corp.example", 443, True),
        ("corp.example", "registry.corp.example", 443, True),
        ("corp.example", "notcorp.example", 443, False),
        ("registry.corp.", "REGISTRY.CORP", 5000, True),
        ("registry.corp:5000", "registry.corp", 5000, True),
        ("registry.corp:5000", "registry.corp", 443, False),
        ("10.0.0.0/8, 127.0.0.0/8", "127.0.0.1", 5000, True),
        ("10.0.0.0/8", "192.168.1.1", 5000, False),
        ("127.0.0.1:51093", "127.0.0.1", 51093, True),
        ("[::1]", "::1", 443, True),
        ("fd00::/8", "fd12::1", 443, True),
        ("", "ghcr.io", 443, False),
    ],
)
def test_no_proxy_is_read_as_curl_reads_it(
    no_proxy: str, host: str, port: int, bypass: bool
) -> None:
    assert bypasses(no_proxy, host, port) is bypass


Through = Callable[[str], list[dict[str, str]]]


@pytest.fixture
def through(upstream: Registry, tls_upstreams: tuple[Registry, Registry], pki: Pki) -> Through:
    """An upstream's settings through a proxy URL: plain HTTP, and TLS (a CONNECT)."""
    registry, _ = tls_upstreams

    def settings(proxy: str) -> list[dict[str, str]]:
        return [
            {"url": upstream.url, "proxy": proxy},
            {"url": registry.url, "ca_file": str(pki.ca), "proxy": proxy},
        ]

    return settings


async def test_a_proxy_that_wants_credentials_is_named_as_the_cause(
    make_mirror: MirrorFactory,
    upstream: Registry,
    through: Through,
    seeded: Seeded,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """tinyproxy with BasicAuth answers 407: the error says the proxy wants credentials
    (plain HTTP and CONNECT alike), never that the registry refused; with them in the
    proxy's URL the pull goes through."""
    with _tinyproxy(tmp_path, "BasicAuth ci s3cret\n") as proxy:
        for settings in through(proxy.url):
            mirror = await make_mirror({"docker.io": settings})
            status, body = await _pull(http, mirror.url, seeded)
            error = json.loads(body)["errors"][0]
            assert status == 502, body
            assert "the proxy wants credentials (status 407)" in error["message"], body
            assert "s3cret" not in body
        wrong = proxy.url.replace("http://", "http://ci:guess@")
        mirror = await make_mirror({"docker.io": {"url": upstream.url, "proxy": wrong}})
        status, body = await _pull(http, mirror.url, seeded)
        error = json.loads(body)["errors"][0]
        assert status == 502 and "the proxy refused its credentials" in error["message"], body
        assert "guess" not in body
        async with http.get(f"{mirror.url}/readyz") as response:
            state = (await response.json())["upstreams"]["docker.io"]
        assert state["reachable"] is False and "proxy refused" in state["last_error"]
        with_credentials = proxy.url.replace("http://", "http://ci:s3cret@")
        mirror = await make_mirror({"docker.io": {"url": upstream.url, "proxy": with_credentials}})
        assert await _pull(http, mirror.url, seeded) == (200, "")


async def test_a_proxy_that_is_down_is_named_by_its_address(
    make_mirror: MirrorFactory, through: Through, seeded: Seeded, http: aiohttp.ClientSession
) -> None:
    """Nothing listens at the proxy's port: the error says the proxy (at which address) is
    unreachable, plain HTTP and CONNECT alike, and keeps its credentials out."""
    port = free_port()
    for settings in through(f"http://ci:s3cret@127.0.0.1:{port}"):
        mirror = await make_mirror({"docker.io": settings})
        status, body = await _pull(http, mirror.url, seeded)
        error = json.loads(body)["errors"][0]
        assert status == 502, body
        assert f"the proxy 127.0.0.1:{port} is unreachable" in error["message"], body
        assert "s3cret" not in body
        async with http.get(f"{mirror.url}/readyz") as response:
            state = (await response.json())["upstreams"]["docker.io"]
        assert f"the proxy 127.0.0.1:{port} is unreachable" in state["last_error"]


def test_no_proxy_host_port_matches_a_url_without_its_port_and_bad_proxies_are_named() -> None:
    upstream = UpstreamConfig(name="corp", url="https://registry.corp")
    environ = {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": "registry.corp:443"}
    network = Network(upstream, environ)
    assert network.proxy_for("https://registry.corp/v2/") is None  # 443: the default port
    assert network.proxy_for("https://registry.corp:5000/v2/") == "http://proxy:3128"
    warnings = environment_warnings({"HTTP_PROXY": "socks5://carol:pw1@proxy:1080"})
    assert len(warnings) == 1 and warnings[0].startswith("HTTP_PROXY is set but is not")
    assert "pw1" not in warnings[0] and "socks5" not in warnings[0]
    assert environment_warnings({"HTTPS_PROXY": "proxy:3128"}) == []
