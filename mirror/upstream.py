"""The aiohttp client of one upstream registry: auth challenges, redirects, error mapping.

Redirects (a registry's 307 to object storage or a CDN) are followed by hand so that the
registry's `Authorization` header never travels to another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from .auth import Challenge, TokenCache, basic_header, parse_challenge
from .config import TimeoutConfig, UpstreamConfig
from .credentials import credentials_for
from .errors import (
    PASSED_THROUGH,
    Denied,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
)
from .metrics import Metrics

log = logging.getLogger("mirror.upstream")

REDIRECTS = (301, 302, 303, 307, 308)
# Docker Hub's pull-limit headers, kept per upstream as last seen.
RATELIMIT_HEADERS = {
    "ratelimit-limit": "ratelimit_limit",
    "ratelimit-remaining": "ratelimit_remaining",
}
MAX_REDIRECTS = 5
USER_AGENT = "mirror/0.1 (pull-through cache)"


class UpstreamClient:
    """Requests to one registry's /v2/ API, authenticated as it asks."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        timeouts: TimeoutConfig,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.name = config.name
        self._session = session
        self._timeouts = timeouts
        self._metrics = metrics
        self.health = metrics.upstream(config.name)
        self._login = credentials_for(config, session, metrics)
        self._tokens = TokenCache(config, session, metrics, self._login)
        self._challenge: Challenge | None = None  # learned from the first 401
        # Bounds the blob transfers running at once from this upstream.
        self.transfer_slots = asyncio.Semaphore(config.max_transfers)

    def _timeout(self, *, transfer: bool) -> aiohttp.ClientTimeout:
        total = (
            self._timeouts.transfer if transfer else self._timeouts.connect + self._timeouts.read
        )
        return aiohttp.ClientTimeout(
            total=total, connect=self._timeouts.connect, sock_read=self._timeouts.read
        )

    async def _credentials(self, scope: str, refused: str | None = None) -> str | None:
        """The Authorization header for `scope`, never the `refused` one again."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "bearer":
            token = refused.removeprefix("Bearer ") if refused else None
            return f"Bearer {await self._tokens.fetch(challenge, scope, refused=token)}"
        if challenge.scheme == "basic" and (pair := await self._login.get()) is not None:
            return basic_header(*pair)
        return None

    async def request(
        self,
        method: str,
        repository: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
        transfer: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send `method /v2/<repository>/<path>`; the caller reads and releases the answer.

        Network failures become UpstreamError (502) or UpstreamTimeout (504); HTTP error
        statuses are returned for the caller to map with `raise_for_status`.
        """
        url = f"{self.config.url}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        authorization = await self._credentials(scope)
        for attempt in range(2):
            response = await self._send(
                method, url, headers, params, authorization, transfer=transfer
            )
            if response.status != 401:
                return response
            challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
            response.release()
            if challenge is None or challenge.scheme not in ("bearer", "basic") or attempt == 1:
                break
            if challenge.scheme == "basic" and await self._login.get() is None:
                break
            self._challenge = Challenge(
                challenge.scheme,
                {k: v for k, v in challenge.params.items() if k in ("realm", "service")},
            )
            authorization = await self._credentials(scope, refused=authorization)
        raise UpstreamError(
            f"upstream {self.name} refused authorization for {scope}",
            detail={"upstream": self.name, "scope": scope},
        )

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        authorization: str | None,
        *,
        transfer: bool,
    ) -> aiohttp.ClientResponse:
        send_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        send_headers["User-Agent"] = USER_AGENT
        if authorization is not None:
            send_headers["Authorization"] = authorization
        origin = urlsplit(url).netloc
        try:
            for _ in range(MAX_REDIRECTS + 1):
                started = time.monotonic()
                response = await self._session.request(
                    method,
                    url,
                    headers=send_headers,
                    params=params,
                    allow_redirects=False,
                    timeout=self._timeout(transfer=transfer),
                )
                self._observe(method, response, time.monotonic() - started)
                location = response.headers.get("Location")
                if response.status not in REDIRECTS or location is None:
                    return response
                response.release()
                url = urljoin(url, location)
                params = None  # the Location carries its own query
                if urlsplit(url).netloc != origin:
                    send_headers.pop("Authorization", None)
                if response.status == 303:
                    method = "GET"
        except TimeoutError:
            self._failed(method, "timed out")
            raise UpstreamTimeout(
                f"upstream {self.name} timed out", detail={"upstream": self.name}
            ) from None
        except aiohttp.ClientError as exc:
            self._failed(method, f"unreachable: {type(exc).__name__}")
            raise UpstreamError(
                f"upstream {self.name} unreachable: {type(exc).__name__}",
                detail={"upstream": self.name},
            ) from None
        raise UpstreamError(f"upstream {self.name}: too many redirects")

    def _observe(self, method: str, response: aiohttp.ClientResponse, seconds: float) -> None:
        """Count the answer, time it, and keep what it says of health and rate limits."""
        self._metrics.upstream_requests.labels(self.name, method, str(response.status)).inc()
        self._metrics.upstream_latency.labels(self.name).observe(seconds)
        health = self.health
        health.reachable = response.status < 500
        health.last_error = "" if health.reachable else f"answered {response.status}"
        for header, attribute in RATELIMIT_HEADERS.items():
            value = response.headers.get(header)
            if value is not None:
                with contextlib.suppress(ValueError):
                    setattr(health, attribute, float(value.split(";")[0]))

    def _failed(self, method: str, why: str) -> None:
        self._metrics.upstream_requests.labels(self.name, method, "error").inc()
        self.health.reachable = False
        self.health.last_error = why

    async def raise_for_status(
        self, response: aiohttp.ClientResponse, not_found: type[RegistryError]
    ) -> None:
        """Map an upstream error answer to the error our client should see; release it."""
        if response.status < 400:
            return
        try:
            body = await response.read() if response.method != "HEAD" else b""
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            response.release()
        code, message, detail = _first_error(body)
        status = response.status
        if status == 404:
            error_type = PASSED_THROUGH.get(code or "", not_found)
            raise error_type(message, detail=detail)
        if status == 429:
            retry_after = response.headers.get("Retry-After")
            raise TooManyRequests(
                f"upstream {self.name} is rate-limiting this mirror",
                headers={"Retry-After": retry_after} if retry_after else None,
            )
        if status == 403:
            raise Denied(message or f"upstream {self.name} denied access", detail=detail)
        if status in (400,) and code in PASSED_THROUGH:
            raise PASSED_THROUGH[code](message, detail=detail)
        raise UpstreamError(
            f"upstream {self.name} answered {status}",
            detail={"upstream": self.name, "status": status},
        )


def _first_error(body: bytes) -> tuple[str | None, str | None, object]:
    """The first OCI error in an upstream's error body, if it has one."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        return str(first.get("code")), first.get("message"), first.get("detail")
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return None, None, None
