"""`mirror serve --config FILE` as a real process, as users run it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from mirror.cli import SHUTDOWN_WAIT
from mirror.config import usable_cores
from tests.conftest import Seeded
from tests.support.clients import skopeo_copy_to_dir
from tests.support.images import Pusher, padded_manifest
from tests.support.process import MIRROR, MirrorProcess
from tests.support.registry import Registry
from tests.support.waiting import until


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
async def served(
    tmp_path: Path, upstream: Registry, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    mirror = MirrorProcess(
        tmp_path,
        {
            "workers": request.param,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": upstream.url}},
        },
    )
    await mirror.start()
    yield mirror.host
    assert await mirror.stop() == 0


async def test_served_process_pulls_with_skopeo(
    served: str, seeded: Seeded, tmp_path: Path
) -> None:
    digest = await skopeo_copy_to_dir(f"{served}/library/alpine:3.20", tmp_path / "out")
    assert digest == seeded.oci.digest
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with session.get(f"http://{served}{path}") as response:
                assert response.status == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("storage: {max_size: huge}\n", "storage.max_size:"),
        ("upstreams: {docker.io: {url: https://r, colour: red}}\n", "upstreams.docker.io.colour"),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(text)
    result = subprocess.run(
        [*MIRROR, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [*MIRROR, "serve", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "nope.yaml: cannot read" in result.stderr


def _mirror(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MIRROR, *args], capture_output=True, text=True, check=False, cwd=cwd, timeout=60
    )


def test_version_and_check_config(tmp_path: Path) -> None:
    version = _mirror("--version")
    assert version.returncode == 0 and version.stdout.startswith("mirror ")
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "listen: 0.0.0.0:5000\nstorage: {path: ./cache}\n"
        "upstreams: {docker.io: {url: https://registry-1.docker.io, username: u, password: p}}\n"
    )
    checked = _mirror("check-config", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "valid" in checked.stdout and "upstream docker.io (default)" in checked.stdout
    assert (
        "with credentials" in checked.stdout and "warning: listening on 0.0.0.0" in checked.stdout
    )
    assert "p\n" not in checked.stdout
    assert "trusted_proxies" not in checked.stdout  # none set: nothing to say
    assert "\nworkers 1\n" in checked.stdout
    assert not (tmp_path / "cache").exists()  # checking creates nothing
    config.write_text(
        config.read_text() + "trusted_proxies: [10.0.0.5, 10.1.0.0/16]\nworkers: auto\n"
    )
    checked = _mirror("check-config", "--config", str(config), cwd=tmp_path)
    assert "trusted_proxies 10.0.0.5/32, 10.1.0.0/16: X-Forwarded-For" in checked.stdout
    assert f"\nworkers {min(usable_cores(), 64)} (auto: one per core" in checked.stdout
    config.write_text("manifest_ttl: soon\n")
    bad = _mirror("check-config", "--config", str(config))
    assert bad.returncode == 2 and "manifest_ttl: expected seconds" in bad.stderr


def test_maintenance_on_a_store_that_is_not_there_says_so(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(f"storage: {{path: {tmp_path / 'nowhere'}}}\n")
    for command in ("du", "gc", "verify"):
        result = _mirror(command, "--config", str(config))
        assert result.returncode == 1 and "does not exist" in result.stderr, command
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("value", ["-5", "nan", "soon", "1w"])
def test_gc_older_than_must_be_a_duration(tmp_path: Path, value: str) -> None:
    config = tmp_path / "mirror.yaml"
    (tmp_path / "cache").mkdir()
    config.write_text(f"storage: {{path: {tmp_path / 'cache'}}}\n")
    result = _mirror("gc", "--config", str(config), f"--older-than={value}")
    assert result.returncode == 2 and "--older-than:" in result.stderr, result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_says_in_one_line_why_it_cannot_start(tmp_path: Path, workers: int) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "mirror.yaml"
        config.write_text(
            f"listen: 127.0.0.1:{port}\nworkers: {workers}\nstorage: {{path: {tmp_path / 'c'}}}\n"
        )
        result = _mirror("serve", "--config", str(config))
    assert result.returncode == 1, result.stderr  # the machine's state, not the file's
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"mirror: serve: listen: cannot listen on 127.0.0.1:{port}")
    )
    assert "Traceback" not in result.stderr
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    config.write_text(f"listen: 127.0.0.1:0\nstorage: {{path: {a_file / 'cache'}}}\n")
    result = _mirror("serve", "--config", str(config))
    assert result.returncode == 1 and "mirror: serve: storage.path: cannot create" in result.stderr


def test_a_certificate_that_is_not_one_is_a_config_error(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    config = tmp_path / "mirror.yaml"
    config.write_text(f"tls: {{cert: {cert}, key: {key}}}\n")
    result = _mirror("check-config", "--config", str(config))
    assert result.returncode == 2
    assert "tls.cert, tls.key:" in result.stderr and "PEM lib" not in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_reloads_the_certificate_for_new_connections(
    tmp_path: Path, workers: int
) -> None:
    import asyncio
    import shutil
    import signal
    import ssl

    from tests.support.pki import make_pki
    from tests.support.registry import free_port

    old, new = make_pki(tmp_path / "old"), make_pki(tmp_path / "new")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(old.server_cert, cert)
    shutil.copy(old.server_key, key)
    ops = f"127.0.0.1:{free_port()}"
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": workers,
            "ops_listen": ops,
            "tls": {"cert": str(cert), "key": str(key)},
            "storage": {"path": str(tmp_path / "cache")},
        },
    ).start()

    async def trusted_by(pki_ca: Path) -> bool:
        context = ssl.create_default_context(cafile=str(pki_ca))
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http,
                http.get(f"https://{mirror.host}/healthz", ssl=context) as response,
            ):
                return response.status == 200
        except aiohttp.ClientConnectorCertificateError:
            return False

    try:
        assert await trusted_by(old.ca) and not await trusted_by(new.ca)
        shutil.copy(new.server_cert, cert)
        shutil.copy(new.server_key, key)
        os.kill(mirror.pid, signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 10
        while not all([await trusted_by(new.ca) for _ in range(8)]):  # every worker
            assert asyncio.get_running_loop().time() < deadline, mirror.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
    finally:
        assert await mirror.stop() == 0
    assert "SIGHUP: reloaded" in mirror.log.read_text()


def test_check_config_says_who_may_push_to_a_hosted_namespace(tmp_path: Path) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(
        "default_upstream: docker.io\n"
        "upstreams: {docker.io: {url: https://registry-1.docker.io}, local: {hosted: true}}\n"
    )
    checked = _mirror("check-config", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "warning: upstreams.local: hosted, and no access rules: only clients on this" in (
        checked.stdout.replace("\n", " ")
    )
    config.write_text("upstreams: {local: {hosted: true, url: 'https://x.example'}}\n")
    bad = _mirror("check-config", "--config", str(config))
    assert bad.returncode != 0
    assert "upstreams.local: a hosted namespace takes no url" in bad.stderr


@dataclass
class SlowClient:
    """A client that has asked a `mirror serve` for a 4 MiB manifest and read only the
    head of the answer, with a small receive window: the rest backs up in the mirror."""

    mirror: MirrorProcess
    manifest: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@contextlib.asynccontextmanager
async def _slow_client(tmp_path: Path, upstream: Registry, path: str) -> AsyncIterator[SlowClient]:
    pusher = Pusher(upstream.url)
    image = pusher.image("stop/slow", "base")
    data = padded_manifest(image, 4 * 1024 * 1024)
    pusher.push_manifest("stop/slow", "big", data, image.media_type)
    mirror = await MirrorProcess(
        tmp_path,
        {
            "workers": 1,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": upstream.url}},
        },
    ).start()
    writer = None
    try:
        query = "" if path == "fast" else "?ns=docker.io"  # a query: the fast path declines
        target = f"/v2/stop/slow/manifests/big{query}"
        async with (  # cached: the tag is trusted for its TTL
            aiohttp.ClientSession() as session,
            session.get(mirror.url + target, headers={"Accept": image.media_type}) as warm,
        ):
            assert await warm.read() == data
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", mirror.port))
        reader, writer = await asyncio.open_connection(sock=slow, limit=4096)
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: m\r\nAccept: {image.media_type}\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert answer.startswith(b"HTTP/1.1 200")
        yield SlowClient(mirror, data, reader, writer)
    finally:
        if writer is not None:
            writer.close()
        await mirror.stop(within=40)  # (at once when the test stopped it already)


@pytest.mark.parametrize("path", ["fast", "aiohttp"])
async def test_sigterm_lets_an_answer_already_written_reach_a_slow_client(
    tmp_path: Path, upstream: Registry, path: str
) -> None:
    """A 4 MiB manifest answered to a client that reads slowly, then SIGTERM: the process
    ends only after the whole answer has left it (it used to exit with most of the fast
    path's answer still in its buffer, cutting the body short), on either path."""
    async with _slow_client(tmp_path, upstream, path) as client:
        mirror = client.mirror
        stopping = asyncio.create_task(mirror.stop())
        if path == "fast":  # nothing in progress: the app stops at once, the answer unsent
            await until(lambda: "stopped: connections closed" in mirror.log.read_text(), "done")
        else:  # the handler is in progress until the client reads: the stop waits for it
            await until(lambda: _refused(mirror.port), "it no longer takes connections")
        body = await asyncio.wait_for(client.reader.readexactly(len(client.manifest)), 20)
        assert body == client.manifest
        assert await asyncio.wait_for(client.reader.read(), 10) == b""  # then it closes
        assert await stopping == 0


async def test_a_client_that_never_reads_holds_a_stop_for_the_shutdown_wait_once(
    tmp_path: Path, upstream: Registry
) -> None:
    """A request in progress for a client that reads nothing: the stop gives it the 20 s
    shutdown wait, then cuts it and exits, cleanly (aiohttp's own stop would wait that
    long twice: for the handler, and again after telling it to stop). The client keeps
    what it got: the start of the right bytes."""
    async with _slow_client(tmp_path, upstream, "aiohttp") as client:
        started = time.monotonic()
        assert await client.mirror.stop(within=40) == 0
        took = time.monotonic() - started
        assert SHUTDOWN_WAIT <= took < SHUTDOWN_WAIT + 5, took
        got = await asyncio.wait_for(client.reader.read(), 10)
        while more := await asyncio.wait_for(client.reader.read(), 10):
            got += more
        assert 0 < len(got) < len(client.manifest)
        assert client.manifest.startswith(got)


def _refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0
