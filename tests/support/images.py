"""Images the tests make and push to a real registry: random layers, real tar.gz, real configs.

OCI and Docker schema2 manifests and multi-arch indexes, pushed with the distribution API,
so the upstream holds exactly what a registry would.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

Authorize = Callable[[str], str | None]  # scope -> Authorization header


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(size: int, name: str = "payload.bin", *, compress: bool = True) -> tuple[bytes, str]:
    """A tar (gzip'd unless told not to) holding one file of `size` random bytes;
    returns (blob, diff_id)."""
    payload = os.urandom(size)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(payload))
    tar_bytes = raw.getvalue()
    if not compress:
        return tar_bytes, sha256(tar_bytes)
    # Random bytes do not compress: level 1 keeps large layers quick to make.
    return gzip.compress(tar_bytes, compresslevel=1, mtime=0), sha256(tar_bytes)


def padded_manifest(image: Image, size: int) -> bytes:
    """`image`'s manifest with an annotation that brings it to exactly `size` bytes."""
    document = json.loads(image.manifest)
    document["annotations"] = {"org.example.padding": ""}
    base = len(json.dumps(document, indent=3).encode())
    document["annotations"]["org.example.padding"] = "p" * (size - base)
    data = json.dumps(document, indent=3).encode()
    assert len(data) == size
    return data


@dataclass
class Image:
    repository: str
    reference: str  # the tag it was pushed under
    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes (config, layers)
    children: list[Image] = field(default_factory=list)  # for an index

    @property
    def digest(self) -> str:
        return sha256(self.manifest)

    @property
    def layers(self) -> list[str]:
        return [d["digest"] for d in json.loads(self.manifest).get("layers", [])]

    def all_blobs(self) -> dict[str, bytes]:
        blobs = dict(self.blobs)
        for child in self.children:
            blobs |= child.all_blobs()
        return blobs


class Pusher:
    """Pushes blobs and manifests to a registry over HTTP."""

    def __init__(self, url: str, authorize: Authorize | None = None) -> None:
        self.url = url.rstrip("/")
        self._authorize = authorize

    def _request(
        self, method: str, url: str, repository: str, data: bytes | None = None, **headers: str
    ) -> Any:
        if self._authorize is not None:
            value = self._authorize(f"repository:{repository}:pull,push")
            if value:
                headers["Authorization"] = value
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        return urllib.request.urlopen(request, timeout=60)

    def push_blob(self, repository: str, data: bytes) -> str:
        digest = sha256(data)
        with self._request("POST", f"{self.url}/v2/{repository}/blobs/uploads/", repository) as r:
            location = r.headers["Location"]
        if location.startswith("/"):
            location = self.url + location
        separator = "&" if "?" in location else "?"
        with self._request(
            "PUT",
            f"{location}{separator}digest={digest}",
            repository,
            data,
            **{"Content-Type": "application/octet-stream"},
        ):
            pass
        return digest

    def push_manifest(self, repository: str, reference: str, data: bytes, media_type: str) -> str:
        url = f"{self.url}/v2/{repository}/manifests/{reference}"
        with self._request("PUT", url, repository, data, **{"Content-Type": media_type}):
            pass
        return sha256(data)

    def image(
        self,
        repository: str,
        tag: str,
        *,
        layer_sizes: tuple[int, ...] = (2048, 4096),
        docker: bool = False,
        architecture: str = "amd64",
        push_tag: bool = True,
        compress: bool = True,
    ) -> Image:
        """Make and push a single-platform image (OCI, or Docker schema2 with docker=True)."""
        blobs: dict[str, bytes] = {}
        layers, diff_ids = [], []
        for index, size in enumerate(layer_sizes):
            blob, diff_id = make_layer(size, f"layer{index}.bin", compress=compress)
            layers.append(blob)
            diff_ids.append(diff_id)
        config = json.dumps(
            {
                "architecture": architecture,
                "os": "linux",
                "config": {"Cmd": ["/layer0.bin"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
                "history": [{"created_by": "mirror tests"} for _ in layers],
            }
        ).encode()
        blobs[self.push_blob(repository, config)] = config
        for blob in layers:
            blobs[self.push_blob(repository, blob)] = blob
        layer_type = DOCKER_LAYER if docker else OCI_LAYER
        if not compress:
            layer_type = layer_type.removesuffix(".gzip").removesuffix("+gzip")
        media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "config": {
                    "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                    "digest": sha256(config),
                    "size": len(config),
                },
                "layers": [
                    {"mediaType": layer_type, "digest": sha256(b), "size": len(b)} for b in layers
                ],
            },
            indent=3,  # unusual spacing: a mirror that re-serialised would change the digest
        ).encode()
        reference = tag if push_tag else sha256(manifest)
        self.push_manifest(repository, reference, manifest, media_type)
        return Image(repository, tag, manifest, media_type, blobs)

    def index(
        self,
        repository: str,
        tag: str,
        architectures: tuple[str, ...] = ("amd64", "arm64"),
        *,
        docker: bool = False,
    ) -> Image:
        """Make and push a multi-arch index whose children are pushed by digest."""
        children = [
            self.image(repository, tag, docker=docker, architecture=arch, push_tag=False)
            for arch in architectures
        ]
        media_type = DOCKER_LIST if docker else OCI_INDEX
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": media_type,
                "manifests": [
                    {
                        "mediaType": child.media_type,
                        "digest": child.digest,
                        "size": len(child.manifest),
                        "platform": {"architecture": arch, "os": "linux"},
                    }
                    for child, arch in zip(children, architectures, strict=True)
                ],
            }
        ).encode()
        self.push_manifest(repository, tag, index, media_type)
        return Image(repository, tag, index, media_type, children=children)
