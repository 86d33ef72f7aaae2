"""The client behind a reverse proxy: its address, read from X-Forwarded-For.

Behind a load balancer every connection comes from the balancer, so the access rules by
network, the limit on failed logins and the access log would all see one address. For a
connection from an address in `trusted_proxies`, the header is read right to left: a hop
that is itself a trusted proxy hands the look on to the address before it, and the first
that is not is the client. A proxy appends the address it saw, so a client that sends the
header itself changes only what comes before its own address. From anyone else the header
is ignored.
"""

from __future__ import annotations

import ipaddress

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..config import Network, in_networks

FORWARDED_FOR = "X-Forwarded-For"


def client_address(
    peer: str | None, forwarded_for: str, trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: `peer`'s, unless `peer` is a trusted proxy that forwarded
    the request (`forwarded_for`: every X-Forwarded-For field, joined with commas)."""
    address = peer
    if not trusted or not forwarded_for:
        return address
    for hop in reversed(forwarded_for.split(",")):
        if not in_networks(address, trusted):
            break
        hop = hop.strip()
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # (not an address: the last trusted hop is as far as it can be told)
        address = hop
    return address


def forwarded_middleware(trusted: tuple[Network, ...]) -> Middleware:
    """Requests from a trusted proxy carry their client's address as `request.remote`."""

    @web.middleware
    async def forwarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        fields = request.headers.getall(FORWARDED_FOR, ())
        if fields:
            client = client_address(request.remote, ",".join(fields), trusted)
            if client is not None and client != request.remote:
                request = request.clone(remote=client)
        return await handler(request)

    return forwarded
