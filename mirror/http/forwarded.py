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
UNKNOWN = "unknown"  # the client of an entry that names no address: in no network


def client_address(
    peer: str | None, forwarded_for: str, trusted: tuple[Network, ...]
) -> str | None:
    """The client's address: `peer`'s, unless `peer` is a trusted proxy that forwarded
    the request (`forwarded_for`: every X-Forwarded-For field, joined with commas). A hop
    that is no address (`unknown`, garbage) makes the client UNKNOWN, which no network
    holds: never the proxy's own address, which rules may favour."""
    address = peer
    if not trusted or not forwarded_for:
        return address
    for hop in reversed(forwarded_for.split(",")):
        if not in_networks(address, trusted):
            break
        address = _hop_address(hop)
    return address


def _hop_address(hop: str) -> str:
    """The address in one X-Forwarded-For entry, with or without a port (`192.0.2.7`,
    `192.0.2.7:41234`, `2001:db8::1`, `[2001:db8::1]:41234`); UNKNOWN when there is none."""
    text = hop.strip()
    if text.startswith("["):
        inner, closed, rest = text[1:].partition("]")
        if not closed or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return UNKNOWN
        text = inner
    elif text.count(":") == 1:
        text, _, port = text.partition(":")
        if not port.isdigit():
            return UNKNOWN
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return UNKNOWN


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
