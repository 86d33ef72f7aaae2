"""Every real client, end to end: dockerd (registry-mirrors), containerd (ctr --hosts-dir,
routed by ns=), podman (registries.conf mirrors, at the root and under a path prefix), and
skopeo over TLS, through a real `mirror serve` in front of real registries, one plain and
one behind token auth.

Each client is set up from the files in deploy/clients/ (the ones README shows), with the
mirror's address filled in and every fallback pointed at a closed loopback port, and with
HTTP(S)_PROXY at that closed port too: a pull that bypassed the mirror fails instead of
reaching out.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import Seeded
from tests.support.clients import podman_command
from tests.support.dockerd import dockerd as start_dockerd
from tests.support.images import Image, Pusher
from tests.support.registry import Registry, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).parent.parent
CLIENTS = ROOT / "deploy" / "clients"
PLACEHOLDER = "mirror.example.internal:5000"
CLOSED = free_port()  # nothing listens here
CI = ("ci", "ci-pull-secret")  # the mirror's user for the private registry
NO_EGRESS = {
    "HTTP_PROXY": f"http://127.0.0.1:{CLOSED}",
    "HTTPS_PROXY": f"http://127.0.0.1:{CLOSED}",
    "NO_PROXY": "127.0.0.1,localhost",
}


def client_file(relative: str, mirror_host: str) -> str:
    """A deploy/clients file as a client here uses it: the mirror's address filled in,
    every upstream fallback at the closed port."""
    text = (CLIENTS / relative).read_text().replace(PLACEHOLDER, mirror_host)
    text = re.sub(r'^server = ".*"$', f'server = "http://127.0.0.1:{CLOSED}"', text, flags=re.M)
    return re.sub(
        r'^location = "(?!127\.0\.0\.1)[^"]*"$',
        f'location = "127.0.0.1:{CLOSED}"',
        text,
        flags=re.M,
    )


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    result = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **NO_EGRESS, **(env or {})},
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def wait_for(check: object, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up")


@dataclass
class Served:
    host: str
    process: subprocess.Popen[bytes]
    log: Path
    private: Image  # on the token-auth upstream, pulled as ghcr.io/private/tool:1


def start_mirror(
    workdir: Path, settings: dict[str, object], scheme: str = "http"
) -> tuple[str, subprocess.Popen[bytes], Path]:
    port = free_port()
    host = f"127.0.0.1:{port}"
    config = workdir / f"mirror-{port}.yaml"
    config.write_text(yaml.safe_dump({"listen": host, **settings}))
    log = workdir / f"mirror-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mirror", "serve", "--config", str(config)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )

    def up() -> bool:
        import ssl

        context = ssl._create_unverified_context()
        with urllib.request.urlopen(f"{scheme}://{host}/healthz", timeout=1, context=context) as r:
            return bool(r.status == 200)

    wait_for(up, "mirror")
    return host, process, log


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    upstream: Registry,
    auth_upstream: Registry,
    auth_pusher: Pusher,
    seeded: Seeded,
) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("e2e-mirror")
    private = auth_pusher.index("private/tool", "1")
    users = workdir / "htpasswd"
    subprocess.run(["htpasswd", "-B", "-b", "-c", str(users), *CI], check=True, capture_output=True)
    host, process, log = start_mirror(
        workdir,
        {
            "workers": 2,  # real clients through two worker processes over one store
            "storage": {"path": str(workdir / "cache")},
            # As README's access example: public registries anonymous from this network,
            # the private one (the mirror holds its credentials) for named users.
            "access": {
                "users_file": str(users),
                "rules": [
                    {
                        "repositories": ["docker.io/*", "quay.io/*", "registry.k8s.io/*"],
                        "anonymous": True,
                        "networks": ["127.0.0.0/8"],
                    },
                    {"repositories": ["ghcr.io/*"], "users": [CI[0]]},
                ],
            },
            "upstreams": {
                "docker.io": {"url": upstream.url},
                "ghcr.io": {
                    "url": auth_upstream.url,
                    "username": "alice",
                    "password": "wonderland",
                },
                "quay.io": {"url": upstream.url},
                "registry.k8s.io": {"url": upstream.url},
            },
        },
    )
    yield Served(host, process, log, private)
    process.terminate()
    process.wait(15)


# Docker


def _dockerd(root: Path, mirror_host: str) -> contextlib.AbstractContextManager[dict[str, str]]:
    """dockerd with its own data root, pulling through the mirror at `mirror_host`."""
    return start_dockerd(root, client_file("docker/daemon.json", mirror_host), NO_EGRESS)


@pytest.fixture(scope="module")
def dockerd(served: Served, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with _dockerd(tmp_path_factory.mktemp("dockerd"), served.host) as env:
        yield env


@pytest.mark.parametrize(
    ("reference", "image"),
    [("alpine:3.20", "oci"), ("team/app:v1", "docker"), ("multi/arch:latest", "index")],
)
def test_docker_pull_through_registry_mirrors(
    dockerd: dict[str, str],
    served: Served,
    seeded: Seeded,
    upstream: Registry,
    reference: str,
    image: str,
) -> None:
    expected: Image = getattr(seeded, image)
    run("docker", "pull", reference, env=dockerd)
    digests = json.loads(
        run(
            "docker",
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            reference,
            env=dockerd,
        )
    )
    name = reference.split(":")[0]
    assert f"{name}@{expected.digest}" in digests
    # admitted by the network rule, anonymously: dockerd sends a mirror no credentials
    repository = name if "/" in name else f"library/{name}"
    lines = [line for line in served.log.read_text().splitlines() if f"/v2/{repository}/" in line]
    assert lines and all(line.endswith("user=- access=allowed") for line in lines), lines


# containerd


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = shutil.which("containerd")
    assert binary, "containerd is needed (apt-get install containerd): scripts/test installs it"
    root = tmp_path_factory.mktemp("containerd")
    socket = root / "containerd.sock"
    config = root / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{root / "root"}"\nstate = "{root / "state"}"\n'
        f'[grpc]\n  address = "{socket}"\n'
        f'[ttrpc]\n  address = "{root / "ttrpc.sock"}"\n'
        '[debug]\n  address = ""\n[metrics]\n  address = ""\n'
    )
    process = subprocess.Popen(
        [binary, "--config", str(config)],
        stdout=(root / "containerd.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(
            lambda: (
                subprocess.run(
                    ["ctr", "--address", str(socket), "version"], capture_output=True, check=False
                ).returncode
                == 0
            ),
            "containerd",
        )
        yield str(socket)
    finally:
        process.terminate()
        process.wait(30)


def ctr_pull(socket: str, hosts_dir: str, reference: str, *extra: str) -> None:
    """`ctr image pull` through the mirrors that `hosts_dir` names (native snapshotter)."""
    run(
        "ctr",
        "--address",
        socket,
        "image",
        "pull",
        "--snapshotter",
        "native",
        "--hosts-dir",
        hosts_dir,
        *extra,
        reference,
    )


def _hosts_dir(root: Path, mirror_host: str) -> Path:
    hosts = root / "certs.d"
    for registry in ("docker.io", "ghcr.io"):
        (hosts / registry).mkdir(parents=True, exist_ok=True)
        text = client_file(f"containerd/{registry}/hosts.toml", mirror_host)
        if registry == "ghcr.io":  # the mirror's user, as README's access section shows
            login = base64.b64encode(":".join(CI).encode()).decode()
            text += f'  [host."http://{mirror_host}".header]\n    Authorization = "Basic {login}"\n'
        (hosts / registry / "hosts.toml").write_text(text)
    return hosts


def test_containerd_pulls_two_registries_routed_by_ns(
    containerd: str,
    served: Served,
    seeded: Seeded,
    auth_upstream: Registry,
    tmp_path: Path,
) -> None:
    hosts = _hosts_dir(tmp_path, served.host)
    mark = auth_upstream.mark()
    for reference in ("docker.io/library/alpine:3.20", "ghcr.io/private/tool:1"):
        ctr_pull(containerd, str(hosts), reference)
    listing = run("ctr", "--address", containerd, "image", "ls")
    assert re.search(rf"docker.io/library/alpine:3.20\s+\S+\s+{seeded.oci.digest}", listing)
    assert re.search(rf"ghcr.io/private/tool:1\s+\S+\s+{served.private.digest}", listing)
    # ghcr.io (named only by containerd's ?ns=) went to the token-auth upstream with the
    # mirror's credentials; without ns routing it would have gone to docker.io and failed
    assert any("/v2/private/tool/manifests/" in h.path for h in auth_upstream.hits(mark))
    # As kubelet hands containerd an image pull secret: credentials, no header; containerd
    # logs in with them at the mirror's /token.
    run("ctr", "--address", containerd, "image", "rm", "ghcr.io/private/tool:1")
    bare = tmp_path / "bare"
    (bare / "ghcr.io").mkdir(parents=True)
    (bare / "ghcr.io" / "hosts.toml").write_text(
        client_file("containerd/ghcr.io/hosts.toml", served.host)
    )
    with pytest.raises(AssertionError, match=r"401|nauthorized"):
        ctr_pull(containerd, str(bare), "ghcr.io/private/tool:1")
    tokens = served.log.read_text().count("user=ci access=token")
    ctr_pull(containerd, str(bare), "ghcr.io/private/tool:1", "--user", ":".join(CI))
    assert served.log.read_text().count("user=ci access=token") > tokens


# podman


def test_podman_pulls_through_root_and_path_prefix_mirrors(
    served: Served, seeded: Seeded, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    assert shutil.which("podman"), "podman is needed (apt-get install podman)"
    conf = tmp_path / "registries.conf"
    conf.write_text(client_file("podman/registries.conf", served.host))
    env = {"CONTAINERS_REGISTRIES_CONF": str(conf)}
    stack = contextlib.ExitStack()
    request.addfinalizer(stack.close)
    podman = stack.enter_context(podman_command(tmp_path / "root"))
    auth = tmp_path / "auth.json"
    env["REGISTRY_AUTH_FILE"] = str(auth)
    with pytest.raises(AssertionError):  # ghcr.io/* is for named users: not before login
        run(*podman, "pull", "ghcr.io/private/tool:1", env=env)
    with pytest.raises(AssertionError):
        run(
            *podman, "login", "--tls-verify=false", "-u", CI[0], "-p", "wrong", served.host, env=env
        )
    run(*podman, "login", "--tls-verify=false", "-u", CI[0], "-p", CI[1], served.host, env=env)
    for reference, expected in (
        ("docker.io/team/app:v1", seeded.docker.digest),  # the mirror at the root
        ("ghcr.io/private/tool:1", served.private.digest),  # under /ghcr.io
    ):
        run(*podman, "pull", reference, env=env)
        digest = run(*podman, "image", "inspect", "--format", "{{.Digest}}", reference, env=env)
        assert digest.strip() == expected


# TLS, with skopeo copy --all and containerd trusting a self-signed certificate


def _self_signed(root: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # only the CA in the cert dir: a .key there would be taken for a client certificate's
    cert_path, key_path = root / "ca.crt", root.parent / "mirror.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_tls_with_skopeo_all_and_containerd(
    containerd: str, upstream: Registry, seeded: Seeded, tmp_path: Path
) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    cert, key = _self_signed(certs)
    host, process, _ = start_mirror(
        tmp_path,
        {
            "storage": {"path": str(tmp_path / "cache")},
            "tls": {"cert": str(cert), "key": str(key)},
            "upstreams": {"docker.io": {"url": upstream.url}},
        },
        scheme="https",
    )
    try:

        def copy_all(target: Path) -> None:
            run(
                "skopeo",
                "--insecure-policy",
                "copy",
                "--all",
                "--src-tls-verify=true",
                "--src-cert-dir",
                str(certs),
                f"docker://{host}/multi/arch:latest",
                f"dir:{target}",
            )

        target, again = tmp_path / "index", tmp_path / "index-again"
        copy_all(target)
        assert (target / "manifest.json").read_bytes() == seeded.index.manifest
        copy_all(again)  # every blob a hit now: sent over TLS from the file
        files = sorted(path.name for path in target.iterdir())
        assert files == sorted(path.name for path in again.iterdir())
        assert all((target / name).read_bytes() == (again / name).read_bytes() for name in files)
        hosts = tmp_path / "certs.d" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://127.0.0.1:{CLOSED}"\n\n'
            f'[host."https://{host}"]\n  capabilities = ["pull", "resolve"]\n  ca = "{cert}"\n'
        )
        ctr_pull(containerd, str(tmp_path / "certs.d"), "docker.io/team/app:v1")
        listing = run("ctr", "--address", containerd, "image", "ls")
        assert re.search(rf"docker.io/team/app:v1\s+\S+\s+{seeded.docker.digest}", listing)
    finally:
        process.terminate()
        process.wait(15)


def test_readme_shows_the_client_files_the_tests_use() -> None:
    readme = (ROOT / "README.md").read_text()
    for path in sorted(CLIENTS.rglob("*")):
        if path.is_file():
            assert path.read_text().strip() in readme, f"README does not show {path}"


# air-gapped: an archive made online, a site with no upstream at all


def test_a_site_with_no_upstream_is_filled_from_an_archive(
    containerd: str, upstream: Registry, seeded: Seeded, tmp_path: Path
) -> None:
    """`mirror export` online; `ctr image import` reads the archive; `mirror import` fills
    a mirror whose upstream does not exist, and dockerd, containerd and podman pull every
    image from it by tag, with the upstream's digests."""
    online = tmp_path / "online.yaml"
    online.write_text(
        yaml.safe_dump(
            {
                "storage": {"path": str(tmp_path / "online-cache")},
                "upstreams": {"docker.io": {"url": upstream.url}},
            }
        )
    )
    archive = tmp_path / "site.tar"
    images = {
        "alpine:3.20": seeded.oci,
        "team/app:v1": seeded.docker,
        "multi/arch:latest": seeded.index,
    }
    mirror = [sys.executable, "-m", "mirror"]
    run(*mirror, "export", "--config", str(online), "-o", str(archive), *images)
    run("ctr", "--address", containerd, "--namespace", "archive", "image", "import", str(archive))
    listing = run("ctr", "--address", containerd, "--namespace", "archive", "image", "ls")
    for name, image in images.items():
        full = f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"
        assert re.search(rf"{re.escape(full)}\s+\S+\s+{image.digest}", listing), listing

    site = tmp_path / "site"
    site.mkdir()
    settings = {
        "storage": {"path": str(site / "cache")},
        "upstreams": {"docker.io": {"url": f"http://127.0.0.1:{CLOSED}"}},  # nothing there
    }
    site_config = site / "import.yaml"
    site_config.write_text(yaml.safe_dump(settings))
    run(*mirror, "import", "--config", str(site_config), str(archive))
    host, process, _ = start_mirror(site, settings)
    short = Path(tempfile.mkdtemp(prefix="dockerd-", dir="/tmp"))  # sockets need short paths
    try:
        with _dockerd(short, host) as env:
            for name, image in images.items():
                run("docker", "pull", name, env=env)
                digests = run(
                    "docker", "image", "inspect", "--format", "{{json .RepoDigests}}", name, env=env
                )
                assert f"{name.split(':')[0]}@{image.digest}" in digests
        hosts = tmp_path / "certs.d" / "docker.io"
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(client_file("containerd/docker.io/hosts.toml", host))
        for name in ("docker.io/library/alpine:3.20", "docker.io/multi/arch:latest"):
            run(
                "ctr",
                "--address",
                containerd,
                "--namespace",
                "site",
                "image",
                "pull",
                "--snapshotter",
                "native",
                "--hosts-dir",
                str(tmp_path / "certs.d"),
                name,
            )
        listing = run("ctr", "--address", containerd, "--namespace", "site", "image", "ls")
        assert re.search(rf"docker.io/multi/arch:latest\s+\S+\s+{seeded.index.digest}", listing)
        conf = tmp_path / "registries.conf"
        conf.write_text(client_file("podman/registries.conf", host))
        with podman_command(tmp_path / "podman") as podman:
            env = {"CONTAINERS_REGISTRIES_CONF": str(conf)}
            run(*podman, "pull", "docker.io/team/app:v1", env=env)
            digest = run(
                *podman,
                "image",
                "inspect",
                "--format",
                "{{.Digest}}",
                "docker.io/team/app:v1",
                env=env,
            )
            assert digest.strip() == seeded.docker.digest
    finally:
        process.terminate()
        process.wait(15)
        shutil.rmtree(short, ignore_errors=True)
