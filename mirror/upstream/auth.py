"""Upstream credentials: the Bearer token flow (Docker Hub, GHCR, Quay) and Basic.

A token is cached per (realm, service, scope) of one upstream, so a token granted for one
repository is never presented for another, and concurrent requests that need the same
token share one token request.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit

import aiohttp

from ..clock import Clock, system_clock
from ..config import UpstreamConfig
from ..errors import UpstreamError, UpstreamTimeout
from ..inflight import SingleFlight
from ..metrics import Metrics
from .addresses import AddressPolicy
from .bodies import TOKEN_LIMIT, describe, proxy_refusal, read_body, unavailable
from .credentials import Credentials
from .network import Network

log = logging.getLogger("mirror.auth")

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token server gives no expires_in
RENEW_MARGIN = 10.0  # seconds before expiry that a token is treated as gone
_PARAM_RE = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True)
class Challenge:
    """A parsed `WWW-Authenticate` header."""

    scheme: str  # lower case: "bearer" or "basic"
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str | None) -> Challenge | None:
    if not header:
        return None
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace(
            '\\"', '"'
        )
        for m in _PARAM_RE.finditer(rest)
    }
    return Challenge(scheme=scheme.lower(), params=params)


def may_send_credentials(registry_url: str, realm_url: str, auth_hosts: tuple[str, ...]) -> bool:
    """Credentials go to a token realm only on the registry's host, a subdomain of its parent
    domain (auth.docker.io for registry-1.docker.io), or a host the config names."""
    registry = (urlsplit(registry_url).hostname or "").lower()
    realm = (urlsplit(realm_url).hostname or "").lower()
    if not realm:
        return False
    if realm == registry or realm in (h.lower() for h in auth_hosts):
        return True
    try:
        ipaddress.ip_address(registry)
        return False  # an IP address has no parent domain
    except ValueError:
        pass
    labels = registry.split(".")
    # ghcr.io is its own parent; registry-1.docker.io's parent is docker.io
    parent = registry if len(labels) < 3 else ".".join(labels[1:])
    return realm == parent or realm.endswith("." + parent)


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


@dataclass
class _Token:
    value: str
    expires_at: float


class TokenCache:
    """Bearer tokens of one upstream, by (realm, service, scope)."""

    def __init__(
        self,
        upstream: UpstreamConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        credentials: Credentials,
        addresses: AddressPolicy,
        timeout: aiohttp.ClientTimeout,
        clock: Clock = system_clock,
        network: Network | None = None,
        down: Callable[[str], None] = lambda why: None,
    ) -> None:
        self._clock = clock
        self._down = down  # the token server is part of the upstream: it failing is it down
        self._network = network or Network(upstream, {})
        self._upstream = upstream
        self._addresses = addresses
        self._timeout = timeout
        self._session = session
        self._requests = metrics.token_requests
        self._credentials = credentials
        self._tokens: dict[tuple[str, str, str, str], _Token] = {}
        self._fetches: SingleFlight[tuple[str, str, str, str], _Token] = SingleFlight()

    def cached(self, challenge: Challenge, scope: str) -> str | None:
        key = self._key(challenge, scope)
        token = self._tokens.get(key)
        if token is None or token.expires_at <= self._clock():
            return None
        return token.value

    async def fetch(self, challenge: Challenge, scope: str, *, refused: str | None = None) -> str:
        """A valid token for `scope`, other than one the registry just `refused`.

        One token request however many callers ask at once: callers refused together all
        take the one renewed token.
        """
        key = self._key(challenge, scope)
        value = self.cached(challenge, scope)
        if value is not None and value != refused:
            return value
        token = await self._fetches.run(key, lambda: self._request(challenge, scope))
        return token.value

    def _key(self, challenge: Challenge, scope: str) -> tuple[str, str, str, str]:
        """(realm, service, scope, identity): a token is only ever reused for exactly
        what it was granted for, and to whom."""
        return (
            challenge.params.get("realm", ""),
            challenge.params.get("service", ""),
            scope,
            self._credentials.identity,
        )

    async def _request(self, challenge: Challenge, scope: str) -> _Token:
        try:
            token = await self._ask(challenge, scope)
        except UpstreamError:
            self._requests.labels(self._upstream.name, "failed").inc()
            raise
        self._requests.labels(self._upstream.name, "granted").inc()
        return token

    async def _ask(self, challenge: Challenge, scope: str) -> _Token:
        name = self._upstream.name
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise UpstreamError(f"upstream {name} sent an auth challenge without a usable realm")
        await self._addresses.check(realm, "token realm")
        params = {"scope": scope}
        if "service" in challenge.params:
            params["service"] = challenge.params["service"]
        headers = {}
        pair = await self._credentials.get()
        if pair is not None:
            if not may_send_credentials(self._upstream.url, realm, self._upstream.auth_hosts):
                raise UpstreamError(
                    f"upstream {name}: token realm host {urlsplit(realm).hostname} is not trusted "
                    "with credentials (add it to auth_hosts)"
                )
            headers["Authorization"] = basic_header(*pair)
        host = urlsplit(realm).netloc
        options = self._network.options(realm)
        try:
            async with self._session.get(
                realm,
                params=params,
                headers=headers,
                allow_redirects=False,
                timeout=self._timeout,
                **options,
            ) as response:
                refusal = proxy_refusal(response, options["proxy"])
                if refusal is not None or unavailable(response.status):
                    self._failed(host, refusal or f"the token server answered {response.status}")
                if response.status != 200:
                    raise UpstreamError(
                        f"upstream {name}: token request for {scope} refused "
                        f"(status {response.status})",
                        detail={"upstream": name, "host": host, "scope": scope},
                    )
                body = json.loads(await read_body(response, TOKEN_LIMIT, f"{name}: token"))
        except TimeoutError:
            why = f"the token server {host} gave no answer within the timeouts"
            self._failed(host, why, UpstreamTimeout)
        except aiohttp.ClientError as exc:
            self._failed(host, f"the token server {host}: {describe(exc)}")
        except ValueError:
            raise UpstreamError(f"upstream {name}: token server answered no JSON") from None
        value = body.get("token") or body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise UpstreamError(f"upstream {name}: token server answered without a token")
        lifetime = body.get("expires_in")
        if not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        log.debug("token for %s on %s, valid %ss", scope, name, lifetime)
        # Renew a little before the server's expiry, so no request carries a dying token.
        usable = float(lifetime) - min(RENEW_MARGIN, float(lifetime) / 4)
        token = _Token(value=value, expires_at=self._clock() + usable)
        # Kept before the shared fetch completes, so no late caller starts another one.
        self._tokens[self._key(challenge, scope)] = token
        return token

    def _failed(self, host: str, why: str, error: type[UpstreamError] = UpstreamError) -> NoReturn:
        """The token server could not be asked: the upstream is down until it can."""
        self._down(why)
        name = self._upstream.name
        raise error(
            f"upstream {name}: token request failed: {why}",
            detail={"upstream": name, "host": host, "cause": why},
        )
