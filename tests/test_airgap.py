"""Sites with a slow link or none at all: `mirror warm` fills the cache as pulls would,
`mirror export` writes an OCI layout archive that skopeo reads, `mirror import` fills a
mirror that has no upstream at all, verified and pinned; `ls`, `rm`, `unpin` and
`/v2/_catalog` show and prune what is there."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import RelayFactory, Seeded
from tests.support.clients import skopeo, skopeo_copy_to_dir
from tests.support.process import MirrorProcess, mirror_command
from tests.support.registry import Registry, free_port

CLOSED = f"http://127.0.0.1:{free_port()}"  # an upstream that is not there


def _config(path: Path, upstream_url: str, connections: int = 4, **settings: Any) -> Path:
    config = path / "mirror.yaml"
    upstream = {"url": upstream_url, "range_connections": connections}
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "storage": {"path": str(path / "cache")},
                "upstreams": {"docker.io": upstream, "quay.io": upstream},
                **settings,
            }
        )
    )
    return config


async def _serve(
    path: Path, upstream_url: str, connections: int = 4, **settings: Any
) -> MirrorProcess:
    raw = yaml.safe_load(_config(path, upstream_url, connections, **settings).read_text())
    raw.pop("listen")
    return await MirrorProcess(path, raw).start()


async def _exported(tmp_path: Path, upstream_url: str, name: str, *images: str) -> Path:
    """`mirror export` of `images` from a mirror of its own over `upstream_url`: the
    archive, made as the online side of a site would."""
    online = tmp_path / "online"
    online.mkdir(exist_ok=True)
    archive = tmp_path / name
    exported = await mirror_command(
        _config(online, upstream_url), "export", "-o", str(archive), *images
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    return archive


@pytest.fixture
def stoppable(tmp_path: Path, upstream: Registry, seeded: Seeded) -> Iterator[Registry]:
    """A registry with the seeded images that the test may stop (the session's may not)."""
    root = tmp_path / "stoppable"
    shutil.copytree(upstream.root / "data", root / "data")
    registry = Registry(root)
    yield registry
    registry.stop()  # again, if the test did not get that far


async def test_warm_then_serve_with_the_upstream_gone(
    tmp_path: Path, stoppable: Registry, seeded: Seeded
) -> None:
    config = _config(tmp_path, stoppable.url)
    result = await mirror_command(
        config, "warm", "alpine:3.20", "docker.io/team/app:v1", "multi/arch:latest"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 of 3 image(s) ready, 0 failed" in result.stdout
    again = await mirror_command(config, "warm", "alpine:3.20")
    assert "0 blob(s) fetched" in again.stdout and "already cached" in again.stdout
    stoppable.stop()
    settings = yaml.safe_load(config.read_text())
    settings.pop("listen")
    mirror = await MirrorProcess(tmp_path, settings).start()
    try:
        for name, image in (("alpine:3.20", seeded.oci), ("team/app:v1", seeded.docker)):
            target = tmp_path / name.replace("/", "_")
            digest = await skopeo_copy_to_dir(f"{mirror.host}/{name}", target)
            assert digest == image.digest
        # the index and this machine's platform (amd64) of it
        await skopeo_copy_to_dir(f"{mirror.host}/multi/arch:latest", tmp_path / "multi")
    finally:
        await mirror.stop()


async def test_warm_names_what_failed(tmp_path: Path, upstream: Registry, seeded: Seeded) -> None:
    config = _config(tmp_path, upstream.url)
    listing = tmp_path / "images.txt"
    listing.write_text("# what the site needs\nalpine:3.20\n\nnothing/here:1  # gone\n")
    result = await mirror_command(config, "warm", "--from-file", str(listing), "ghcr.io/x/y:1")
    assert result.returncode == 1
    assert "failed: nothing/here:1: " in result.stdout
    assert "failed: ghcr.io/x/y:1: registry 'ghcr.io' is not one" in result.stdout
    assert "1 of 3 image(s) ready, 2 failed" in result.stdout
    platform = await mirror_command(config, "warm", "--platform", "linux/s390x", "multi/arch")
    assert platform.returncode == 1 and "no manifest for linux/s390x" in platform.stdout


async def test_warm_beside_a_serving_mirror_fetches_each_layer_once(
    tmp_path: Path, upstream: Registry, seeded: Seeded, make_relay: RelayFactory
) -> None:
    """A client pulls the 100 MB layer through the server (slowly); warm of the same image
    joins that transfer through the store instead of fetching it again."""
    relay = await make_relay(upstream.url, rate=40_000_000)
    mirror = await _serve(tmp_path, relay.url, connections=1)  # (GETs are counted)
    layer = seeded.big.layers[0]
    mark = upstream.mark()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{mirror.url}/v2/big/layer/blobs/{layer}") as response,
        ):
            first = await response.content.readexactly(1_000_000)  # under way
            warm = await mirror_command(mirror.config, "warm", "big/layer:1")
            rest = await response.read()
        assert warm.returncode == 0, warm.stdout + warm.stderr
        assert hashlib.sha256(first + rest).hexdigest() == layer.removeprefix("sha256:")
    finally:
        await mirror.stop()
    fetched = [hit for hit in upstream.hits(mark) if hit.method == "GET" and layer in hit.path]
    assert len(fetched) == 1, fetched


def _index(archive: Path) -> dict[str, Any]:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        document: dict[str, Any] = json.load(member)
        return document


async def test_export_is_read_by_skopeo_with_the_upstreams_digests(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    config = _config(tmp_path, upstream.url)
    archive = tmp_path / "site.tar"
    result = await mirror_command(
        config, "export", "-o", str(archive), "alpine:3.20", "team/app:v1", "multi/arch:latest"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    names = [
        m["annotations"]["org.opencontainers.image.ref.name"] for m in _index(archive)["manifests"]
    ]
    assert names == [
        "docker.io/library/alpine:3.20",
        "docker.io/team/app:v1",
        "docker.io/multi/arch:latest",
    ]
    name = "docker.io/library/alpine:3.20"
    target = tmp_path / "alpine"
    await skopeo("copy", f"oci-archive:{archive}:{name}", f"dir:{target}")
    assert (target / "manifest.json").read_bytes() == seeded.oci.manifest
    for digest, data in seeded.oci.blobs.items():
        assert (target / digest.removeprefix("sha256:")).read_bytes() == data
    # A Docker schema2 image keeps its exact bytes (its digest is what clients pin): Debian's
    # skopeo looks up only OCI-typed entries by name, so read it from the tar itself.
    with tarfile.open(archive) as tar:
        for digest, data in {
            seeded.docker.digest: seeded.docker.manifest,
            **seeded.docker.blobs,
        }.items():
            member = tar.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None and member.read() == data
    inspected = json.loads(
        await skopeo("inspect", "--raw", f"oci-archive:{archive}:docker.io/multi/arch:latest")
    )
    assert json.dumps(inspected) == json.dumps(json.loads(seeded.index.manifest))


async def test_import_fills_a_mirror_with_no_upstream_pinned_and_verified(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    archive = await _exported(tmp_path, upstream.url, "site.tar", "alpine:3.20", "team/app:v1")
    site = tmp_path / "site"
    site.mkdir()
    config = _config(site, CLOSED, storage={"path": str(site / "cache"), "max_size": "1MiB"})
    imported = await mirror_command(config, "import", str(archive))
    assert imported.returncode == 0, imported.stdout + imported.stderr
    assert "imported docker.io/library/alpine:3.20" in imported.stdout
    listing = json.loads((await mirror_command(config, "ls", "--json")).stdout)
    assert {i["reference"]: i["pinned"] for i in listing} == {
        "docker.io/library/alpine:3.20": True,
        "docker.io/team/app:v1": True,
    }
    gc = await mirror_command(config, "gc", "--max-size", "1")  # pinned: nothing goes
    assert gc.returncode == 0
    for offline in (False, True):
        settings = yaml.safe_load(config.read_text())
        settings.pop("listen")
        mirror = await MirrorProcess(site, {**settings, "offline": offline}).start()
        try:
            for name, image in (("alpine:3.20", seeded.oci), ("team/app:v1", seeded.docker)):
                target = tmp_path / f"pulled-{offline}-{name.replace('/', '_')}"
                assert await skopeo_copy_to_dir(f"{mirror.host}/{name}", target) == image.digest
            by_digest = f"{mirror.host}/team/app@{seeded.docker.digest}"
            pulled = await skopeo_copy_to_dir(by_digest, tmp_path / f"by-digest-{offline}")
            assert pulled == seeded.docker.digest
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{mirror.url}/v2/_catalog") as response,
            ):
                assert await response.json() == {"repositories": ["library/alpine", "team/app"]}
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{mirror.url}/v2/library/alpine/tags/list") as response,
            ):  # the tags it knows, the upstream being offline or not there
                assert await response.json() == {"name": "library/alpine", "tags": ["3.20"]}
            inspected = await skopeo(  # lists the tags: what failed with no upstream
                "inspect", "--tls-verify=false", f"docker://{mirror.host}/alpine:3.20"
            )
            assert json.loads(inspected)["RepoTags"] == ["3.20"]
        finally:
            await mirror.stop()
    unpinned = await mirror_command(config, "unpin", "team/app:v1")
    assert "unpinned docker.io/team/app:v1" in unpinned.stdout
    await mirror_command(config, "gc", "--max-size", "1")
    listing = json.loads((await mirror_command(config, "ls", "--json")).stdout)
    assert [i["reference"] for i in listing] == ["docker.io/library/alpine:3.20"]


async def test_a_corrupted_archive_is_refused_and_nothing_of_it_is_served(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    archive = tmp_path / "site.tar"
    await mirror_command(
        _config(tmp_path, upstream.url), "export", "-o", str(archive), "team/app:v1"
    )
    layer = seeded.docker.layers[0]
    broken = tmp_path / "broken.tar"
    with tarfile.open(archive) as source, tarfile.open(broken, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(layer.removeprefix("sha256:")):
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            member.size = len(data)
            target.addfile(member, __import__("io").BytesIO(data))
    site = tmp_path / "site"
    site.mkdir()
    config = _config(site, CLOSED)
    result = await mirror_command(config, "import", str(broken))
    assert result.returncode == 1
    assert f"blob {layer} does not match its content" in result.stdout
    assert json.loads((await mirror_command(config, "ls", "--json")).stdout) == []


async def test_a_delta_carries_only_new_layers_and_is_enough_on_the_other_side(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    config = _config(tmp_path, upstream.url)
    full, delta = tmp_path / "week1.tar", tmp_path / "week2.tar"
    await mirror_command(config, "export", "-o", str(full), "alpine:3.20")
    result = await mirror_command(
        config, "export", "-o", str(delta), "--since", str(full), "alpine:3.20", "team/app:v1"
    )
    assert result.returncode == 0 and "left out" in result.stdout
    whole = tmp_path / "whole.tar"
    await mirror_command(config, "export", "-o", str(whole), "alpine:3.20", "team/app:v1")
    assert (
        delta.stat().st_size
        < whole.stat().st_size - sum(len(data) for data in seeded.oci.blobs.values()) + 10_000
    )
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    alone = await mirror_command(_config(fresh, CLOSED), "import", str(delta))
    assert alone.returncode == 1 and "neither in the archive nor in the store" in alone.stdout
    site = tmp_path / "site"
    site.mkdir()
    site_config = _config(site, CLOSED)
    for archive in (full, delta):
        done = await mirror_command(site_config, "import", str(archive))
        assert done.returncode == 0, done.stdout
    listing = json.loads((await mirror_command(site_config, "ls", "--json")).stdout)
    assert all(image["complete"] for image in listing) and len(listing) == 2


async def test_rm_drops_what_only_that_image_used(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    config = _config(tmp_path, upstream.url)
    await mirror_command(config, "warm", "alpine:3.20", "team/app:v1")
    listed = (await mirror_command(config, "ls")).stdout
    assert "docker.io/library/alpine:3.20" in listed and "docker.io/team/app:v1" in listed
    removed = await mirror_command(config, "rm", "team/app:v1")
    assert removed.returncode == 0 and "removed docker.io/team/app:v1" in removed.stdout
    listing = json.loads((await mirror_command(config, "ls", "--json")).stdout)
    assert [i["reference"] for i in listing] == ["docker.io/library/alpine:3.20"]
    assert listing[0]["complete"] and listing[0]["platforms"] == ["linux/amd64"]  # its config
    cache = tmp_path / "cache" / "blobs"
    kept = {p.name for p in cache.rglob("*") if p.is_file()}
    assert all(d.removeprefix("sha256:") in kept for d in seeded.oci.blobs)
    assert not any(d.removeprefix("sha256:") in kept for d in seeded.docker.blobs)


async def test_an_old_docker_save_archive_is_imported_and_served(tmp_path: Path) -> None:
    """Docker before 25 saves manifest.json, a config and uncompressed layer tars: the
    import makes an OCI manifest over them, and a client pulls it by tag."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as inner:
        payload = b"hello from an old docker save\n" * 1000
        info = tarfile.TarInfo("hello.txt")
        info.size = len(payload)
        inner.addfile(info, io.BytesIO(payload))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    saved = tmp_path / "old.tar"
    with tarfile.open(saved, "w") as tar:
        for name, data in (
            (
                "manifest.json",
                json.dumps(
                    [
                        {
                            "Config": config_name,
                            "RepoTags": ["legacy/app:1"],
                            "Layers": ["abc/layer.tar"],
                        }
                    ]
                ).encode(),
            ),
            (config_name, config),
            ("abc/layer.tar", layer_bytes),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    site = tmp_path / "site"
    site.mkdir()
    config_path = _config(site, CLOSED)
    result = await mirror_command(config_path, "import", str(saved))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "imported docker.io/legacy/app:1" in result.stdout
    mirror = await _serve(site, CLOSED, offline=True)
    try:
        target = tmp_path / "pulled"
        await skopeo_copy_to_dir(f"{mirror.host}/legacy/app:1", target)
        assert (target / diff_id.removeprefix("sha256:")).read_bytes() == layer_bytes
        assert (target / hashlib.sha256(config).hexdigest()).read_bytes() == config
    finally:
        await mirror.stop()


async def test_the_servers_warm_list_is_fetched_before_anyone_asks(
    tmp_path: Path, stoppable: Registry, seeded: Seeded
) -> None:
    mirror = await _serve(
        tmp_path, stoppable.url, warm={"images": ["alpine:3.20", "team/app:v1"], "every": "1h"}
    )
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while "warm: 2 of 2 image(s) ready, 0 failed" not in mirror.log.read_text():
            assert asyncio.get_running_loop().time() < deadline, mirror.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        stoppable.stop()  # nobody asked; all of it is here
        for name, image in (("alpine:3.20", seeded.oci), ("team/app:v1", seeded.docker)):
            target = tmp_path / name.replace("/", "_")
            assert await skopeo_copy_to_dir(f"{mirror.host}/{name}", target) == image.digest
    finally:
        await mirror.stop()


async def test_what_does_not_fit_is_said_not_reported_done(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    """A store smaller than the image: warm fails naming it, import refuses before
    writing, and a truncated archive is refused while the next one is imported."""
    small = tmp_path / "small"
    small.mkdir()
    config = _config(
        small, upstream.url, storage={"path": str(small / "cache"), "max_size": "4KiB"}
    )
    warm = await mirror_command(config, "warm", "team/app:v1")
    assert warm.returncode == 1 and "failed: team/app:v1:" in warm.stdout
    assert "not kept" in warm.stdout or "not in the store after all" in warm.stdout
    archive = await _exported(tmp_path, upstream.url, "site.tar", "team/app:v1")
    refused = await mirror_command(config, "import", str(archive))
    assert refused.returncode == 1 and "storage.max_size (4096)" in refused.stdout
    listing = json.loads((await mirror_command(config, "ls", "--json")).stdout)
    # what the failed warm left: the manifest, listed as partial; nothing pinned
    assert all(not image["complete"] and not image["pinned"] for image in listing)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    site = tmp_path / "site"
    site.mkdir()
    site_config = _config(site, CLOSED)
    both = await mirror_command(site_config, "import", str(cut), str(archive))
    assert both.returncode == 1, both.stdout + both.stderr
    assert "cut.tar: refused:" in both.stdout and "Traceback" not in both.stderr
    assert "imported docker.io/team/app:v1" in both.stdout


async def test_an_image_named_by_digest_is_listed_unpinned_and_removed(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    name = f"team/app@{seeded.docker.digest}"
    archive = await _exported(tmp_path, upstream.url, "by-digest.tar", name, "team/app:v1")
    site = tmp_path / "site"
    site.mkdir()
    config = _config(site, CLOSED)
    assert (await mirror_command(config, "import", str(archive))).returncode == 0
    listing = json.loads((await mirror_command(config, "ls", "--json")).stdout)
    assert sorted(i["reference"] for i in listing) == [
        "docker.io/team/app:v1",
        f"docker.io/{name}",
    ]
    unpinned = await mirror_command(config, "unpin", name)
    assert unpinned.returncode == 0 and f"unpinned docker.io/{name}" in unpinned.stdout
    removed = await mirror_command(config, "rm", "team/app:v1")
    assert removed.returncode == 0, removed.stdout
    assert json.loads((await mirror_command(config, "ls", "--json")).stdout) == []


async def test_export_checks_where_it_writes_before_fetching(
    tmp_path: Path, upstream: Registry, seeded: Seeded
) -> None:
    config = _config(tmp_path, upstream.url)
    mark = upstream.mark()
    for target, problem in (
        (tmp_path / "no" / "such" / "x.tar", "is not a directory"),
        (tmp_path, "is a directory"),
    ):
        result = await mirror_command(config, "export", "-o", str(target), "alpine:3.20")
        assert result.returncode == 2 and problem in result.stdout, result.stdout
    assert upstream.hits(mark) == []
