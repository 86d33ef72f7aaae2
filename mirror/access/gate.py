"""Who may pull what: every request under /v2/ passes here after routing and before the
cache or an upstream is touched, so a refused client learns nothing and the upstream sees
nothing.

A client is anonymous, or proves a name with HTTP Basic (checked against the users file)
or with a token this mirror issued at `/token` (the Docker token flow: `docker login`,
podman, skopeo, containerd, kubelet). The first rule that applies to the repository and
the client's address decides. No identity where one is needed is 401 with the challenge;
an identity without the grant is 403 DENIED; a wrong login is 401 and never says which
part was wrong.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from ..clock import Clock
from ..config import LOOPBACK, AccessConfig, AccessRule, Config, in_networks
from ..errors import Denied, RegistryError, TooManyRequests, Unauthorized
from ..metrics import Metrics
from ..routing import Route, resolve
from .limits import FailedLogins
from .tokens import Token, TokenSigner
from .users import UsersFile

ANONYMOUS = "-"
ALLOWED = "allowed"  # what access made of a request it let through, in the access log
# Who made a request (a user's name, or "-") and what access made of it, for the access log.
IDENTITY = web.RequestKey("identity", str)
DECISION = web.RequestKey("decision", str)


class AccessDenied(Denied):
    result = "denied"


class LoginsLimited(TooManyRequests):
    result = "denied"


@dataclass(frozen=True)
class Identity:
    user: str | None  # None: anonymous
    presented: bool  # the client sent credentials (that checked out)


class Gate:
    """The access decisions of one app; with no `access` configured, everyone may pull."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        clock: Clock,
        signer: TokenSigner | None,
    ) -> None:
        self._config = config
        self._access: AccessConfig | None = config.access
        self._metrics = metrics
        self._clock = clock
        self._signer = signer
        self._users = (
            UsersFile(config.access.users_file)
            if config.access is not None and config.access.users_file is not None
            else None
        )
        limit = config.access.login_attempts if config.access is not None else 1
        self._failures = FailedLogins(limit, clock)

    # the checks

    async def base(self, request: web.Request) -> None:
        """GET /v2/: the check every client starts with. With access on, a client without
        credentials is challenged, so it logs in (or fetches an anonymous token)."""
        if self._access is None:
            return
        identity = await self._identity(request, challenge=self._challenge(request))
        if identity is None:
            # Every client starts so, to learn where to log in: a challenge, not a refusal
            # (not counted, and logged as such).
            request[IDENTITY], request[DECISION] = ANONYMOUS, "challenged"
            raise Unauthorized(headers=self._challenge(request))
        self._allow(request, identity)

    async def pull(self, request: web.Request, route: Route) -> None:
        if self._access is not None:
            await self._check(request, route, "pull", "pull")

    def lets_anyone_pull(self, route: Route, address: str | None) -> bool:
        """Whether a request without credentials from `address` may pull from `route`:
        what `pull` decides for it (for the server's fast path, which leaves every
        request with credentials to `pull`)."""
        if self._access is None:
            return True
        return self._may(route, None, address, "pull")

    async def push(self, request: web.Request, route: Route) -> None:
        """A write to a hosted namespace: an identity the rules grant `push`; without
        access rules, a client on this machine only."""
        access = self._access
        name = request.match_info.get("name", "")
        if access is None:
            if in_networks(request.remote, LOOPBACK):
                return
            raise Denied(
                f"push {name}: without access rules, only this machine may push (set "
                "access: in the config, see README 'Access control')",
                detail={"name": name},
            )
        await self._check(request, route, "push", "pull,push")

    async def _check(self, request: web.Request, route: Route, action: str, scope: str) -> None:
        """Admit the request to `action` on `route`'s repository, or refuse it (401 with
        the challenge for `scope`, or 403)."""
        assert self._access is not None
        name = request.match_info.get("name", "")
        challenge = self._challenge(request, f"repository:{name}:{scope}")
        identity = await self._identity(request, challenge=challenge)
        user = identity.user if identity is not None else None
        allowed = self._may(route, user, request.remote, action)
        self._decide(request, identity, allowed, challenge, f"{action} {name}", {"name": name})

    async def visible(self, request: web.Request) -> Callable[[Route], bool]:
        """For `/v2/_catalog`: which repositories this client may pull (all, with no
        access configured); credentials that do not check out are 401 as anywhere."""
        access = self._access
        if access is None:
            return lambda route: True
        identity = await self._identity(request, challenge=self._challenge(request))
        user = identity.user if identity is not None else None
        self._allow(request, identity)
        address = request.remote

        def allowed(route: Route) -> bool:
            return self._may(route, user, address, "pull")

        return allowed

    async def operations(self, request: web.Request, *, ops_port: bool = False) -> None:
        """/metrics and the status page: whom access.operations allows; without it, this
        machine on the main port and everyone on the operations port."""
        access = self._access
        if access is None:
            return
        rule = access.operations
        if rule is None:
            if ops_port:
                return
            rule = AccessRule(anonymous=True, networks=LOOPBACK)
        challenge = {"WWW-Authenticate": 'Basic realm="mirror operations"'}
        identity = await self._identity(request, challenge=challenge)
        user = identity.user if identity is not None else None
        allowed = self._allows((rule,), user, request.remote, "*", "pull")
        self._decide(request, identity, allowed, challenge, "read the operations pages")

    def _decide(
        self,
        request: web.Request,
        identity: Identity | None,
        allowed: bool,
        challenge: dict[str, str],
        what: str,
        detail: object = None,
    ) -> None:
        """Let the request through, or refuse it: 401 with the challenge without an
        identity, 403 DENIED with one."""
        if allowed:
            self._allow(request, identity)
            return
        user = identity.user if identity is not None else None
        if user is None:
            self._refuse(request, identity, "credentials")
            raise Unauthorized(f"authentication required to {what}", headers=challenge)
        self._refuse(request, identity, "denied")
        raise AccessDenied(f"{user} may not {what}", detail=detail)

    def _may(self, route: Route, user: str | None, address: str | None, action: str) -> bool:
        """Whether the rules let `user` (None: anonymous) at `address` do `action` on
        `route`'s repository: one walk for every check, the fast path's included."""
        assert self._access is not None
        path = f"{route.upstream.name}/{route.repository}"
        return self._allows(self._access.rules, user, address, path, action)

    def _allows(
        self,
        rules: tuple[AccessRule, ...],
        user: str | None,
        address: str | None,
        path: str,
        action: str,
    ) -> bool:
        """The first rule that applies to the repository, the address and the action
        decides; none applying is a refusal."""
        assert self._access is not None
        for rule in rules:
            if action in rule.actions and rule.applies(path, address):
                return rule.grants(user, self._access.groups)
        return False

    # identities

    async def _identity(
        self, request: web.Request, *, challenge: dict[str, str]
    ) -> Identity | None:
        """Who the request's credentials name; None for none. Credentials that do not
        check out are 401 (with `challenge`), whatever an anonymous client may do."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self._signer is not None:
            token = self._signer.read(value.strip())
            if token is not None and (token.user is None or await self._current(token)):
                return Identity(token.user, presented=token.user is not None)
            self._refuse(request, None, "credentials")
            raise Unauthorized("the token is not valid (expired?): log in again", headers=challenge)
        if scheme == "basic":
            user = await self._login(request, value, challenge)
            return Identity(user, presented=True)
        self._refuse(request, None, "credentials")
        raise Unauthorized(f"unsupported authorization scheme {scheme!r}", headers=challenge)

    async def _current(self, token: Token) -> bool:
        """Whether the token's user still has the password it logged in with: a removed
        user, or a changed password, ends the tokens issued before."""
        assert token.user is not None
        if self._users is None:
            return False
        return await self._users.fingerprint(token.user) == token.fingerprint

    async def _login(self, request: web.Request, value: str, challenge: dict[str, str]) -> str:
        """The user a Basic credential proves, or 401 (429 after too many failures)."""
        address = request.remote or ""
        wait = self._failures.wait(address)
        if wait:
            self._refuse(request, None, "rate_limited")
            raise LoginsLimited(
                "too many failed logins from this address; try again later",
                headers={"Retry-After": str(round(wait))},
            )
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8
            decoded = ""
        user, sep, password = decoded.partition(":")
        accepted = False
        if sep and self._users is not None:
            self._failures.checking(address)
            try:
                accepted = await self._users.check(user, password)
            finally:
                self._failures.checked(address)
        if accepted:
            self._metrics.logins.labels("accepted").inc()
            return user
        self._metrics.logins.labels("refused").inc()
        self._failures.failed(address)
        self._refuse(request, None, "credentials")
        raise Unauthorized("wrong user name or password", headers=challenge)

    # the token endpoint

    async def token(self, request: web.Request) -> web.Response:
        """GET /token?service=&scope=...: a short-lived token for whoever the Basic
        credentials name (or an anonymous one), listing the scopes the rules allow."""
        access = self._access
        assert access is not None and self._signer is not None  # routed only then
        challenge = {"WWW-Authenticate": 'Basic realm="mirror"'}
        header = request.headers.get("Authorization", "")
        user = None
        if header:
            if not header.lower().startswith("basic "):
                raise Unauthorized("log in with a user name and password", headers=challenge)
            user = await self._login(request, header[6:], challenge)
        granted = self._granted(request, user)
        request[IDENTITY] = user or ANONYMOUS
        request[DECISION] = "token"
        lifetime = access.token_ttl
        fingerprint = None
        if user is not None and self._users is not None:
            fingerprint = await self._users.fingerprint(user)
        token = self._signer.issue(user, fingerprint, lifetime, granted)
        issued = datetime.datetime.fromtimestamp(int(self._clock()), datetime.UTC)
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": int(lifetime),
                "issued_at": issued.isoformat().replace("+00:00", "Z"),
            },
            headers={"Cache-Control": "no-store"},
        )

    def _granted(self, request: web.Request, user: str | None) -> list[dict[str, object]]:
        """The asked scopes the rules allow `user` from this address, as the token lists
        them (informative: each request is decided again by the rules)."""
        assert self._access is not None
        granted: list[dict[str, object]] = []
        for scope in " ".join(request.query.getall("scope", [])).split():
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind != "repository" or not name:
                continue
            try:
                route = resolve(self._config, name, None)
            except RegistryError:
                continue
            allowed = [
                action
                for action in actions.split(",")
                if self._may(route, user, request.remote, action)
            ]
            if allowed:
                granted.append({"type": "repository", "name": name, "actions": allowed})
        return granted

    # what the access log and the metrics say

    def _allow(self, request: web.Request, identity: Identity | None) -> None:
        request[IDENTITY] = (identity.user if identity else None) or ANONYMOUS
        request[DECISION] = ALLOWED

    def _refuse(self, request: web.Request, identity: Identity | None, reason: str) -> None:
        request[IDENTITY] = (identity.user if identity else None) or ANONYMOUS
        request[DECISION] = f"refused:{reason}"
        self._metrics.access_refused.labels(reason).inc()

    def _challenge(self, request: web.Request, scope: str | None = None) -> dict[str, str]:
        """The Bearer challenge naming this mirror's token endpoint, as the client reached
        it (a TLS-terminating proxy in front says how with X-Forwarded-Proto/-Host)."""
        scheme = request.headers.get("X-Forwarded-Proto", request.scheme).split(",")[0].strip()
        host = request.headers.get("X-Forwarded-Host", request.host).split(",")[0].strip()
        value = f'Bearer realm="{scheme}://{host}/token",service="{host}"'
        if scope is not None:
            value += f',scope="{scope}"'
        return {"WWW-Authenticate": value}
