"""The client of one upstream registry: the only code that talks to it and reads its answers.

It offers typed calls (manifest HEAD and GET, a page GET, blob HEAD, a blob stream that
resumes with Range); the policy never sees an HTTP response. Redirects (a registry's 307 to
object storage or a CDN) are followed by hand so that the registry's `Authorization` header
never travels to another host, and never to an internal address the upstream is not on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import aiohttp
from multidict import CIMultiDict

from ..clock import Clock, system_clock
from ..config import TimeoutConfig, UpstreamConfig
from ..errors import (
    PASSED_THROUGH,
    BlobUnknown,
    Denied,
    RegistryError,
    TooManyRequests,
    UpstreamError,
    UpstreamTimeout,
)
from ..metrics import Metrics
from ..reference import Digest, digest_of, is_manifest_type, manifest_matches, parse_digest
from .addresses import AddressPolicy
from .auth import Challenge, TokenCache, basic_header, parse_challenge
from .bodies import (
    MANIFEST_LIMIT,
    PAGE_LIMIT,
    describe,
    proxy_refusal,
    read_body,
    read_error_body,
    unavailable,
)
from .breaker import Breaker
from .credentials import StaticCredentials, credentials_for
from .network import Network

log = logging.getLogger("mirror.upstream")

REDIRECTS = (301, 302, 303, 307, 308)
# Docker Hub's pull-limit headers, kept per upstream as last seen.
RATELIMIT_HEADERS = {
    "ratelimit-limit": "ratelimit_limit",
    "ratelimit-remaining": "ratelimit_remaining",
}
MAX_REDIRECTS = 5
MAX_RESUMES = 5  # Range requests to finish one blob transfer that keeps breaking
CHECK_IN_THREAD = 256 * 1024  # manifests at least this large are checked in a thread
USER_AGENT = "mirror/0.1 (pull-through cache)"


class ContentMismatch(UpstreamError):
    """The upstream sent bytes that are not what was asked for (wrong digest or length)."""


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest's exact bytes, its media type, and the digest computed over them."""

    digest: Digest
    media_type: str
    data: bytes


@dataclass(frozen=True)
class ManifestHead:
    """What a HEAD for a manifest said: its digest (when the upstream gave one), type, length."""

    digest: Digest | None
    media_type: str
    size: int | None


@dataclass(frozen=True)
class Page:
    """A passed-through JSON answer (tags list, referrers) and its `Link` to the next page."""

    body: bytes
    content_type: str
    next_query: str | None


class Upstream(Protocol):
    """What the policy may ask of an upstream: typed calls, never an HTTP response.
    UpstreamClient asks the registry; OfflineClient refuses."""

    name: str
    transfer_slots: asyncio.Semaphore  # bounds the blob transfers running at once

    def down(self) -> bool:
        """Whether it failed a moment ago (its answers would come late, or not at all)."""

    def renew_login(self, config: UpstreamConfig) -> bool:
        """Take `config`'s username and password (read again on SIGHUP); whether they
        changed."""

    async def head_manifest(
        self, repository: str, reference: str, accept: str, budget: float | None = None
    ) -> ManifestHead:
        """What a tag or digest points to (digest, type, length), without the body; an
        answer not there within `budget` seconds is an UpstreamTimeout."""

    async def get_manifest(
        self, repository: str, reference: str, accept: str, expected: Digest | None
    ) -> FetchedManifest:
        """A manifest's exact bytes, checked against its digest."""

    async def get_page(
        self,
        repository: str,
        path: str,
        params: Mapping[str, str],
        not_found: type[RegistryError],
    ) -> Page:
        """A tags list or referrers answer."""

    async def head_blob(self, repository: str, digest: Digest) -> int:
        """A blob's length."""

    def blob_chunks(
        self,
        repository: str,
        digest: Digest,
        *,
        deadline: float,
        started: Callable[[int | None, bool], None],
        offset: int = 0,
    ) -> AsyncGenerator[bytes, None]:
        """A blob's bytes from `offset` as they arrive, resumed when cut, ended by
        `deadline`; `started(length, takes_ranges)` before the first (from 0 only)."""

    def range_chunks(
        self, repository: str, digest: Digest, start: int, end: int, *, deadline: float
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) of a blob from one Range request; anything else raises."""


def _media_type(response: aiohttp.ClientResponse) -> str:
    return response.headers.get("Content-Type", "application/octet-stream").split(";")[0].strip()


def _manifest_type(declared: str, document: dict[str, Any]) -> str | None:
    """The manifest media type to keep: the declared one when it is a manifest's; for a
    registry that says `application/json`, the body's own `mediaType`; None refuses it."""
    if is_manifest_type(declared):
        return declared.lower()
    inner = document.get("mediaType")
    if declared.lower() == "application/json" and isinstance(inner, str):
        return inner if is_manifest_type(inner) else None
    return None


def _checked(
    what: str, data: bytes, declared: str, expected: Digest | None, claimed: Digest | None
) -> tuple[Digest, str]:
    """The digest and media type of manifest bytes that pass every check; ContentMismatch
    for anything else: a body that is not a whole JSON object (cut short by an upstream
    that sent neither a length nor a digest), a type that is not a manifest's, bytes that
    do not hash to the digest asked for or announced."""
    if not is_manifest_type(declared) and declared.lower() != "application/json":
        raise ContentMismatch(f"{what} has media type {declared!r}, which is not a manifest's")
    for name in (expected, claimed):
        if name is not None and not manifest_matches(name, data, declared.lower()):
            log.warning("refused %s: its %d bytes do not match %s", what, len(data), name)
            raise ContentMismatch(f"{what} does not match {name}", detail={"digest": str(name)})
    try:
        document = json.loads(data)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ContentMismatch(f"{what} is not a whole JSON document ({len(data)} bytes)")
    media_type = _manifest_type(declared, document)
    if media_type is None:
        raise ContentMismatch(f"{what} has media type {declared!r}, which is not a manifest's")
    return expected or claimed or digest_of(data), media_type


PAGE_TYPES = ("application/json", "application/vnd.oci.image.index.v1+json")


class UpstreamClient:
    """Requests to one registry's /v2/ API, authenticated as it asks."""

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        timeouts: TimeoutConfig,
        metrics: Metrics,
        clock: Clock = system_clock,
        network: Network | None = None,
    ) -> None:
        self.config = config
        self.name = config.name
        self._session = session
        self._network = network or Network(config, {})
        self._timeouts = timeouts
        self._metrics = metrics
        self.health = metrics.upstream(config.name)
        self._addresses = AddressPolicy(config.url, config.auth_hosts)
        self._login = credentials_for(config, session, metrics, self._network)
        self._tokens = TokenCache(
            config,
            session,
            metrics,
            self._login,
            self._addresses,
            self.answer_timeout(),
            clock,
            self._network,
            down=self._down,
        )
        self._challenge: Challenge | None = None  # learned from the last 401
        self.breaker = Breaker(config.name, clock)  # remembers that it is down
        self.health.retry_in = self.breaker.retry_in
        # Bounds the blob transfers running at once from this upstream.
        self.transfer_slots = asyncio.Semaphore(config.max_transfers)

    def down(self) -> bool:
        return self.breaker.down

    def renew_login(self, config: UpstreamConfig) -> bool:
        login = self._login
        if not isinstance(login, StaticCredentials):
            return False  # ECR and ACR logins renew themselves
        pair = (config.username, config.password)
        if pair == login.configured:
            return False
        login.replace(*pair)
        self._challenge = None  # the next 401 says again how to log in
        return True

    def answer_timeout(self, total: float | None = None) -> aiohttp.ClientTimeout:
        """Connect and silence limits; `total` bounds the whole exchange (default: both)."""
        timeouts = self._timeouts
        return aiohttp.ClientTimeout(
            total=timeouts.connect + timeouts.read if total is None else max(total, 0.001),
            connect=timeouts.connect,
            sock_read=timeouts.read,
        )

    # typed calls

    async def head_manifest(
        self, repository: str, reference: str, accept: str, budget: float | None = None
    ) -> ManifestHead:
        """HEAD a manifest (free under Docker Hub's pull limit), within `budget` seconds:
        past it the upstream counts as down, and the caller serves what it has."""
        async with self._answer(
            "HEAD", repository, f"manifests/{reference}", {"Accept": accept}, budget=budget
        ) as response:
            await self._raise_for_status(response, PASSED_THROUGH["MANIFEST_UNKNOWN"])
            digest = parse_digest(response.headers.get("Docker-Content-Digest", ""))
            media_type = _media_type(response)
            if not is_manifest_type(media_type):
                digest = None  # not a type we may serve: the GET will look at the body
            return ManifestHead(digest, media_type.lower(), response.content_length)

    async def get_manifest(
        self, repository: str, reference: str, accept: str, expected: Digest | None
    ) -> FetchedManifest:
        """GET a manifest, read whole (up to 4 MiB) and checked: its digest is computed over
        exactly the bytes received and must match the one asked for and the one the upstream
        announced. Nothing that fails a check is returned."""
        what = f"upstream {self.name}: manifest {repository}:{reference}"
        async with self._answer(
            "GET", repository, f"manifests/{reference}", {"Accept": accept}
        ) as response:
            await self._raise_for_status(response, PASSED_THROUGH["MANIFEST_UNKNOWN"])
            data = await read_body(response, MANIFEST_LIMIT, what)
            declared = _media_type(response)
            announced = response.headers.get("Docker-Content-Digest", "")
        claimed = parse_digest(announced)
        check = functools.partial(_checked, what, data, declared, expected, claimed)
        # A large manifest is parsed and hashed off the loop (4 MiB take milliseconds).
        digest, media_type = (
            check() if len(data) < CHECK_IN_THREAD else await asyncio.to_thread(check)
        )
        return FetchedManifest(digest, media_type, data)

    async def get_page(
        self,
        repository: str,
        path: str,
        params: Mapping[str, str],
        not_found: type[RegistryError],
    ) -> Page:
        """GET a tags list or referrers answer, read whole up to its limit."""
        async with self._answer("GET", repository, path, None, params) as response:
            await self._raise_for_status(response, not_found)
            body = await read_body(response, PAGE_LIMIT, f"upstream {self.name}: {path}")
            link = response.headers.get("Link", "")
            content_type = _media_type(response).lower()
        if content_type not in PAGE_TYPES:
            content_type = "application/json"  # never what the upstream says it is: HTML
        next_query = None
        if link.startswith("<") and ">" in link:
            _, _, query = link[1 : link.index(">")].partition("?")
            next_query = query or None
        return Page(body, content_type, next_query)

    async def head_blob(self, repository: str, digest: Digest) -> int:
        """A blob's length, from a HEAD."""
        async with self._answer("HEAD", repository, f"blobs/{digest}", None) as response:
            await self._raise_for_status(response, BlobUnknown)
            if response.content_length is None:
                raise UpstreamError(f"upstream {self.name} gave no length for {digest}")
            return response.content_length

    async def blob_chunks(
        self,
        repository: str,
        digest: Digest,
        *,
        deadline: float,
        started: Callable[[int | None, bool], None],
        offset: int = 0,
    ) -> AsyncGenerator[bytes, None]:
        """The blob's bytes as they arrive, from `offset`; `started(length, takes_ranges)`
        is called once, before the first (when reading from the start). A body cut short
        is resumed with a Range request (at most MAX_RESUMES times), so the caller sees no
        break. The whole exchange ends by `deadline` (monotonic), or raises UpstreamTimeout.
        Never yields more bytes than the upstream said it would send.
        """
        path = f"blobs/{digest}"
        received = offset
        size: int | None = None
        headers: dict[str, str] = {}
        for resumes in range(MAX_RESUMES + 1):
            if resumes or received:
                headers = {"Range": f"bytes={received}-"}
            try:
                async with self._answer(
                    "GET",
                    repository,
                    path,
                    headers,
                    total=deadline - time.monotonic(),
                    body_errors=False,
                    guarded=not resumes,  # a transfer under way keeps going
                ) as response:
                    await self._raise_for_status(response, BlobUnknown)
                    skip = 0
                    if not resumes and not offset:
                        size = response.content_length
                        ranges = response.headers.get("Accept-Ranges", "").lower() == "bytes"
                        started(size, ranges)
                    elif response.status == 206:
                        content_range = response.headers.get("Content-Range", "")
                        if not content_range.startswith(f"bytes {received}-"):
                            raise ContentMismatch(
                                f"upstream {self.name} resumed {digest} at the wrong place"
                            )
                        total = content_range.rpartition("/")[2]
                        if size is None and total.isdigit():
                            size = int(total)
                    else:
                        skip = received  # the upstream ignored Range: drop what we have
                        if size is None:
                            size = response.content_length
                    # iter_chunks hands over each buffer as received; iter_any joins them.
                    async for chunk, _ in response.content.iter_chunks():
                        if skip:
                            if len(chunk) <= skip:
                                skip -= len(chunk)
                                continue
                            chunk, skip = chunk[skip:], 0
                        if not chunk:
                            continue
                        if size is not None and received + len(chunk) > size:
                            raise ContentMismatch(
                                f"upstream {self.name} sent more than {size} bytes for {digest}"
                            )
                        received += len(chunk)
                        yield chunk
                if size is None or received == size:
                    return
                cut = f"ended at byte {received} of {size}"
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise UpstreamTimeout(
                        f"upstream {self.name}: transfer of {digest} took longer than allowed"
                    ) from None
                if size is None:
                    raise UpstreamError(
                        f"upstream {self.name}: transfer of {digest} broke at byte {received}"
                    ) from None
                cut = f"broke at byte {received} of {size} ({type(e).__name__})"
            except UpstreamTimeout:
                raise
            log.warning("transfer of %s from %s %s; resuming", digest, self.name, cut)
        raise UpstreamError(
            f"upstream {self.name}: transfer of {digest} kept breaking; gave up after "
            f"{MAX_RESUMES} resumes"
        )

    async def range_chunks(
        self, repository: str, digest: Digest, start: int, end: int, *, deadline: float
    ) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the blob from one Range request, as they arrive. Anything
        but exactly that range (a 200 for the whole blob, another range, a cut) raises:
        the caller fetches those bytes another way."""
        headers = {"Range": f"bytes={start}-{end - 1}"}
        received = 0
        try:
            async with self._answer(
                "GET",
                repository,
                f"blobs/{digest}",
                headers,
                total=deadline - time.monotonic(),
                guarded=False,  # a part of a transfer under way: the transfer is the probe
            ) as response:
                await self._raise_for_status(response, BlobUnknown)
                content_range = response.headers.get("Content-Range", "")
                if response.status != 206 or not content_range.startswith(
                    f"bytes {start}-{end - 1}/"
                ):
                    raise ContentMismatch(
                        f"upstream {self.name} did not send bytes {start}-{end - 1} of {digest}"
                    )
                async for chunk, _ in response.content.iter_chunks():
                    if received + len(chunk) > end - start:
                        raise ContentMismatch(
                            f"upstream {self.name} sent more than the range asked of {digest}"
                        )
                    received += len(chunk)
                    yield chunk
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamError(f"upstream {self.name}: range of {digest} broke") from exc
        if received != end - start:
            raise UpstreamError(f"upstream {self.name}: range of {digest} ended early")

    # the exchange

    @contextlib.asynccontextmanager
    async def _answer(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None = None,
        *,
        total: float | None = None,
        body_errors: bool = True,
        guarded: bool = True,
        budget: float | None = None,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """An answer to `method /v2/<repository>/<path>`, released when the block ends.

        Network failures become UpstreamError (502) or UpstreamTimeout (504) while the
        request is sent, and (unless `body_errors` is off: the caller resumes) while its
        body is read within the block.
        """
        response = await self._request(
            method, repository, path, headers, params, total, guarded, budget
        )
        try:
            yield response
        except TimeoutError:
            if not body_errors:
                raise
            raise UpstreamTimeout(f"upstream {self.name} timed out") from None
        except aiohttp.ClientError as exc:
            if not body_errors:
                raise
            raise UpstreamError(f"upstream {self.name} failed: {describe(exc)}") from None
        finally:
            response.release()

    async def _credentials(self, scope: str, refused: str | None = None) -> str | None:
        """The Authorization header for `scope`, never the `refused` one again."""
        challenge = self._challenge
        if challenge is None:
            return None
        if challenge.scheme == "bearer":
            token = refused.removeprefix("Bearer ") if refused else None
            try:
                value = await self._tokens.fetch(challenge, scope, refused=token)
            except UpstreamError:
                # A realm that fails is not kept: the next 401 says where to go now.
                if self._challenge is challenge:
                    self._challenge = None
                raise
            return f"Bearer {value}"
        if challenge.scheme == "basic" and (pair := await self._login.get()) is not None:
            return basic_header(*pair)
        return None

    async def _request(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        total: float | None,
        guarded: bool = True,
        budget: float | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request, answering the registry's auth challenge once, and have its
        answer's headers within `budget` seconds (a token request included); the caller
        releases the answer. An upstream that failed a moment ago is not asked (UpstreamDown,
        at once) until its back-off is over; then one request probes it, within
        `timeouts.revalidate` at most, so a probe that hangs does not hide for long that
        the upstream is back."""
        probe = self.breaker.admit() if guarded else False
        if probe:
            limit = self._timeouts.revalidate
            budget = limit if budget is None else min(budget, limit)
        try:
            async with asyncio.timeout(budget):
                return await self._request_once(method, repository, path, headers, params, total)
        except TimeoutError:  # the budget's: the transport's own timeouts are mapped below
            assert budget is not None
            why = f"no answer within {budget:g}s" + (" (a probe)" if probe else "")
            self._failed(method, why)  # while still the probe: its failure grows the back-off
            raise UpstreamTimeout(
                f"upstream {self.name}: {why}", detail={"upstream": self.name, "cause": why}
            ) from None
        finally:
            if probe:
                self.breaker.release()  # the probe has its answer (or gave up)

    async def _request_once(
        self,
        method: str,
        repository: str,
        path: str,
        headers: Mapping[str, str] | None,
        params: Mapping[str, str] | None,
        total: float | None,
    ) -> aiohttp.ClientResponse:
        url = f"{self.config.url}/v2/{repository}/{path}"
        scope = f"repository:{repository}:pull"
        authorization = await self._credentials(scope)
        for attempt in range(2):
            response = await self._send(method, url, headers, params, authorization, total)
            if response.status != 401:
                return response
            challenge = parse_challenge(response.headers.get("WWW-Authenticate"))
            response.release()
            if challenge is None or challenge.scheme not in ("bearer", "basic") or attempt == 1:
                break
            if challenge.scheme == "basic" and await self._login.get() is None:
                break
            if challenge.scheme == "bearer":
                await self._addresses.check(challenge.params.get("realm", ""), "token realm")
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
        total: float | None,
    ) -> aiohttp.ClientResponse:
        send_headers: CIMultiDict[str] = CIMultiDict(headers or {})
        send_headers["User-Agent"] = USER_AGENT
        if authorization is not None:
            send_headers["Authorization"] = authorization
        origin = urlsplit(url).netloc
        try:
            for _ in range(MAX_REDIRECTS + 1):
                started = time.monotonic()
                options = self._network.options(url)  # redirects to a CDN: the same way out
                response = await self._session.request(
                    method,
                    url,
                    headers=send_headers,
                    params=params,
                    allow_redirects=False,
                    timeout=self.answer_timeout(total),
                    **options,
                )
                if (refusal := proxy_refusal(response, options["proxy"])) is not None:
                    response.release()
                    self._failed(method, refusal)
                    raise UpstreamError(
                        f"upstream {self.name} unreachable: {refusal}",
                        detail=self._cause(url, refusal),
                    )
                self._observe(method, response, time.monotonic() - started)
                location = response.headers.get("Location")
                if response.status not in REDIRECTS or location is None:
                    return response
                response.release()
                url = urljoin(url, location)
                await self._addresses.check(url, "redirect")
                params = None  # the Location carries its own query
                if urlsplit(url).netloc != origin:
                    send_headers.pop("Authorization", None)
                if response.status == 303:
                    method = "GET"
        except TimeoutError:
            why = f"no answer from {urlsplit(url).netloc} within the timeouts"
            self._failed(method, why)
            raise UpstreamTimeout(
                f"upstream {self.name} timed out: {why}", detail=self._cause(url, why)
            ) from None
        except aiohttp.ClientError as exc:
            why = describe(exc)
            self._failed(method, why)
            raise UpstreamError(
                f"upstream {self.name} unreachable: {why}", detail=self._cause(url, why)
            ) from None
        raise UpstreamError(f"upstream {self.name}: too many redirects")

    def _cause(self, url: str, why: str) -> dict[str, str]:
        """What an OCI error's detail says of a failure: which upstream, which host, why."""
        return {"upstream": self.name, "host": urlsplit(url).netloc, "cause": why}

    def _observe(self, method: str, response: aiohttp.ClientResponse, seconds: float) -> None:
        """Count the answer, time it, and keep what it says of health and rate limits."""
        self._metrics.upstream_requests.labels(self.name, method, str(response.status)).inc()
        self._metrics.upstream_latency.labels(self.name).observe(seconds)
        if unavailable(response.status):
            self._down(f"answered {response.status}")
        else:
            self.health.reachable = True
            self.health.last_error = ""
            self.health.last_answer = time.time()
            self.health.down_since = None
            self.breaker.succeeded()
        health = self.health
        for header, attribute in RATELIMIT_HEADERS.items():
            value = response.headers.get(header)
            if value is not None:
                with contextlib.suppress(ValueError):
                    setattr(health, attribute, float(value.split(";")[0]))

    def _failed(self, method: str, why: str) -> None:
        self._metrics.upstream_requests.labels(self.name, method, "error").inc()
        self._down(why)

    def _down(self, why: str) -> None:
        """The upstream (or its token server, or the proxy to it) failed: not asked again
        until its back-off is over."""
        now = time.time()
        if self.health.reachable is not False or self.health.down_since is None:
            self.health.down_since = now
        self.health.reachable = False
        self.health.last_error = why
        self.health.errors.append((now, why))
        self.breaker.failed(why)

    async def _raise_for_status(
        self, response: aiohttp.ClientResponse, not_found: type[RegistryError]
    ) -> None:
        """Map an upstream error answer to the error our client should see."""
        if response.status < 400:
            return
        code, message, detail = _first_error(await read_error_body(response))
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
            f"upstream {self.name} answered {status}"
            + (f" ({code}: {message})" if code and message else ""),
            detail={"upstream": self.name, "status": status, "code": code or ""},
        )


def _first_error(body: bytes) -> tuple[str | None, str | None, object]:
    """The first OCI error in an upstream's error body, if it has one."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        return str(first.get("code")), first.get("message"), first.get("detail")
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return None, None, None
