"""Which upstream, and which repository there, a request's name refers to."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, UpstreamConfig
from .errors import NameInvalid, NameUnknown
from .reference import is_valid_name, is_valid_tag, parse_digest


@dataclass(frozen=True)
class Route:
    upstream: UpstreamConfig
    repository: str  # the repository's name at the upstream


def resolve(config: Config, name: str, ns: str | None) -> Route:
    """Route `/v2/<name>/...`: by `?ns=`, then by a leading upstream name, then the default.

    An `ns` naming no configured upstream is refused: the mirror never contacts a host
    that is not in its configuration.
    """
    upstream: UpstreamConfig | None
    if ns is not None:
        upstream = config.upstream_named(ns)
        if upstream is None:
            raise NameUnknown(
                f"registry {ns!r} is not mirrored here", detail={"ns": ns, "name": name}
            )
        repository = name
    else:
        first, sep, rest = name.partition("/")
        upstream = config.upstream_named(first) if sep else None
        if upstream is not None:
            repository = rest
        else:
            upstream = config.upstreams[config.default_upstream]
            repository = name
    if not is_valid_name(repository):
        raise NameInvalid(f"invalid repository name {repository!r}", detail={"name": name})
    if upstream.docker_hub and "/" not in repository:
        repository = f"library/{repository}"
    return Route(upstream=upstream, repository=repository)


def route_image(config: Config, text: str) -> tuple[Route, str]:
    """An image reference as people write it (`alpine:3.20`, `docker.io/library/alpine`,
    `ghcr.io/org/img@sha256:...`) -> its route and its tag or digest (`latest` when it
    names neither). The registry must be a configured upstream: nothing else is asked."""
    text = text.strip()
    rest, _, digest = text.partition("@")
    first, sep, remainder = rest.partition("/")
    upstream = config.upstream_named(first) if sep else None
    if upstream is None and sep and ("." in first or ":" in first or first == "localhost"):
        raise NameUnknown(f"{text}: registry {first!r} is not one of the upstreams")
    name = remainder if upstream is not None else rest
    tag = "latest"
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
    if digest:
        if parse_digest(digest) is None:
            raise NameInvalid(f"{text}: {digest!r} is not a digest")
        reference = digest
    elif is_valid_tag(tag):
        reference = tag
    else:
        raise NameInvalid(f"{text}: {tag!r} is not a tag")
    prefix = f"{upstream.name}/" if upstream is not None else ""
    return resolve(config, prefix + name, None), reference


def image_name(route: Route, reference: str) -> str:
    """The full reference: `docker.io/library/alpine:3.20`, `ghcr.io/org/img@sha256:...`."""
    separator = "@" if parse_digest(reference) is not None else ":"
    return f"{route.upstream.name}/{route.repository}{separator}{reference}"
