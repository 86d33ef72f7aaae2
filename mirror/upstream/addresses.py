"""Which hosts an upstream may send the mirror to: no internal address it is not on itself.

A redirect or a token realm is the upstream telling the mirror where to connect. Followed
blindly, an upstream (or anyone who controls its answers) could make the mirror fetch from
loopback, link-local (cloud metadata) or private addresses and hand the answer to a client.
Such a target is refused unless the upstream itself lives on such an address (a lab or an
office registry) or the host is listed in the upstream's `auth_hosts`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from ..errors import UpstreamError


def _internal_ip(text: str) -> bool:
    try:
        address = ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
        or address.is_multicast
    )


async def is_internal(host: str) -> bool:
    """Whether `host` is, or resolves to, an address that is not on the public internet.
    A name that does not resolve is not internal here: connecting to it fails anyway."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host.split("%")[0])
        return _internal_ip(host)
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return any(_internal_ip(str(info[4][0])) for info in infos)


class AddressPolicy:
    """Checks the hosts one upstream sends the mirror to."""

    def __init__(self, upstream_url: str, allowed_hosts: tuple[str, ...]) -> None:
        self._upstream_host = (urlsplit(upstream_url).hostname or "").lower()
        self._allowed = {host.lower() for host in allowed_hosts}
        self._upstream_internal: bool | None = None  # looked up once, when first needed

    async def check(self, url: str, what: str) -> None:
        """Raise UpstreamError when `url` points at an internal address we may not go to."""
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise UpstreamError(f"upstream sent a {what} that is not an http(s) URL")
        if host == self._upstream_host or host in self._allowed:
            return
        if self._upstream_internal is None:
            self._upstream_internal = await is_internal(self._upstream_host)
        if self._upstream_internal:
            return  # an upstream on an internal network may send us around it
        if await is_internal(host):
            raise UpstreamError(
                f"upstream {self._upstream_host} sent a {what} to internal host {host}; "
                "refused (list it in auth_hosts to allow it)"
            )
