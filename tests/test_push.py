"""A hosted namespace (`upstreams.local: {hosted: true}`), case by case from the OCI
distribution spec's workflows: push (monolithic POST-PUT and POST-only, chunked, streamed,
mounts, status, cancel), pull, content discovery (tags, referrers), content management
(deletes), sha512; then what the mirror adds: hosted content is never evicted, uploads
survive a restart, the hosted bound refuses with a clear error."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Mirror, MirrorFactory
from tests.support.registry import Registry
from tests.test_access import htpasswd

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = b"{}"
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


@pytest.fixture
async def hosted(make_mirror: MirrorFactory, upstream: Registry) -> Mirror:
    return await make_mirror({"docker.io": upstream.url, "local": {"hosted": True}})


def _access(tmp_path: Path, users: dict[str, str], *rules: dict[str, Any]) -> dict[str, Any]:
    """An access section: these users (made by `htpasswd -B`) and these rules."""
    path = tmp_path / "htpasswd"
    for user, password in users.items():
        htpasswd(path, user, password)
    return {"users_file": str(path), "rules": list(rules)}


async def _error(response: aiohttp.ClientResponse) -> str:
    body = await response.json(content_type=None)
    return str(body["errors"][0]["code"])


async def push_blob(session: aiohttp.ClientSession, base: str, repo: str, data: bytes) -> str:
    """POST then PUT with the whole blob (the monolithic POST-PUT)."""
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as response:
        assert response.status == 202, await response.text()
        location = response.headers["Location"]
    digest = sha256(data)
    async with session.put(f"{base}{location}?digest={digest}", data=data) as response:
        assert response.status == 201, await response.text()
        assert response.headers["Docker-Content-Digest"] == digest
        assert response.headers["Location"] == f"/v2/{repo}/blobs/{digest}"
    return digest


def image_manifest(config: bytes, layers: list[bytes], **extra: Any) -> bytes:
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": EMPTY_TYPE, "digest": sha256(config), "size": len(config)},
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(b),
                "size": len(b),
            }
            for b in layers
        ],
        **extra,
    }
    return json.dumps(document, indent=2).encode()


async def push_manifest(
    session: aiohttp.ClientSession,
    base: str,
    repo: str,
    reference: str,
    data: bytes,
    media_type: str = OCI_MANIFEST,
    query: str = "",
) -> aiohttp.ClientResponse:
    url = f"{base}/v2/{repo}/manifests/{reference}{query}"
    async with session.put(url, data=data, headers={"Content-Type": media_type}) as response:
        await response.read()
        return response


async def fetch(session: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, bytes, Any]:
    async with session.get(url, headers=headers) as response:
        return response.status, await response.read(), response.headers


async def test_push_then_pull_an_image_by_tag_and_by_digest(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    layer = os.urandom(300_000)
    config_digest = await push_blob(http, base, "local/app", EMPTY)
    layer_digest = await push_blob(http, base, "local/app", layer)
    manifest = image_manifest(EMPTY, [layer])
    response = await push_manifest(http, base, "local/app", "1.0", manifest)
    assert response.status == 201
    digest = sha256(manifest)
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Location"] == f"/v2/local/app/manifests/{digest.replace(':', '%3A')}"
    for reference in ("1.0", digest):
        status, body, headers = await fetch(http, f"{base}/v2/local/app/manifests/{reference}")
        assert (status, body, headers["Docker-Content-Digest"]) == (200, manifest, digest)
        assert headers["Content-Type"] == OCI_MANIFEST
    async with http.head(f"{base}/v2/local/app/manifests/1.0") as head:
        assert head.status == 200 and head.headers["Content-Length"] == str(len(manifest))
    status, body, _ = await fetch(http, f"{base}/v2/local/app/blobs/{layer_digest}")
    assert (status, body) == (200, layer)
    status, body, _ = await fetch(
        http, f"{base}/v2/local/app/blobs/{layer_digest}", Range="bytes=10-19"
    )
    assert (status, body) == (206, layer[10:20])
    assert (await fetch(http, f"{base}/v2/local/app/blobs/{config_digest}"))[1] == EMPTY


async def test_pulls_of_what_was_not_pushed_are_404_with_oci_errors(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    async with http.get(f"{base}/v2/local/none/manifests/latest") as response:
        assert response.status == 404 and await _error(response) == "MANIFEST_UNKNOWN"
    async with http.get(f"{base}/v2/local/none/blobs/{sha256(b'x')}") as response:
        assert response.status == 404 and await _error(response) == "BLOB_UNKNOWN"
    async with http.get(f"{base}/v2/local/none/tags/list") as response:
        assert response.status == 404 and await _error(response) == "NAME_UNKNOWN"
    # A blob pushed to one repository is not another's until mounted there.
    digest = await push_blob(http, base, "local/one", b"only in one")
    async with http.get(f"{base}/v2/local/two/blobs/{digest}") as response:
        assert response.status == 404


async def test_post_only_monolithic_upload(hosted: Mirror, http: aiohttp.ClientSession) -> None:
    data = os.urandom(5000)
    url = f"{hosted.url}/v2/local/app/blobs/uploads/?digest={sha256(data)}"
    async with http.post(
        url, data=data, headers={"Content-Type": "application/octet-stream"}
    ) as response:
        assert response.status == 201, await response.text()
        assert response.headers["Location"] == f"/v2/local/app/blobs/{sha256(data)}"
    assert (await fetch(http, f"{hosted.url}/v2/local/app/blobs/{sha256(data)}"))[1] == data


async def test_chunked_upload_with_status_and_an_out_of_order_chunk(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    data = os.urandom(3 * 1024 * 1024 + 17)
    async with http.post(f"{base}/v2/local/chunks/blobs/uploads/") as response:
        location = response.headers["Location"]
        assert response.headers["Range"] == "0-0"
    step = 1024 * 1024
    for start in range(0, len(data), step):
        chunk = data[start : start + step]
        headers = {
            "Content-Range": f"{start}-{start + len(chunk) - 1}",
            "Content-Type": "application/octet-stream",
        }
        async with http.patch(f"{base}{location}", data=chunk, headers=headers) as response:
            assert response.status == 202, await response.text()
            assert response.headers["Range"] == f"0-{start + len(chunk) - 1}"
            location = response.headers["Location"]
        if start == step:  # a chunk that does not start where the upload ends
            bad = {"Content-Range": "5-9", "Content-Type": "application/octet-stream"}
            async with http.patch(f"{base}{location}", data=b"12345", headers=bad) as response:
                assert response.status == 416
    async with http.get(f"{base}{location}") as response:
        assert response.status == 204
        assert response.headers["Range"] == f"0-{len(data) - 1}"
    async with http.put(f"{base}{location}?digest={sha256(data)}") as response:
        assert response.status == 201, await response.text()
    assert (await fetch(http, f"{base}/v2/local/chunks/blobs/{sha256(data)}"))[1] == data


async def test_streamed_upload_without_content_range(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    data = os.urandom(2 * 1024 * 1024)

    async def body() -> Any:
        for start in range(0, len(data), 100_000):
            yield data[start : start + 100_000]

    async with http.post(f"{base}/v2/local/stream/blobs/uploads/") as response:
        location = response.headers["Location"]
    async with http.patch(f"{base}{location}", data=body()) as response:  # chunked encoding
        assert response.status == 202
        location = response.headers["Location"]
    async with http.put(f"{base}{location}?digest={sha256(data)}") as response:
        assert response.status == 201
    assert (await fetch(http, f"{base}/v2/local/stream/blobs/{sha256(data)}"))[1] == data


async def test_a_wrong_digest_keeps_nothing(hosted: Mirror, http: aiohttp.ClientSession) -> None:
    base = hosted.url
    async with http.post(f"{base}/v2/local/bad/blobs/uploads/") as response:
        location = response.headers["Location"]
    wrong = sha256(b"something else")
    async with http.put(f"{base}{location}?digest={wrong}", data=b"these bytes") as response:
        assert response.status == 400 and await _error(response) == "DIGEST_INVALID"
    for digest in (wrong, sha256(b"these bytes")):
        async with http.head(f"{base}/v2/local/bad/blobs/{digest}") as response:
            assert response.status == 404
    async with http.get(f"{base}{location}") as response:  # the upload is gone
        assert response.status == 404 and await _error(response) == "BLOB_UPLOAD_UNKNOWN"


async def test_cancel_an_upload(hosted: Mirror, http: aiohttp.ClientSession) -> None:
    base = hosted.url
    async with http.post(f"{base}/v2/local/cancel/blobs/uploads/") as response:
        location = response.headers["Location"]
    async with http.delete(f"{base}{location}") as response:
        assert response.status == 204
    async with http.get(f"{base}{location}") as response:
        assert response.status == 404 and await _error(response) == "BLOB_UPLOAD_UNKNOWN"
    async with http.delete(f"{base}{location}") as response:
        assert response.status == 404


async def test_mounts_from_a_repository_without_from_and_of_the_unknown(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    digest = await push_blob(http, base, "local/source", b"shared layer")
    url = f"{base}/v2/local/target/blobs/uploads/?mount={digest}&from=local/source"
    async with http.post(url) as response:
        assert response.status == 201
        assert response.headers["Location"] == f"/v2/local/target/blobs/{digest}"
    assert (await fetch(http, f"{base}/v2/local/target/blobs/{digest}"))[1] == b"shared layer"
    async with http.post(f"{base}/v2/local/third/blobs/uploads/?mount={digest}") as response:
        assert response.status == 201  # without from: any repository holding it
    unknown = sha256(b"never pushed")
    async with http.post(
        f"{base}/v2/local/target/blobs/uploads/?mount={unknown}&from=local/source"
    ) as response:
        assert response.status == 202  # not mountable: an upload begins instead
        assert "/blobs/uploads/" in response.headers["Location"]


async def test_manifest_push_by_digest_with_tags_and_what_is_refused(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    await push_blob(http, base, "local/m", EMPTY)
    layer = os.urandom(1000)
    manifest = image_manifest(EMPTY, [layer])
    response = await push_manifest(http, base, "local/m", sha256(manifest), manifest)
    assert response.status == 400  # its layer was never pushed
    await push_blob(http, base, "local/m", layer)
    response = await push_manifest(
        http, base, "local/m", sha256(manifest), manifest, query="?tag=a&tag=b"
    )
    assert response.status == 201
    for tag in ("a", "b"):
        assert (await fetch(http, f"{base}/v2/local/m/manifests/{tag}"))[1] == manifest
    response = await push_manifest(http, base, "local/m", sha256(b"other"), manifest)
    assert response.status == 400  # the digest in the URL is not the body's
    response = await push_manifest(http, base, "local/m", "x", b"not json")
    assert response.status == 400
    response = await push_manifest(http, base, "local/m", "x", manifest, media_type="text/plain")
    assert response.status == 400


async def test_a_large_index_with_many_entries(hosted: Mirror, http: aiohttp.ClientSession) -> None:
    base = hosted.url
    await push_blob(http, base, "local/big", EMPTY)
    children = []
    for n in range(40):
        child = image_manifest(EMPTY, [], annotations={"n": str(n), "pad": "x" * 20_000})
        response = await push_manifest(http, base, "local/big", sha256(child), child)
        assert response.status == 201
        children.append({"mediaType": OCI_MANIFEST, "digest": sha256(child), "size": len(child)})
    index = json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children * 300}
    ).encode()
    assert len(index) > 1024 * 1024
    response = await push_manifest(http, base, "local/big", "all", index, OCI_INDEX)
    assert response.status == 201
    status, body, headers = await fetch(http, f"{base}/v2/local/big/manifests/all")
    assert (status, body, headers["Content-Type"]) == (200, index, OCI_INDEX)


async def test_tags_list_pagination(hosted: Mirror, http: aiohttp.ClientSession) -> None:
    base = hosted.url
    await push_blob(http, base, "local/tags", EMPTY)
    manifest = image_manifest(EMPTY, [])
    names = [f"t{n:02d}" for n in range(12)]
    for tag in reversed(names):
        assert (await push_manifest(http, base, "local/tags", tag, manifest)).status == 201
    status, body, _ = await fetch(http, f"{base}/v2/local/tags/tags/list")
    assert json.loads(body) == {"name": "local/tags", "tags": names}
    seen: list[str] = []
    url: str | None = f"{base}/v2/local/tags/tags/list?n=5"
    while url is not None:
        status, body, headers = await fetch(http, url)
        assert status == 200
        seen += json.loads(body)["tags"]
        link = headers.get("Link")
        url = base + link.split(">")[0].lstrip("<") if link else None
    assert seen == names
    status, body, _ = await fetch(http, f"{base}/v2/local/tags/tags/list?n=3&last=t05")
    assert json.loads(body)["tags"] == ["t06", "t07", "t08"]


async def test_referrers_with_subject_and_artifact_type_filter(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    await push_blob(http, base, "local/ref", EMPTY)
    subject = image_manifest(EMPTY, [])
    await push_manifest(http, base, "local/ref", "1", subject)
    subject_descriptor = {
        "mediaType": OCI_MANIFEST,
        "digest": sha256(subject),
        "size": len(subject),
    }
    signature = image_manifest(
        EMPTY,
        [],
        artifactType="application/vnd.example.signature",
        subject=subject_descriptor,
        annotations={"org.example.signed-by": "ci"},
    )
    sbom = image_manifest(
        EMPTY, [], artifactType="application/vnd.example.sbom", subject=subject_descriptor
    )
    for document in (signature, sbom):
        response = await push_manifest(http, base, "local/ref", sha256(document), document)
        assert response.status == 201
        assert response.headers["OCI-Subject"] == sha256(subject)
    status, body, headers = await fetch(http, f"{base}/v2/local/ref/referrers/{sha256(subject)}")
    assert status == 200 and headers["Content-Type"] == OCI_INDEX
    listed = json.loads(body)["manifests"]
    assert sorted(d["digest"] for d in listed) == sorted([sha256(signature), sha256(sbom)])
    signed = next(d for d in listed if d["digest"] == sha256(signature))
    assert signed["artifactType"] == "application/vnd.example.signature"
    assert signed["annotations"] == {"org.example.signed-by": "ci"}
    url = (
        f"{base}/v2/local/ref/referrers/{sha256(subject)}?artifactType=application/vnd.example.sbom"
    )
    status, body, headers = await fetch(http, url)
    assert [d["digest"] for d in json.loads(body)["manifests"]] == [sha256(sbom)]
    assert headers["OCI-Filters-Applied"] == "artifactType"
    status, body, _ = await fetch(http, f"{base}/v2/local/ref/referrers/{sha256(b'none')}")
    assert status == 200 and json.loads(body)["manifests"] == []


async def test_deleting_tags_manifests_and_blobs(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    layer_digest = await push_blob(http, base, "local/del", b"layer to delete")
    await push_blob(http, base, "local/del", EMPTY)
    manifest = image_manifest(EMPTY, [b"layer to delete"])
    await push_manifest(http, base, "local/del", "keep", manifest)
    await push_manifest(http, base, "local/del", "drop", manifest)
    async with http.delete(f"{base}/v2/local/del/manifests/drop") as response:
        assert response.status == 202
    assert (await fetch(http, f"{base}/v2/local/del/manifests/drop"))[0] == 404
    assert (await fetch(http, f"{base}/v2/local/del/manifests/keep"))[0] == 200
    async with http.delete(f"{base}/v2/local/del/manifests/{sha256(manifest)}") as response:
        assert response.status == 202
    for reference in ("keep", sha256(manifest)):
        assert (await fetch(http, f"{base}/v2/local/del/manifests/{reference}"))[0] == 404
    async with http.delete(f"{base}/v2/local/del/blobs/{layer_digest}") as response:
        assert response.status == 202
    assert (await fetch(http, f"{base}/v2/local/del/blobs/{layer_digest}"))[0] == 404
    async with http.delete(f"{base}/v2/local/del/blobs/{layer_digest}") as response:
        assert response.status == 404 and await _error(response) == "BLOB_UNKNOWN"


async def test_sha512_blobs_and_manifests(hosted: Mirror, http: aiohttp.ClientSession) -> None:
    base = hosted.url
    data = os.urandom(10_000)
    url = f"{base}/v2/local/sha512/blobs/uploads/?digest={sha512(data)}"
    async with http.post(url, data=data) as response:
        assert response.status == 201
        assert response.headers["Docker-Content-Digest"] == sha512(data)
    assert (await fetch(http, f"{base}/v2/local/sha512/blobs/{sha512(data)}"))[1] == data
    await push_blob(http, base, "local/sha512", EMPTY)
    manifest = image_manifest(EMPTY, [])
    response = await push_manifest(http, base, "local/sha512", sha512(manifest), manifest)
    assert response.status == 201 and response.headers["Docker-Content-Digest"] == sha512(manifest)
    assert (await fetch(http, f"{base}/v2/local/sha512/manifests/{sha512(manifest)}"))[
        1
    ] == manifest


async def test_writes_to_a_mirrored_namespace_are_refused(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{hosted.url}/v2/docker.io/library/alpine/blobs/uploads/") as response:
        assert response.status == 405 and await _error(response) == "UNSUPPORTED"
    async with http.put(f"{hosted.url}/v2/library/alpine/manifests/x", data=b"{}") as response:
        assert response.status == 405


@pytest.mark.in_process
async def test_pushed_content_outlasts_eviction_and_restarts(
    make_mirror: MirrorFactory, upstream: Registry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A store bound of 1 MB, filled over and over by pulls: what was pushed stays; an
    upload begun before a restart is finished after it."""
    from tests.support.images import Pusher

    settings = {"docker.io": upstream.url, "local": {"hosted": True}}
    storage = tmp_path / "store"
    mirror = await make_mirror(settings, storage=storage, max_size="1MB")
    pushed = os.urandom(400_000)
    digest = await push_blob(http, mirror.url, "local/keep", pushed)
    async with http.post(f"{mirror.url}/v2/local/keep/blobs/uploads/") as response:
        location = response.headers["Location"]
    headers = {"Content-Range": "0-99", "Content-Type": "application/octet-stream"}
    half = os.urandom(200)
    async with http.patch(f"{mirror.url}{location}", data=half[:100], headers=headers) as response:
        assert response.status == 202
    pusher = Pusher(upstream.url)
    for _ in range(6):  # 6 x 300 KB pulled through: far past the bound
        layer = os.urandom(300_000)
        layer_digest = pusher.push_blob("evict/me", layer)
        status, body, _ = await fetch(
            http, f"{mirror.url}/v2/docker.io/evict/me/blobs/{layer_digest}"
        )
        assert (status, body) == (200, layer)
    await mirror.stop()
    again = await make_mirror(settings, storage=storage, max_size="1MB")
    assert (await fetch(http, f"{again.url}/v2/local/keep/blobs/{digest}"))[1] == pushed
    headers = {"Content-Range": "100-199", "Content-Type": "application/octet-stream"}
    async with http.patch(f"{again.url}{location}", data=half[100:], headers=headers) as response:
        assert response.status == 202
    async with http.put(f"{again.url}{location}?digest={sha256(half)}") as response:
        assert response.status == 201


async def test_the_hosted_bound_refuses_pushes_past_it(
    make_mirror: MirrorFactory, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror(
        {"docker.io": upstream.url, "local": {"hosted": True}},
        storage_settings={"hosted_max_size": "1MB"},
    )
    first = os.urandom(600_000)
    await push_blob(http, mirror.url, "local/full", first)
    second = os.urandom(600_000)
    url = f"{mirror.url}/v2/local/full/blobs/uploads/?digest={sha256(second)}"
    async with http.post(url, data=second) as response:
        assert response.status == 413 and await _error(response) == "DENIED"
        assert "hosted_max_size" in (await response.json())["errors"][0]["message"]
    async with http.head(f"{mirror.url}/v2/local/full/blobs/{sha256(second)}") as response:
        assert response.status == 404
    assert (await fetch(http, f"{mirror.url}/v2/local/full/blobs/{sha256(first)}"))[1] == first


async def test_pushes_need_the_push_grant(
    make_mirror: MirrorFactory, upstream: Registry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    access = _access(
        tmp_path,
        {"builder": "s3cret", "reader": "r3ad"},
        {"repositories": ["local/*"], "users": ["builder"], "actions": ["push"]},
        {"repositories": ["local/*"], "anonymous": True, "actions": ["pull"]},
    )
    mirror = await make_mirror(
        {"docker.io": upstream.url, "local": {"hosted": True}}, access=access
    )
    url = f"{mirror.url}/v2/local/app/blobs/uploads/"
    async with http.post(url) as response:
        assert response.status == 401 and await _error(response) == "UNAUTHORIZED"
        assert "push" in response.headers["WWW-Authenticate"]
    reader = {"Authorization": aiohttp.encode_basic_auth("reader", "r3ad")}
    async with http.post(url, headers=reader) as response:
        assert response.status == 403 and await _error(response) == "DENIED"
    builder = {"Authorization": aiohttp.encode_basic_auth("builder", "s3cret")}
    async with http.post(url, headers=builder) as response:
        assert response.status == 202
    data = b"pushed by builder"
    async with http.post(f"{url}?digest={sha256(data)}", data=data, headers=builder) as response:
        assert response.status == 201
    async with http.get(f"{mirror.url}/v2/local/app/blobs/{sha256(data)}") as response:
        assert (response.status, await response.read()) == (200, data)  # anyone may pull


@pytest.mark.in_process
async def test_gc_unlinks_blobs_no_manifest_refers_to(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    import time

    from mirror.app import CORE

    base = hosted.url
    loose = await push_blob(http, base, "local/gc", b"never referenced")
    await push_blob(http, base, "local/gc", EMPTY)
    used = await push_blob(http, base, "local/gc", b"referenced layer")
    await push_manifest(http, base, "local/gc", "1", image_manifest(EMPTY, [b"referenced layer"]))
    collector = hosted.app[CORE].hosted
    assert collector is not None
    assert collector.collect(time.time()) == (0, 0)  # within the grace a push needs
    assert collector.collect(time.time() + 7200, dry_run=True) == (1, 0)
    assert collector.collect(time.time() + 7200) == (1, 0)
    assert (await fetch(http, f"{base}/v2/local/gc/blobs/{loose}"))[0] == 404
    assert (await fetch(http, f"{base}/v2/local/gc/blobs/{used}"))[0] == 200
    assert (await fetch(http, f"{base}/v2/local/gc/manifests/1"))[0] == 200


async def test_concurrent_pushes_of_one_blob_and_one_manifest(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    import asyncio

    base = hosted.url
    data = os.urandom(2 * 1024 * 1024)

    async def push_whole(repo: str) -> int:
        url = f"{base}/v2/{repo}/blobs/uploads/?digest={sha256(data)}"
        async with http.post(url, data=data) as response:
            return response.status

    statuses = await asyncio.gather(*(push_whole(f"local/same{n % 3}") for n in range(12)))
    assert statuses == [201] * 12
    for n in range(3):
        assert (await fetch(http, f"{base}/v2/local/same{n}/blobs/{sha256(data)}"))[1] == data
    await push_blob(http, base, "local/same0", EMPTY)
    manifest = image_manifest(EMPTY, [data])
    responses = await asyncio.gather(
        *(push_manifest(http, base, "local/same0", f"t{n}", manifest) for n in range(8))
    )
    assert [r.status for r in responses] == [201] * 8
    for n in range(8):
        assert (await fetch(http, f"{base}/v2/local/same0/manifests/t{n}"))[1] == manifest


async def test_what_the_conformance_suite_asks_of_edges(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    base = hosted.url
    # a manifest no tag can name: unknown (404), by GET and HEAD, hosted or mirrored
    for name in ("local/conf", "library/alpine"):
        url = f"{base}/v2/{name}/manifests/.INVALID_MANIFEST_NAME"
        async with http.get(url) as response:
            assert response.status == 404 and await _error(response) == "MANIFEST_UNKNOWN"
        async with http.head(url) as response:
            assert response.status == 404
    data = os.urandom(2048)
    digest = await push_blob(http, base, "local/conf", data)
    async with http.get(
        f"{base}/v2/local/conf/blobs/{digest}", headers={"Range": "bytes=500-0"}
    ) as response:
        assert response.status == 416
    # If-None-Match names a digest the repository does not hold: still 404
    other = sha256(b"not here")
    async with http.get(
        f"{base}/v2/local/conf/blobs/{other}", headers={"If-None-Match": f'"{other}"'}
    ) as response:
        assert response.status == 404
    # a non-distributable layer is not pushed: the manifest is taken all the same
    await push_blob(http, base, "local/conf", EMPTY)
    foreign = {
        "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "digest": sha256(b"elsewhere"),
        "size": 9,
        "urls": ["https://example.invalid/layer"],
    }
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": EMPTY_TYPE, "digest": sha256(EMPTY), "size": 2},
            "layers": [foreign],
        }
    ).encode()
    assert (await push_manifest(http, base, "local/conf", "foreign", manifest)).status == 201
    # ...but only a layer with its urls: a config is always pushed
    odd = json.loads(manifest)
    odd["config"] = {
        "mediaType": "application/x-foreign-config",
        "digest": sha256(b"no"),
        "size": 2,
    }
    odd["layers"] = []
    odd_bytes = json.dumps(odd).encode()
    assert (await push_manifest(http, base, "local/conf", "odd", odd_bytes)).status == 400
    # ?tag= answers an OCI-Tag for each tag taken
    plain = image_manifest(EMPTY, [])
    url = f"{base}/v2/local/conf/manifests/{sha256(plain)}?tag=p1&tag=p2"
    async with http.put(url, data=plain, headers={"Content-Type": OCI_MANIFEST}) as response:
        assert response.status == 201
        assert response.headers.getall("OCI-Tag") == ["p1", "p2"]
    # a manifest past the bound: 413 with an OCI error body
    huge = b'{"schemaVersion": 2, "pad": "' + b"x" * (9 * 1024 * 1024) + b'"}'
    async with http.put(
        f"{base}/v2/local/conf/manifests/huge", data=huge, headers={"Content-Type": OCI_MANIFEST}
    ) as response:
        assert response.status == 413 and await _error(response) == "MANIFEST_INVALID"
    # an upload started with ns= is continued at the Location given
    async with http.post(f"{base}/v2/team/app/blobs/uploads/?ns=local") as response:
        assert response.status == 202
        location = response.headers["Location"]
        assert location.endswith("?ns=local")
    chunk = b"via ns"
    async with http.put(f"{base}{location}&digest={sha256(chunk)}", data=chunk) as response:
        assert response.status == 201


async def test_one_upload_one_writer_and_one_spelling(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    import asyncio

    base = hosted.url
    async with http.post(f"{base}/v2/local/race/blobs/uploads/") as response:
        location = response.headers["Location"]
    upload = location.rsplit("/", 1)[1]
    async with http.get(f"{base}/v2/local/race/blobs/uploads/{upload.upper()}") as response:
        assert response.status == 404  # the id as the mirror spells it, no other
    chunk = os.urandom(4 * 1024 * 1024)
    headers = {"Content-Range": f"0-{len(chunk) - 1}", "Content-Type": "application/octet-stream"}

    async def patch() -> int:
        async with http.patch(f"{base}{location}", data=chunk, headers=headers) as response:
            return response.status

    assert sorted(await asyncio.gather(patch(), patch())) == [202, 416]
    async with http.get(f"{base}{location}") as response:
        assert response.headers["Range"] == f"0-{len(chunk) - 1}"


async def test_the_hosted_bound_holds_for_pushes_at_once_and_open_uploads(
    make_mirror: MirrorFactory, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    import asyncio

    mirror = await make_mirror(
        {"docker.io": upstream.url, "local": {"hosted": True}},
        storage_settings={"hosted_max_size": "2MB"},
    )
    blobs = [os.urandom(800_000) for _ in range(4)]

    async def push(n: int) -> int:
        url = f"{mirror.url}/v2/local/b{n}/blobs/uploads/?digest={sha256(blobs[n])}"
        async with http.post(url, data=blobs[n]) as response:
            return response.status

    statuses = await asyncio.gather(*(push(n) for n in range(4)))
    assert statuses.count(201) == 2 and statuses.count(413) == 2
    kept = 0
    for n in range(4):
        async with http.head(f"{mirror.url}/v2/local/b{n}/blobs/{sha256(blobs[n])}") as response:
            kept += response.status == 200
    assert kept == 2
    # An upload left open counts too: it holds room a later push cannot take.
    async with http.post(f"{mirror.url}/v2/local/open/blobs/uploads/") as response:
        location = response.headers["Location"]
    headers = {"Content-Range": "0-299999", "Content-Type": "application/octet-stream"}
    async with http.patch(
        f"{mirror.url}{location}", data=os.urandom(300_000), headers=headers
    ) as response:
        assert response.status == 202
    late = os.urandom(150_000)  # 1.6 MB pushed + 0.3 MB open + 0.15 MB > 2 MB
    url = f"{mirror.url}/v2/local/late/blobs/uploads/?digest={sha256(late)}"
    async with http.post(url, data=late) as response:
        assert response.status == 413
    async with http.delete(f"{mirror.url}{location}") as response:
        assert response.status == 204
    async with http.post(url, data=late) as response:
        assert response.status == 201  # the room the cancelled upload held


async def test_a_mount_takes_only_from_repositories_the_client_may_pull(
    make_mirror: MirrorFactory, upstream: Registry, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    access = _access(
        tmp_path,
        {"alice": "a", "bob": "b"},
        {"repositories": ["local/alice/*"], "users": ["alice"], "actions": ["pull", "push"]},
        {"repositories": ["local/secret/*"], "users": ["bob"], "actions": ["pull", "push"]},
    )
    mirror = await make_mirror(
        {"docker.io": upstream.url, "local": {"hosted": True}}, access=access
    )
    alice = {"Authorization": aiohttp.encode_basic_auth("alice", "a")}
    bob = {"Authorization": aiohttp.encode_basic_auth("bob", "b")}
    secret = b"bob's secret layer"
    url = f"{mirror.url}/v2/local/secret/app/blobs/uploads/?digest={sha256(secret)}"
    async with http.post(url, data=secret, headers=bob) as response:
        assert response.status == 201
    uploads = f"{mirror.url}/v2/local/alice/x/blobs/uploads/?mount={sha256(secret)}"
    for query in ("", "&from=local/secret/app"):
        async with http.post(uploads + query, headers=alice) as response:
            assert response.status == 202  # not mounted: an upload begins, as for any blob
    async with http.get(
        f"{mirror.url}/v2/local/alice/x/blobs/{sha256(secret)}", headers=alice
    ) as response:
        assert response.status == 404
    async with http.post(f"{uploads}&from=local/secret/app", headers=bob) as response:
        assert response.status == 403  # bob may not push to alice's repositories


@pytest.mark.in_process
async def test_a_blob_pushed_or_looked_for_again_starts_its_grace_anew(
    hosted: Mirror, http: aiohttp.ClientSession
) -> None:
    import time

    from mirror.app import CORE

    base = hosted.url
    digest = await push_blob(http, base, "local/again", b"an old layer")
    collector = hosted.app[CORE].hosted
    assert collector is not None
    for again in ("push", "head"):
        collector.index._run("UPDATE blobs SET linked = 0")  # as if pushed long ago
        assert collector.collect(time.time(), dry_run=True) == (1, 0)
        if again == "push":
            await push_blob(http, base, "local/again", b"an old layer")
        else:
            async with http.head(f"{base}/v2/local/again/blobs/{digest}") as response:
                assert response.status == 200
        assert collector.collect(time.time(), dry_run=True) == (0, 0)
    # gc read its list, then the blob was looked for: the unlink does not take it
    collector.index._run("UPDATE blobs SET linked = 0")
    listed = collector.index.unreferenced_blobs(time.time() - 3600)
    assert listed == [("local/again", digest)]
    collector.index.touch_blob("local/again", digest)
    assert not collector.index.unlink_blob("local/again", digest, time.time() - 3600)
