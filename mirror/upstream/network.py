"""How one upstream is reached: through which proxy, trusting which certificates.

An office's only way out is often a proxy, and its registries often have a private CA:
`HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (and their lower-case forms) are honoured by
default, `upstreams.<name>.proxy` overrides them for that upstream (its token realm and
its CDN redirects included), and `ca_file`, `cert_file`/`key_file` and `tls_verify` set
what TLS trusts and presents. No netrc is read: credentials come from the config only.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..config import UpstreamConfig, proxy_url

log = logging.getLogger("mirror.upstream")
DEFAULT_PORTS = {"http": 80, "https": 443}  # what NO_PROXY's host:port compares with


def bypasses(no_proxy: str, host: str, port: int | None) -> bool:
    """Whether NO_PROXY sends `host` straight there, as curl reads it: `*`, names (a
    leading `.` or `*.` or none: the name and its subdomains), `host:port`, IP addresses
    and CIDR networks, any case, a trailing dot ignored."""
    host = host.strip("[]").rstrip(".").lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry_port: int | None = None
        if entry.startswith("["):  # [v6]:port
            bracketed, _, rest = entry[1:].partition("]")
            entry, entry_port = bracketed, int(rest[1:]) if rest[1:].isdigit() else None
        elif entry.count(":") == 1:
            name, _, text = entry.partition(":")
            entry, entry_port = name, int(text) if text.isdigit() else None
        if entry_port is not None and entry_port != port:
            continue
        entry = entry.rstrip(".").removeprefix("*.").lstrip(".")
        if address is not None:
            try:
                if address in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                pass
            continue
        if host == entry or host.endswith("." + entry):
            return True
    return False


def environment_warnings(environ: Mapping[str, str]) -> list[str]:
    """Proxy variables that are set but are no http(s) proxy URL (socks, a typo): the
    mirror goes direct for them, which in an office means nowhere; say so at start-up,
    naming the variable, never its value (it may hold a password)."""
    return [
        f"{name} is set but is not an http:// or https:// proxy URL: ignored, upstreams "
        "are reached without it"
        for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")
        if environ.get(name) and proxy_url(environ[name]) is None
    ]


def _context(config: UpstreamConfig) -> ssl.SSLContext | bool:
    """What aiohttp's `ssl=` gets: True (the system's CAs), False, or a context."""
    if config.ca_file is None and config.cert_file is None:
        return config.tls_verify
    context = ssl.create_default_context()  # the system's CAs, and the upstream's own
    if not config.tls_verify:  # any certificate, but still our own client certificate
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.ca_file is not None:
        context.load_verify_locations(cafile=config.ca_file)
    if config.cert_file is not None and config.key_file is not None:
        context.load_cert_chain(config.cert_file, config.key_file)
    return context


class Network:
    """The proxy and TLS settings of one upstream, for each URL it sends the mirror to."""

    def __init__(self, config: UpstreamConfig, environ: Mapping[str, str]) -> None:
        # Read once, not per request. Lower-case forms win, as curl and Go do.
        self._proxy = proxy_url(config.proxy) if config.proxy is not None else None
        self._proxies = {
            scheme: proxy_url(value)  # None (direct) for a value that is no URL
            for scheme in ("http", "https")
            if (value := environ.get(f"{scheme}_proxy") or environ.get(f"{scheme.upper()}_PROXY"))
        }
        self._no_proxy = environ.get("no_proxy") or environ.get("NO_PROXY") or ""
        self.ssl = _context(config)
        if not config.tls_verify:
            log.warning(
                "upstream %s: tls_verify is false: ANY certificate is accepted, so anyone on "
                "the path can impersonate the registry; use ca_file for a private CA",
                config.name,
            )

    def proxy_for(self, url: str) -> str | None:
        if self._proxy is not None:
            return self._proxy
        parts = urlsplit(url)
        proxy = self._proxies.get(parts.scheme)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
        if proxy is None or bypasses(self._no_proxy, parts.hostname or "", port):
            return None
        return proxy

    def options(self, url: str) -> dict[str, Any]:
        """The proxy and TLS keyword arguments of an aiohttp request to `url`."""
        return {"proxy": self.proxy_for(url), "ssl": self.ssl}
