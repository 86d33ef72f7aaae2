"""Real pulls with skopeo through the mirror, from a real docker-registry upstream."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.conftest import Mirror, Seeded
from tests.support.clients import skopeo_copy_to_dir
from tests.support.registry import Registry


def _blob_files_match(target: Path, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        stored = (target / digest.removeprefix("sha256:")).read_bytes()
        assert hashlib.sha256(stored).hexdigest() == digest.removeprefix("sha256:")
        assert stored == data


def _blob_gets(upstream: Registry, since: int) -> list[str]:
    return [h.path for h in upstream.hits(since) if h.method == "GET" and "/blobs/" in h.path]


async def test_oci_image_pulls_with_upstream_digest_and_second_pull_is_local(
    mirror: Mirror, seeded: Seeded, upstream: Registry, tmp_path: Path
) -> None:
    mark = upstream.mark()
    digest = await skopeo_copy_to_dir(f"{mirror.host}/alpine:3.20", tmp_path / "first")
    assert digest == seeded.oci.digest
    _blob_files_match(tmp_path / "first", seeded.oci.blobs)
    first = _blob_gets(upstream, mark)
    assert sorted(first) == sorted(f"/v2/library/alpine/blobs/{d}" for d in seeded.oci.blobs)

    mark = upstream.mark()
    digest = await skopeo_copy_to_dir(f"{mirror.host}/alpine:3.20", tmp_path / "second")
    assert digest == seeded.oci.digest
    _blob_files_match(tmp_path / "second", seeded.oci.blobs)
    assert upstream.hits(mark) == []  # within the TTL: not even a HEAD for the tag


async def test_docker_schema2_image_through_path_prefix(
    mirror: Mirror, seeded: Seeded, tmp_path: Path
) -> None:
    digest = await skopeo_copy_to_dir(f"{mirror.host}/ghcr.io/team/app:v1", tmp_path / "img")
    assert digest == seeded.docker.digest
    assert (tmp_path / "img" / "manifest.json").read_bytes() == seeded.docker.manifest
    _blob_files_match(tmp_path / "img", seeded.docker.blobs)


async def test_multi_arch_index_with_all(
    mirror: Mirror, seeded: Seeded, upstream: Registry, tmp_path: Path
) -> None:
    mark = upstream.mark()
    digest = await skopeo_copy_to_dir(f"{mirror.host}/multi/arch:latest", tmp_path / "all", "--all")
    assert digest == seeded.index.digest
    assert (tmp_path / "all" / "manifest.json").read_bytes() == seeded.index.manifest
    for child in seeded.index.children:
        child_manifest = tmp_path / "all" / f"{child.digest.removeprefix('sha256:')}.manifest.json"
        assert child_manifest.read_bytes() == child.manifest
    _blob_files_match(tmp_path / "all", seeded.index.all_blobs())
    gets = _blob_gets(upstream, mark)
    assert len(gets) == len(set(gets)) == len(seeded.index.all_blobs())


async def test_pull_by_digest(mirror: Mirror, seeded: Seeded, tmp_path: Path) -> None:
    reference = f"{mirror.host}/team/app@{seeded.docker.digest}"
    digest = await skopeo_copy_to_dir(reference, tmp_path / "by-digest")
    assert digest == seeded.docker.digest
    _blob_files_match(tmp_path / "by-digest", seeded.docker.blobs)


async def test_big_layer_pull(
    mirror: Mirror, seeded: Seeded, upstream: Registry, tmp_path: Path
) -> None:
    mark = upstream.mark()
    digest = await skopeo_copy_to_dir(f"{mirror.host}/big/layer:1", tmp_path / "big")
    assert digest == seeded.big.digest
    _blob_files_match(tmp_path / "big", seeded.big.blobs)
    # each blob asked for; the 100 MB layer may come over several ranges (each byte once:
    # tests/test_ranges.py)
    assert {get.rsplit("/", 1)[1] for get in _blob_gets(upstream, mark)} == set(seeded.big.blobs)
