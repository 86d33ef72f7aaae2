"""Where an upstream's username and password come from: the config, Amazon ECR's
GetAuthorizationToken, or an Azure AD refresh token exchanged at ACR's /oauth2/exchange.

Every source answers `get()` with the pair to present (as Basic on the registry, or as
Basic at the token realm), renewing it well before it expires; concurrent callers share
one renewal, and the old pair stays in use until the new one is there, so no request
fails at the changeover.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from ..config import AcrConfig, EcrConfig, UpstreamConfig
from ..errors import UpstreamError
from ..inflight import SingleFlight
from ..metrics import Metrics
from .bodies import TOKEN_LIMIT, describe, read_body
from .network import Network

log = logging.getLogger("mirror.credentials")

# A pair whose expiry is unknown or already past is reused this long at most, so neither a
# wrong clock nor an odd server can make every request fetch a new one.
MIN_REUSE_SECONDS = 5.0
ACR_USERNAME = "00000000-0000-0000-0000-000000000000"  # ACR's name for refresh-token logins
EXCHANGE_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=10, sock_read=30)
ACR_REUSE_SECONDS = 1800.0  # ACR refresh tokens live for hours: exchange every half hour


class Credentials(Protocol):
    """A source of the (username, password) an upstream is logged in with."""

    identity: str  # who logs in (never the secret): part of every token's cache key

    async def get(self) -> tuple[str, str] | None:
        """The pair to present now, or None for anonymous access."""


class StaticCredentials:
    """`username`/`password` (or `password_file`) from the config; none is anonymous."""

    def __init__(self, username: str | None, password: str | None) -> None:
        self._pair: tuple[str, str] | None = None
        self.identity = ""
        self.configured: tuple[str | None, str | None] = (None, None)
        self.replace(username, password)

    def replace(self, username: str | None, password: str | None) -> None:
        """New ones (SIGHUP after a rotation): the next login uses them."""
        self.configured = (username, password)
        self._pair = (username, password) if username and password is not None else None
        self.identity = username or ""

    async def get(self) -> tuple[str, str] | None:
        return self._pair


class RenewingCredentials:
    """A pair fetched from somewhere and renewed `renew_before` seconds before it expires."""

    def __init__(self, name: str, identity: str, renew_before: float, metrics: Metrics) -> None:
        self._name = name
        self._renewals = metrics.token_requests
        self.identity = identity
        self._renew_before = renew_before
        self._pair: tuple[str, str] | None = None
        self._renew_at = 0.0
        self._fetches: SingleFlight[str, tuple[str, str]] = SingleFlight()

    async def get(self) -> tuple[str, str] | None:
        if self._pair is not None and time.time() < self._renew_at:
            return self._pair
        return await self._fetches.run("pair", self._renew)

    async def _renew(self) -> tuple[str, str]:
        try:
            username, password, expires_at = await self._fetch()
        except UpstreamError:
            self._renewals.labels(self._name, "failed").inc()
            raise
        self._renewals.labels(self._name, "granted").inc()
        now = time.time()
        self._renew_at = max(expires_at - self._renew_before, now + MIN_REUSE_SECONDS)
        self._pair = (username, password)
        log.info(
            "credentials for %s renewed; next renewal in %.0fs", self._name, self._renew_at - now
        )
        return self._pair

    async def _fetch(self) -> tuple[str, str, float]:
        raise NotImplementedError


class EcrCredentials(RenewingCredentials):
    """Amazon ECR: GetAuthorizationToken with AWS credentials from the standard chain
    (environment, shared files, instance or task role), a 12-hour Basic pair."""

    def __init__(self, name: str, ecr: EcrConfig, metrics: Metrics) -> None:
        identity = f"ecr:{ecr.region}:{ecr.registry_id or 'default'}"
        super().__init__(name, identity, ecr.renew_before, metrics)
        self._ecr = ecr

    async def _fetch(self) -> tuple[str, str, float]:
        try:
            return await asyncio.to_thread(self._call)
        except UpstreamError:
            raise
        except Exception as exc:  # botocore's errors: no credentials, denied, unreachable
            raise UpstreamError(
                f"upstream {self._name}: ECR GetAuthorizationToken failed: {type(exc).__name__}"
            ) from None

    def _call(self) -> tuple[str, str, float]:
        import botocore.session

        session = botocore.session.get_session()
        client = session.create_client(
            "ecr", region_name=self._ecr.region, endpoint_url=self._ecr.endpoint_url
        )
        arguments: dict[str, Any] = {}
        if self._ecr.registry_id:
            arguments["registryIds"] = [self._ecr.registry_id]
        answer = client.get_authorization_token(**arguments)
        data = answer["authorizationData"][0]
        username, _, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
        expires = data.get("expiresAt")
        expires_at = expires.timestamp() if hasattr(expires, "timestamp") else 0.0
        return username, password, expires_at


class AcrCredentials(RenewingCredentials):
    """Azure Container Registry: an Azure AD refresh token (read from a file, which a
    sidecar or workload identity keeps fresh) exchanged for a registry refresh token."""

    def __init__(
        self,
        name: str,
        url: str,
        acr: AcrConfig,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        network: Network,
    ) -> None:
        super().__init__(name, ACR_USERNAME, 0.0, metrics)
        self._url = url
        self._acr = acr
        self._session = session
        self._network = network

    async def _fetch(self) -> tuple[str, str, float]:
        try:
            aad_token = Path(self._acr.refresh_token_file).read_text().strip()
        except OSError as exc:
            raise UpstreamError(
                f"upstream {self._name}: cannot read acr.refresh_token_file: {exc.strerror}"
            ) from None
        service = self._url.split("://", 1)[-1].split("/")[0]
        form = {"grant_type": "refresh_token", "service": service, "refresh_token": aad_token}
        if self._acr.tenant:
            form["tenant"] = self._acr.tenant
        exchange = self._acr.exchange_url or f"{self._url}/oauth2/exchange"
        try:
            async with self._session.post(
                exchange,
                data=form,
                allow_redirects=False,
                timeout=EXCHANGE_TIMEOUT,
                **self._network.options(exchange),
            ) as answer:
                if answer.status != 200:
                    raise UpstreamError(
                        f"upstream {self._name}: ACR token exchange refused ({answer.status})"
                    )
                what = f"upstream {self._name}: ACR token exchange"
                body = json.loads(await read_body(answer, TOKEN_LIMIT, what))
        except TimeoutError:
            raise UpstreamError(f"upstream {self._name}: ACR token exchange timed out") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(
                f"upstream {self._name}: ACR token exchange failed: {describe(exc)}"
            ) from None
        except ValueError:
            raise UpstreamError(f"upstream {self._name}: ACR exchange answered no JSON") from None
        token = body.get("refresh_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise UpstreamError(f"upstream {self._name}: ACR exchange gave no refresh_token")
        return ACR_USERNAME, token, time.time() + ACR_REUSE_SECONDS


def credentials_for(
    upstream: UpstreamConfig,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    network: Network,
) -> Credentials:
    """The credential source an upstream's config names (token requests are counted)."""
    if upstream.ecr is not None:
        return EcrCredentials(upstream.name, upstream.ecr, metrics)
    if upstream.acr is not None:
        return AcrCredentials(upstream.name, upstream.url, upstream.acr, session, metrics, network)
    return StaticCredentials(upstream.username, upstream.password)
