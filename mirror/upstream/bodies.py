"""Reading an upstream's answer: whole or not at all, up to a limit, exactly as long as it said.

Every body the mirror reads from an upstream into memory (manifests, tag lists, referrers,
error answers, tokens) goes through `read_body`, so no answer can make the mirror hold more
than its limit, and no answer cut short is taken for a whole one.
"""

from __future__ import annotations

import aiohttp

from ..errors import UpstreamError, UpstreamTimeout

MANIFEST_LIMIT = 4 * 1024 * 1024  # as distribution enforces on push
PAGE_LIMIT = 16 * 1024 * 1024  # a tags list or referrers answer (tens of thousands of tags)
TOKEN_LIMIT = 1024 * 1024  # a token server's JSON answer
ERROR_LIMIT = 64 * 1024  # an error body: only its first OCI error is read


class BodyTooLarge(UpstreamError):
    """An upstream answer over the limit for its kind: refused, never cut to fit."""


async def read_body(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of `response`, checked against its Content-Length.

    Raises BodyTooLarge past `limit` (before reading, when the length says so),
    UpstreamError when the body ends short or breaks, UpstreamTimeout when it stalls.
    """
    declared = response.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"{what} is {declared} bytes, over the {limit}-byte limit")
    parts: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"{what} is over the {limit}-byte limit")
            parts.append(chunk)
    except TimeoutError:
        raise UpstreamTimeout(f"{what} stalled after {size} bytes") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{what} broke after {size} bytes ({describe(exc)})") from None
    if declared is not None and size != declared:
        raise UpstreamError(f"{what} ended after {size} of {declared} bytes")
    return b"".join(parts)


async def read_error_body(response: aiohttp.ClientResponse) -> bytes:
    """An error answer's body, for its OCI error; empty when it is too large or breaks."""
    if response.method == "HEAD":
        return b""
    try:
        return await read_body(response, ERROR_LIMIT, "error body")
    except UpstreamError:
        return b""


def unavailable(status: int) -> bool:
    """Whether an answer says the service itself is down (a gateway with nothing behind it,
    or overloaded), not that one request failed: only these mark an upstream down, so one
    broken repository answering 500 does not cut the others off."""
    return status in (502, 503, 504)


def proxy_refusal(response: aiohttp.ClientResponse, proxy: str | None) -> str | None:
    """Why the outbound proxy, not the registry, refused a plain-HTTP request; None when it
    did not. A proxy wanting credentials answers 407; tinyproxy answers 401 with only a
    `Proxy-Authenticate` challenge, or (wrong credentials) a Basic challenge in its own
    name, and never the registry's API header."""
    if proxy is None or response.status not in (401, 407):
        return None
    headers = response.headers
    if response.status == 401:
        speaker = (headers.get("Server", "") + headers.get("WWW-Authenticate", "")).lower()
        from_registry = "Docker-Distribution-Api-Version" in headers
        if from_registry or not ("Proxy-Authenticate" in headers or "proxy" in speaker):
            return None
    if "@" in proxy.partition("://")[2].partition("/")[0]:
        return (
            f"the proxy refused its credentials (status {response.status}): check the user "
            "and password in its URL"
        )
    return f"the proxy wants credentials (status {response.status}): set them in its URL"


def describe(exc: BaseException) -> str:
    """A client failure in words an operator reads, not a class name."""
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        # Its address, never its URL (which may hold credentials): the detail's host is
        # the registry's, and an operator with several proxies must know which one.
        host = f"[{exc.host}]" if ":" in exc.host else exc.host
        return f"the proxy {host}:{exc.port} is unreachable"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        if exc.status == 407:
            return "the proxy wants credentials (status 407): set them in its URL"
        return f"the proxy refused the connection (status {exc.status})"
    text = str(exc)
    if isinstance(exc, OSError) and ("BAD_CERTIFICATE" in text or "CERTIFICATE_REQUIRED" in text):
        return "it refused this mirror's client certificate (or wants one: cert_file, key_file)"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "its name does not resolve"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not trusted"
    if isinstance(exc, aiohttp.ClientSSLError) or "[SSL" in text:
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection refused or unreachable ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the body was cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"malformed answer ({exc.message})"
    if isinstance(exc, aiohttp.InvalidURL):
        return "a URL it was given (or the proxy's) is not valid"
    # Never the exception's text: it may hold a URL, and a URL may hold credentials.
    return "the request could not be made"
