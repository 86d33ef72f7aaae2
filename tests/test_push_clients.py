"""Pushing to a hosted namespace with real clients, then pulling back byte for byte:
docker build/tag/push/rmi/pull (the walkthrough in README "Pushing your own images"),
podman push, and skopeo copy --all of a multi-arch index."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Mirror, MirrorFactory, Seeded
from tests.support.clients import podman_command, skopeo
from tests.support.dockerd import dockerd as start_dockerd
from tests.support.registry import Registry, free_port

pytestmark = pytest.mark.e2e

CLOSED = free_port()
NO_EGRESS = {
    "HTTP_PROXY": f"http://127.0.0.1:{CLOSED}",
    "HTTPS_PROXY": f"http://127.0.0.1:{CLOSED}",
    "NO_PROXY": "127.0.0.1,localhost",
}


@pytest.fixture
async def hosted(make_mirror: MirrorFactory, upstream: Registry) -> Mirror:
    return await make_mirror({"docker.io": upstream.url, "local": {"hosted": True}})


async def run(*args: str, env: dict[str, str] | None = None) -> str:
    """A client command, in a thread: the mirror may be serving on this event loop."""
    done = await asyncio.to_thread(
        subprocess.run, args, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


async def test_skopeo_copies_a_multi_arch_index_in_and_out_unchanged(
    hosted: Mirror, seeded: Seeded, upstream: Registry, tmp_path: Path
) -> None:
    source = f"docker://{upstream.url.removeprefix('http://')}/multi/arch:latest"
    target = f"docker://{hosted.host}/local/multi:1"
    flags = ("--src-tls-verify=false", "--dest-tls-verify=false")
    await skopeo("copy", "--all", *flags, source, target)
    pushed = await skopeo("inspect", "--raw", "--tls-verify=false", target)
    assert pushed.encode() == seeded.index.manifest  # the index's exact bytes
    back = tmp_path / "back"
    await skopeo("copy", "--all", "--src-tls-verify=false", target, f"dir:{back}")
    for child in seeded.index.children:
        for digest, data in child.blobs.items():
            assert (back / digest.split(":")[1]).read_bytes() == data


async def test_docker_build_push_rmi_pull_and_podman_push(
    hosted: Mirror, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    assert shutil.which("dockerd"), "dockerd is needed (apt-get install docker.io)"
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello.txt").write_bytes(os.urandom(200_000))
    (context / "Dockerfile").write_text('FROM scratch\nCOPY hello.txt /\nCMD ["/hello.txt"]\n')
    image = f"{hosted.host}/local/app:1"
    root = tmp_path_factory.mktemp("d")  # short: the socket path must fit
    with start_dockerd(root, json.dumps({}), NO_EGRESS) as env:
        env = {**env, "DOCKER_BUILDKIT": "0"}
        await run("docker", "build", "-q", "-t", "app:1", str(context), env=env)
        await run("docker", "tag", "app:1", image, env=env)
        inspect = ("docker", "image", "inspect", "--format", "{{.Id}}", image)
        built = (await run(*inspect, env=env)).strip()
        pushed = await run("docker", "push", image, env=env)
        assert "digest: sha256:" in pushed
        await run("docker", "rmi", image, env=env)
        await run("docker", "pull", image, env=env)
        pulled = (await run(*inspect, env=env)).strip()
        assert pulled == built  # the same config, so the same image
    raw = await skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{image}")
    assert json.loads(raw)["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"

    assert shutil.which("podman"), "podman is needed (apt-get install podman)"
    with podman_command(tmp_path / "proot") as podman:
        podman_env = {**os.environ, **NO_EGRESS}
        await run(*podman, "pull", "--tls-verify=false", image, env=podman_env)
        again = f"{hosted.host}/local/from-podman:2"
        await run(*podman, "tag", image, again, env=podman_env)
        await run(*podman, "push", "--tls-verify=false", again, env=podman_env)
    listed = await skopeo(
        "list-tags", "--tls-verify=false", f"docker://{hosted.host}/local/from-podman"
    )
    assert json.loads(listed)["Tags"] == ["2"]
    # podman sends the layer it pulled: the same bytes as docker pushed
    pushed_layers = json.loads(raw)["layers"]
    again_raw = await skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{again}")
    assert [layer["digest"] for layer in json.loads(again_raw)["layers"]] == [
        layer["digest"] for layer in pushed_layers
    ]


async def test_oras_pushes_an_artifact_and_a_referrer_and_pulls_them_back(
    hosted: Mirror, tmp_path: Path
) -> None:
    """The ORAS Python SDK (chunked uploads, an artifact manifest with a subject), in a
    thread: it is synchronous, and the mirror may serve on this loop."""
    import oras.client
    import oras.oci

    client = oras.client.OrasClient(hostname=hosted.host, insecure=True)
    sbom = tmp_path / "sbom.json"
    sbom.write_bytes(os.urandom(3 * 1024 * 1024))
    signature = tmp_path / "signature.sig"
    signature.write_bytes(os.urandom(2000))
    target = f"{hosted.host}/local/artifact:1"
    pushed = await asyncio.to_thread(
        client.push,
        target=target,
        files=[str(sbom)],
        do_chunked=True,
        chunk_size=1 << 20,
        disable_path_validation=True,
    )
    subject_digest = pushed.headers["Docker-Content-Digest"]
    manifest = await asyncio.to_thread(client.get_manifest, target)
    size = len(json.dumps(manifest))  # (the SDK's own size; the registry keeps the bytes)
    subject = oras.oci.Subject(
        mediaType="application/vnd.oci.image.manifest.v1+json", digest=subject_digest, size=size
    )
    referrer = await asyncio.to_thread(
        client.push,
        target=f"{hosted.host}/local/artifact:sig",
        files=[str(signature)],
        subject=subject,
        disable_path_validation=True,
    )
    assert referrer.headers["OCI-Subject"] == subject_digest
    listed = await asyncio.to_thread(
        client.session.get,
        f"http://{hosted.host}/v2/local/artifact/referrers/{subject_digest}",
    )
    digests = [d["digest"] for d in listed.json()["manifests"]]
    assert digests == [referrer.headers["Docker-Content-Digest"]]
    out = tmp_path / "out"
    files = await asyncio.to_thread(client.pull, target=target, outdir=str(out))
    assert [Path(f).read_bytes() for f in files] == [sbom.read_bytes()]


async def test_buildah_builds_from_scratch_and_pushes(hosted: Mirror, tmp_path: Path) -> None:
    assert shutil.which("buildah"), "buildah is needed (apt-get install buildah)"
    context = tmp_path / "context"
    context.mkdir()
    (context / "data.bin").write_bytes(os.urandom(100_000))
    (context / "Containerfile").write_text("FROM scratch\nCOPY data.bin /\n")
    runroot = Path(tempfile.mkdtemp(prefix="bh-", dir="/tmp"))  # kept short, as podman's
    buildah = [
        "buildah",
        "--root", str(tmp_path / "broot"),
        "--runroot", str(runroot),
        "--storage-driver", "vfs",
    ]  # fmt: skip
    env = {**os.environ, **NO_EGRESS, "BUILDAH_ISOLATION": "chroot"}
    image = f"{hosted.host}/local/built:1"
    try:
        await run(*buildah, "bud", "-q", "-t", image, str(context), env=env)
        await run(*buildah, "push", "--tls-verify=false", image, f"docker://{image}", env=env)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)
    out = tmp_path / "out"
    await skopeo("copy", "--src-tls-verify=false", f"docker://{image}", f"dir:{out}")
    layers = json.loads((out / "manifest.json").read_bytes())["layers"]
    assert len(layers) == 1  # the one COPY, as pushed
