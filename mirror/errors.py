"""OCI error codes and the one middleware that renders them.

Handlers and the proxy raise `RegistryError`; only `error_middleware` turns errors into
`{"errors":[{"code","message","detail"}]}` bodies, so no handler builds error JSON.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from .logs import printable

log = logging.getLogger("mirror.errors")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# How a request was answered: hit, miss, coalesced, stale, negative or error.
RESULT = web.RequestKey("result", str)


class RegistryError(Exception):
    """An error a registry client understands: OCI code, HTTP status, message."""

    code = "UNKNOWN"
    status = 500
    default_message = "unknown error"
    result = "error"  # how the request counts in metrics

    def __init__(
        self,
        message: str | None = None,
        detail: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.detail = detail
        self.headers = dict(headers or {})
        super().__init__(self.message)

    def body(self) -> bytes:
        entry: dict[str, Any] = {"code": self.code, "message": self.message}
        entry["detail"] = self.detail if self.detail is not None else {}
        return json.dumps({"errors": [entry]}).encode()


class NameInvalid(RegistryError):
    code, status, default_message = "NAME_INVALID", 400, "invalid repository name"


class TagInvalid(RegistryError):
    code, status, default_message = "TAG_INVALID", 400, "invalid tag"


class PaginationInvalid(RegistryError):
    code, status, default_message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results"


class DigestInvalid(RegistryError):
    code, status, default_message = "DIGEST_INVALID", 400, "invalid digest"


class NameUnknown(RegistryError):
    code, status, default_message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class ManifestUnknown(RegistryError):
    code, status, default_message = "MANIFEST_UNKNOWN", 404, "manifest unknown"


class KnownMissing(ManifestUnknown):
    """An upstream 404 remembered for negative_ttl: answered without asking again."""

    result = "negative"


class NotCached(ManifestUnknown):
    """Not in the cache, and the upstream may not be asked (offline): not the upstream's
    404, so nothing is remembered about it."""


class BlobUnknown(RegistryError):
    code, status, default_message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class NotFound(RegistryError):
    code, status, default_message = "NOT_FOUND", 404, "no such route"


class RangeInvalid(RegistryError):
    code, status, default_message = "RANGE_INVALID", 416, "requested range not satisfiable"


class Unsupported(RegistryError):
    code, status, default_message = "UNSUPPORTED", 405, "this mirror is read-only"


class Unauthorized(RegistryError):
    """No identity, or one that did not check out: the client should authenticate (the
    challenge is in the headers). Never says which part of a login was wrong."""

    code, status, default_message = "UNAUTHORIZED", 401, "authentication required"
    result = "denied"


class Denied(RegistryError):
    code, status, default_message = "DENIED", 403, "requested access to the resource is denied"


class TooManyRequests(RegistryError):
    code, status, default_message = "TOOMANYREQUESTS", 429, "too many requests"


class UpstreamError(RegistryError):
    """The upstream failed to answer usefully (unreachable, 5xx, refused auth)."""

    code, status, default_message = "UNAVAILABLE", 502, "upstream unavailable"
    logged = True  # a warning line with its cause (not for each refusal while it is down)


class UpstreamTimeout(UpstreamError):
    status, default_message = 504, "upstream timed out"


class BlobUploadUnknown(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, default_message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class ManifestInvalid(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestBlobUnknown(RegistryError):
    code, status, default_message = (
        "MANIFEST_BLOB_UNKNOWN",
        400,
        "manifest references a blob unknown to the repository",
    )


class ManifestTooLarge(RegistryError):
    code, status, default_message = "MANIFEST_INVALID", 413, "manifest too large"


class SizeInvalid(RegistryError):
    code, status, default_message = (
        "SIZE_INVALID",
        400,
        "provided length did not match content length",
    )


class HostedFull(RegistryError):
    """A push past storage.hosted_max_size (or the disk): refused, nothing kept."""

    code, status, default_message = "DENIED", 413, "the hosted storage is full"


class InternalError(RegistryError):
    code, status, default_message = "UNKNOWN", 500, "internal error"


# Codes an upstream may send that we pass on as they are, with their status.
PASSED_THROUGH: dict[str, type[RegistryError]] = {
    cls.code: cls
    for cls in (NameUnknown, ManifestUnknown, BlobUnknown, NameInvalid, TagInvalid, Denied)
}


def render(error: RegistryError) -> web.Response:
    headers = {"Docker-Distribution-Api-Version": "registry/2.0", **error.headers}
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=headers,
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every error under /v2/ as OCI JSON; never let a traceback reach a client."""
    try:
        return await handler(request)
    except RegistryError as error:
        request[RESULT] = error.result
        if isinstance(error, UpstreamError) and error.logged:
            cause = error.detail.get("cause") if isinstance(error.detail, dict) else None
            log.warning(
                "%s %s: %s%s",
                request.method,
                printable(request.path),
                error.message,
                f" ({cause})" if cause and cause not in error.message else "",
            )
        return render(error)
    except web.HTTPMethodNotAllowed:
        if request.path.startswith("/v2/"):
            return render(Unsupported(f"{request.method} is not supported by this mirror"))
        raise
    except web.HTTPNotFound:
        if request.path.startswith("/v2/"):
            return render(NotFound(f"no route for {request.method} {request.path}"))
        raise
    except web.HTTPException:
        raise
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        request[RESULT] = "error"
        return render(InternalError())
