"""Which upstream, and which repository there, a request's name refers to."""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, UpstreamConfig
from .errors import NameInvalid, NameUnknown
from .reference import is_valid_name


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
