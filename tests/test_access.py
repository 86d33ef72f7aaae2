"""Who may pull what: users from an htpasswd file (made by Debian's `htpasswd -B`), the
Docker token flow, rules by repository, user, group and network, and the upstream never
asked for a refused request."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirror.config import ConfigError, from_mapping, in_networks, trust_warnings
from mirror.http.forwarded import client_address
from tests.conftest import MirrorFactory, Seeded
from tests.support.clients import CommandFailed, skopeo, skopeo_copy_to_dir
from tests.support.clock import ManualClock
from tests.support.registry import Registry

ACCEPT = {
    "Accept": "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
}
PASSWORDS = {"ci": "ci-secret", "alice": "alice-secret", "bob": "bob-secret", "carol": "c4rol"}
TEAM_APP = "/v2/private.example/team/app/manifests/v1"


def htpasswd(path: Path, user: str, password: str) -> None:
    """Add or change `user` with Debian's htpasswd, bcrypt (-B), as an operator would."""
    binary = shutil.which("htpasswd")
    assert binary, "htpasswd is installed by scripts/test (apache2-utils)"
    create = [] if path.exists() else ["-c"]
    subprocess.run(
        [binary, "-B", "-b", *create, str(path), user, password], check=True, capture_output=True
    )


@pytest.fixture(autouse=True)
def _images(seeded: Seeded) -> Seeded:
    """Every test here pulls the seeded images, whether it names them or not."""
    return seeded


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    for user, password in PASSWORDS.items():
        htpasswd(path, user, password)
    return path


def rules(users_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "users_file": str(users_file),
        "groups": {"admins": ["carol"]},
        "rules": [
            {"repositories": ["docker.io/*"], "anonymous": True, "networks": ["127.0.0.0/8"]},
            {"repositories": ["private.example/team/*"], "users": ["ci"], "groups": ["admins"]},
            {"repositories": ["private.example/*"], "users": ["alice"]},
        ],
        **extra,
    }


def basic(user: str, password: str | None = None) -> dict[str, str]:
    secret = PASSWORDS[user] if password is None else password
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


async def _get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, bytes, dict[str, str]]:
    async with http.get(url, headers={**ACCEPT, **(headers or {})}) as response:
        return response.status, await response.read(), dict(response.headers)


def _error(body: bytes) -> dict[str, Any]:
    errors: list[dict[str, Any]] = json.loads(body)["errors"]
    return errors[0]


async def _guarded(
    make_mirror: MirrorFactory, upstream: Registry, users_file: Path, **settings: Any
) -> Any:
    return await make_mirror(
        {"docker.io": upstream.url, "private.example": upstream.url},
        access=rules(users_file),
        **settings,
    )


async def test_each_client_is_admitted_or_refused_as_its_rule_says(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    users_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file)
    team = f"{mirror.url}{TEAM_APP}"
    mark = upstream.mark()
    refused = [
        (team, {}, 401, "UNAUTHORIZED"),  # no identity, the rule wants one
        (team, basic("alice"), 403, "DENIED"),  # the first rule that applies names not her
        (team, basic("bob"), 403, "DENIED"),  # in no rule
        (team, basic("ci", "wrong"), 401, "UNAUTHORIZED"),
        (team, basic("ci", ""), 401, "UNAUTHORIZED"),
        (team, {"Authorization": "Basic !!!"}, 401, "UNAUTHORIZED"),
        (team, {"Authorization": "Bearer forged"}, 401, "UNAUTHORIZED"),
        (team, {"Authorization": "Negotiate abc"}, 401, "UNAUTHORIZED"),
        (
            f"{mirror.url}/v2/private.example/library/alpine/manifests/3.20",
            basic("ci"),
            403,
            "DENIED",
        ),
        # a right password for a user whose rule does not apply is still refused
        (f"{mirror.url}/v2/private.example/library/alpine/manifests/3.20", {}, 401, "UNAUTHORIZED"),
    ]
    for url, headers, status, code in refused:
        got, body, answer_headers = await _get(http, url, headers)
        assert (got, _error(body)["code"]) == (status, code), (url, headers, body)
        if status == 401:
            challenge = answer_headers["WWW-Authenticate"]
            assert challenge.startswith(f'Bearer realm="{mirror.url}/token"'), challenge
    wrong_password = (await _get(http, team, basic("ci", "wrong")))[1]
    unknown_user = (await _get(http, team, basic("nobody", "wrong")))[1]
    assert wrong_password == unknown_user  # never a hint which part was wrong
    assert upstream.hits(mark) == []  # the upstream saw none of them

    admitted = [
        (team, basic("ci"), seeded.docker.manifest),
        (team, basic("carol"), seeded.docker.manifest),  # by her group
        (
            f"{mirror.url}/v2/private.example/library/alpine/manifests/3.20",
            basic("alice"),
            seeded.oci.manifest,
        ),
        (f"{mirror.url}/v2/library/alpine/manifests/3.20", {}, seeded.oci.manifest),  # network
        (f"{mirror.url}/v2/library/alpine/manifests/3.20", basic("bob"), seeded.oci.manifest),
    ]
    for url, headers, manifest in admitted:
        got, body, _ = await _get(http, url, headers)
        assert (got, body) == (200, manifest), (url, headers, body[:200])


async def _token(
    http: aiohttp.ClientSession, mirror_url: str, scope: str, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    params = {"service": "mirror", "scope": scope}
    async with http.get(f"{mirror_url}/token", params=params, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_the_token_flow_for_users_and_anonymous_clients(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    users_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    """What docker login, podman, containerd and kubelet do: /v2/ challenges, the token
    endpoint issues for whoever the Basic credentials name, the token opens what the rules
    grant that identity."""
    mirror = await _guarded(make_mirror, upstream, users_file)
    status, _, headers = await _get(http, f"{mirror.url}/v2/")
    assert status == 401 and headers["WWW-Authenticate"].startswith(
        f'Bearer realm="{mirror.url}/token",service="{mirror.host}"'
    )
    status, answer = await _token(
        http, mirror.url, "repository:private.example/team/app:pull", basic("ci")
    )
    assert status == 200 and answer["expires_in"] == 300
    claims = json.loads(base64.urlsafe_b64decode(answer["token"].split(".")[1] + "=="))
    assert claims["sub"] == "ci"
    assert claims["access"] == [
        {"type": "repository", "name": "private.example/team/app", "actions": ["pull"]}
    ]
    bearer = {"Authorization": f"Bearer {answer['token']}"}
    assert (await _get(http, f"{mirror.url}/v2/", bearer))[0] == 200
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", bearer))[:2] == (
        200,
        seeded.docker.manifest,
    )
    status, answer = await _token(http, mirror.url, "repository:team/app:pull", {})
    assert status == 200  # anonymous: a token all the same, listing what anonymous may do
    anonymous = {"Authorization": f"Bearer {answer['token']}"}
    assert (await _get(http, f"{mirror.url}/v2/team/app/manifests/v1", anonymous))[0] == 200
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", anonymous))[0] == 401
    status, answer = await _token(http, mirror.url, "repository:x:pull", basic("ci", "wrong"))
    assert status == 401 and "token" not in answer
    _, issued = await _token(http, mirror.url, "repository:x:pull", basic("bob"))
    payload = issued["token"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "ci"  # bob's token, made to say ci
    forged = issued["token"].replace(
        payload, base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    )
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", {"Authorization": f"Bearer {forged}"}))[
        0
    ] == 401


@pytest.mark.in_process  # moves the mirror's clock
async def test_tokens_expire_and_failed_logins_are_rate_limited(
    make_mirror: MirrorFactory,
    upstream: Registry,
    users_file: Path,
    http: aiohttp.ClientSession,
    clock: ManualClock,
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file, clock=clock)
    _, answer = await _token(http, mirror.url, "repository:x:pull", basic("ci"))
    bearer = {"Authorization": f"Bearer {answer['token']}"}
    assert (await _get(http, f"{mirror.url}/v2/", bearer))[0] == 200
    clock.advance(301)
    status, body, _ = await _get(http, f"{mirror.url}/v2/", bearer)
    assert status == 401 and "log in again" in _error(body)["message"]
    for _ in range(10):
        assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci", "guess")))[0] == 401
    status, body, headers = await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci"))
    assert (status, _error(body)["code"]) == (429, "TOOMANYREQUESTS")  # even the right one
    assert int(headers["Retry-After"]) > 0
    assert (await _token(http, mirror.url, "repository:x:pull", basic("ci")))[0] == 429
    clock.advance(61)
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci")))[0] == 200


async def test_the_users_file_is_read_again_when_it_changes(
    make_mirror: MirrorFactory,
    upstream: Registry,
    users_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file)
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci")))[0] == 200
    _, answer = await _token(http, mirror.url, "repository:x:pull", basic("ci"))
    bearer = {"Authorization": f"Bearer {answer['token']}"}
    htpasswd(users_file, "ci", "rotated")  # no restart
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci")))[0] == 401
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci", "rotated")))[0] == 200
    lines = [line for line in users_file.read_text().splitlines() if not line.startswith("ci:")]
    users_file.write_text("\n".join(lines) + "\n")  # ci removed
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci", "rotated")))[0] == 401
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", bearer))[0] == 401  # its token too
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("carol")))[0] == 200


async def test_a_private_blob_is_not_served_by_digest_without_the_grant(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    users_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file)
    layer = seeded.docker.layers[0]
    blob = f"{mirror.url}/v2/private.example/team/app/blobs/{layer}"
    status, _, headers = await _get(http, blob, basic("ci"))
    assert status == 200 and headers["X-Mirror-Cache"] == "miss"  # now cached
    for headers in ({}, basic("bob")):
        status, body, _ = await _get(http, blob, headers)
        assert status in (401, 403) and b"payload" not in body
        async with http.head(blob, headers=headers) as response:
            assert response.status in (401, 403)
    # Asked by digest under a repository the client may pull (docker.io/*, anonymous here),
    # which does not hold it: the cached copy is not handed out.
    manifest = f"{mirror.url}/v2/private.example/team/app/manifests/{seeded.docker.digest}"
    assert (await _get(http, manifest, basic("ci")))[0] == 200
    for kind, digest in (("blobs", layer), ("manifests", seeded.docker.digest)):
        elsewhere = f"{mirror.url}/v2/library/alpine/{kind}/{digest}"
        status, body, _ = await _get(http, elsewhere)
        assert status == 404, (kind, body)
        async with http.head(elsewhere) as response:
            assert response.status == 404
    # where the upstream confirms it is (team/app on docker.io holds it too): the hit
    mark = upstream.mark()
    status, _, headers = await _get(http, f"{mirror.url}/v2/team/app/blobs/{layer}")
    assert (status, headers["X-Mirror-Cache"]) == (200, "hit")
    assert [hit.method for hit in upstream.hits(mark)] == ["HEAD"]


async def test_skopeo_with_wrong_credentials_and_without_the_grant(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    users_file: Path,
    tmp_path: Path,
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file)
    source = f"docker://{mirror.host}/private.example/team/app:v1"
    mark = upstream.mark()
    with pytest.raises(CommandFailed) as wrong:
        await skopeo("inspect", "--tls-verify=false", "--creds", "ci:wrong", source)
    assert "401" in str(wrong.value) or "unauthorized" in str(wrong.value).lower()
    with pytest.raises(CommandFailed) as denied:
        await skopeo("inspect", "--tls-verify=false", "--creds", "bob:bob-secret", source)
    assert "denied" in str(denied.value).lower(), denied.value
    with pytest.raises(CommandFailed):
        await skopeo("inspect", "--tls-verify=false", "--no-creds", source)
    assert upstream.hits(mark) == []  # none of the three reached the upstream
    digest = await skopeo_copy_to_dir(
        f"{mirror.host}/private.example/team/app:v1", tmp_path / "ci", "--src-creds", "ci:ci-secret"
    )
    assert digest == seeded.docker.digest
    anonymous = await skopeo_copy_to_dir(f"{mirror.host}/team/app:v1", tmp_path / "anonymous")
    assert anonymous == seeded.docker.digest  # docker.io/*: anonymous from 127.0.0.0/8


async def test_operations_pages_answer_whom_the_rule_allows(
    make_mirror: MirrorFactory,
    upstream: Registry,
    users_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    default = await _guarded(make_mirror, upstream, users_file)
    for path in ("/metrics", "/", "/healthz", "/readyz"):
        assert (await _get(http, f"{default.url}{path}"))[0] == 200, path  # from loopback
    mirror = await make_mirror(
        {"docker.io": upstream.url, "private.example": upstream.url},
        access=rules(users_file, operations={"users": ["alice"]}),
    )
    for path in ("/metrics", "/"):
        status, _, headers = await _get(http, f"{mirror.url}{path}")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), path
        assert (await _get(http, f"{mirror.url}{path}", basic("bob")))[0] == 403
        assert (await _get(http, f"{mirror.url}{path}", basic("alice")))[0] == 200
    for path in ("/healthz", "/readyz"):
        assert (await _get(http, f"{mirror.url}{path}"))[0] == 200, path  # never guarded
    async with http.get(f"{mirror.url}/metrics", headers=basic("alice")) as response:
        text = await response.text()
    assert (await _get(http, f"{mirror.url}/metrics", basic("alice", "wrong")))[0] == 401
    assert 'mirror_access_refused_total{reason="credentials"}' in text
    assert 'mirror_access_refused_total{reason="denied"}' in text


async def test_the_access_log_says_who_and_what_was_decided(
    tmp_path: Path, upstream: Registry, users_file: Path
) -> None:
    from tests.support.process import MirrorProcess

    settings = {
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": upstream.url}, "private.example": {"url": upstream.url}},
        "access": rules(users_file),
    }
    settings["access"]["operations"] = {"users": ["alice"]}
    mirror = await MirrorProcess(tmp_path, settings).start()
    try:
        async with aiohttp.ClientSession() as http:
            assert (await _get(http, f"{mirror.url}/v2/"))[0] == 401  # how every client starts
            await _get(http, f"{mirror.url}{TEAM_APP}", basic("bob"))
            await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci"))
            await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci", "wrong"))
            await _get(http, f"{mirror.url}/metrics", basic("alice", "wrong"))
            await _get(http, f"{mirror.url}/metrics", basic("alice"))
    finally:
        await mirror.stop()
    pings = [line for line in mirror.log.read_text().splitlines() if '"GET /v2/"' in line]
    assert len(pings) == 1 and pings[0].endswith("user=- access=challenged")  # not a refusal
    metrics = [line for line in mirror.log.read_text().splitlines() if "/metrics" in line]
    assert len(metrics) == 1 and metrics[0].endswith("user=- access=refused:credentials")
    lines = [line for line in mirror.log.read_text().splitlines() if TEAM_APP in line]
    assert len(lines) == 3, lines
    assert lines[0].endswith("user=bob access=refused:denied") and '" 403 ' in lines[0]
    assert lines[1].endswith("user=ci access=allowed") and '" 200 ' in lines[1]
    assert lines[2].endswith("user=- access=refused:credentials") and '" 401 ' in lines[2]
    assert "ci-secret" not in mirror.log.read_text() and "wrong" not in mirror.log.read_text()


async def test_the_ops_port_answers_plain_http_while_the_main_port_serves_tls(
    tmp_path: Path, upstream: Registry, users_file: Path
) -> None:
    """Probes and Prometheus on ops_listen (plain HTTP) beside a TLS main port, with two
    workers sharing both ports."""
    from tests.support.pki import make_pki
    from tests.support.process import MirrorProcess
    from tests.support.registry import free_port

    pki = make_pki(tmp_path / "pki")
    ops = f"127.0.0.1:{free_port()}"
    settings = {
        "workers": 2,
        "ops_listen": ops,
        "tls": {"cert": str(pki.server_cert), "key": str(pki.server_key)},
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": upstream.url}, "private.example": {"url": upstream.url}},
        "access": rules(users_file),
    }
    mirror = await MirrorProcess(tmp_path, settings).start()
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz", "/metrics", "/"):
                async with http.get(f"http://{ops}{path}") as response:
                    assert response.status == 200, path
            async with http.get(f"http://{ops}/metrics") as response:
                text = await response.text()
                assert "# TYPE mirror_upstream_up gauge" in text
                assert 'mirror_build_info{version="' in text  # summed over both workers: 1
            context = ssl.create_default_context(cafile=str(pki.ca))
            async with http.get(f"https://{mirror.host}/v2/", ssl=context) as response:
                assert response.status == 401
                challenge = response.headers["WWW-Authenticate"]
                assert challenge.startswith(f'Bearer realm="https://{mirror.host}/token"')
            async with http.get(
                f"https://{mirror.host}{TEAM_APP}", ssl=context, headers={**ACCEPT, **basic("ci")}
            ) as response:
                assert response.status == 200
    finally:
        await mirror.stop()


@pytest.mark.in_process  # the limit is counted per worker process
async def test_guesses_sent_at_once_are_held_to_the_limit(
    make_mirror: MirrorFactory, upstream: Registry, users_file: Path
) -> None:
    """Checks under way count: 60 wrong passwords sent together from one address get at
    most `login_attempts` checked (401), the rest 429, and a second address the same."""
    mirror = await make_mirror(
        {"docker.io": upstream.url, "private.example": upstream.url},
        access=rules(users_file, login_attempts=5),
    )
    for address in ("127.0.0.2", "127.0.0.3"):
        connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=0)
        async with aiohttp.ClientSession(connector=connector) as client:
            answers = await asyncio.gather(
                *(_get(client, f"{mirror.url}/v2/", basic("ci", f"guess{n}")) for n in range(60))
            )
        statuses = [status for status, _, _ in answers]
        assert statuses.count(401) <= 5 and statuses.count(429) >= 55, (address, statuses)


async def test_awkward_credentials_are_refused_not_crashed_on(
    make_mirror: MirrorFactory, upstream: Registry, users_file: Path, http: aiohttp.ClientSession
) -> None:
    long_password = "r" * 80  # htpasswd -B reads 72 bytes of it, so must the mirror
    htpasswd(users_file, "robot", long_password)
    mirror = await _guarded(make_mirror, upstream, users_file)
    robot = {
        "Authorization": "Basic " + base64.b64encode(f"robot:{long_password}".encode()).decode()
    }
    assert (await _get(http, f"{mirror.url}/v2/", robot))[0] == 200
    host, port = mirror.host.split(":")
    for header in (
        b"Bearer mirror1.abc.\xc3\xa9",
        b"Basic \xc3\xa9\xc3\xa9",
        b"Basic " + b"A" * 6000,
    ):
        request = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: " + header + b"\r\n\r\n"
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        status_line = await reader.readline()
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 401"), (header[:30], status_line)


async def test_a_changed_password_ends_the_tokens_issued_before(
    make_mirror: MirrorFactory, upstream: Registry, users_file: Path, http: aiohttp.ClientSession
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file)
    _, answer = await _token(http, mirror.url, "repository:x:pull", basic("carol"))
    bearer = {"Authorization": f"Bearer {answer['token']}"}
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", bearer))[0] == 200
    htpasswd(users_file, "carol", "leaked-so-changed")
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", bearer))[0] == 401
    htpasswd(users_file, "carol", PASSWORDS["carol"])  # the same password again: new salt
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", bearer))[0] == 401
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("carol")))[0] == 200


async def test_without_access_there_is_no_token_endpoint(
    make_mirror: MirrorFactory, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror({"docker.io": upstream.url})
    async with http.get(f"{mirror.url}/token") as response:
        assert response.status == 404


async def test_the_decoy_costs_what_the_dearest_user_does(tmp_path: Path) -> None:
    """An unknown user is checked against a hash as dear as the dearest known one, so the
    time of a refusal does not tell which users exist."""
    from mirror.access.users import UsersFile, _cost

    path = tmp_path / "htpasswd"
    subprocess.run(["htpasswd", "-B", "-C", "9", "-b", "-c", str(path), "heavy", "pw"], check=True)
    users = UsersFile(path)
    assert not await users.check("nobody", "pw")
    assert _cost(users._decoy) == 9
    assert await users.check("heavy", "pw") and not await users.check("heavy", "px")


async def test_the_catalog_lists_what_each_client_may_pull_a_page_at_a_time(
    make_mirror: MirrorFactory,
    upstream: Registry,
    seeded: Seeded,
    users_file: Path,
    http: aiohttp.ClientSession,
) -> None:
    mirror = await _guarded(make_mirror, upstream, users_file)
    assert (await _get(http, f"{mirror.url}{TEAM_APP}", basic("ci")))[0] == 200
    for path in ("/v2/library/alpine/manifests/3.20", "/v2/team/app/manifests/v1"):
        assert (await _get(http, f"{mirror.url}{path}"))[0] == 200
    status, body, _ = await _get(http, f"{mirror.url}/v2/_catalog")
    assert json.loads(body) == {"repositories": ["library/alpine", "team/app"]}  # anonymous
    status, body, _ = await _get(http, f"{mirror.url}/v2/_catalog", basic("ci"))
    everything = ["library/alpine", "private.example/team/app", "team/app"]
    assert json.loads(body) == {"repositories": everything}
    status, body, headers = await _get(http, f"{mirror.url}/v2/_catalog?n=2", basic("ci"))
    assert json.loads(body)["repositories"] == everything[:2]
    assert headers["Link"] == '</v2/_catalog?last=private.example%2Fteam%2Fapp&n=2>; rel="next"'
    status, body, headers = await _get(
        http, f"{mirror.url}/v2/_catalog?last=private.example%2Fteam%2Fapp&n=2", basic("ci")
    )
    assert json.loads(body)["repositories"] == everything[2:] and "Link" not in headers
    assert (await _get(http, f"{mirror.url}/v2/_catalog", basic("ci", "wrong")))[0] == 401
    status, body, _ = await _get(http, f"{mirror.url}/v2/_catalog?n=many")
    assert (status, _error(body)["code"]) == (400, "PAGINATION_NUMBER_INVALID")


@pytest.mark.in_process  # it starts its own mirror process and HAProxy
async def test_behind_haproxy_each_client_is_judged_and_logged_by_its_own_address(
    tmp_path: Path, upstream: Registry, users_file: Path
) -> None:
    """deploy/cluster's HAProxy in front, `trusted_proxies` naming it: rules by network,
    the failed-login limit and the log see the client's address (127.0.0.2 or .3), on
    the fast path too; an X-Forwarded-For a client sends itself changes nothing."""
    from tests.support.engines import free_port, haproxy
    from tests.support.process import MirrorProcess

    access = rules(users_file)
    # Anonymous pulls from .2, and from HAProxy's own address: a path that judged the
    # connection's address, not the client's, would let .3 in.
    access["rules"][0]["networks"] = ["127.0.0.1/32", "127.0.0.2/32"]
    access["operations"] = {"anonymous": True, "networks": ["127.0.0.1/32", "127.0.0.2/32"]}
    ops = f"127.0.0.1:{free_port()}"
    settings = {
        "ops_listen": ops,
        "storage": {"path": str(tmp_path / "cache")},
        "upstreams": {"docker.io": {"url": upstream.url}, "private.example": {"url": upstream.url}},
        "access": access,
        "trusted_proxies": ["127.0.0.1"],  # HAProxy connects from there
    }
    mirror = await MirrorProcess(tmp_path, settings).start()
    config = (Path(__file__).parent.parent / "deploy" / "cluster" / "haproxy.cfg").read_text()
    port = free_port()
    env = {"LISTEN": f"127.0.0.1:{port}"} | {f"MIRROR_{n}": mirror.host for n in (1, 2, 3)}
    alpine = "/v2/library/alpine/manifests/3.20"

    async def get(source: str, url: str, headers: dict[str, str] | None = None) -> int:
        connector = aiohttp.TCPConnector(local_addr=(source, 0))
        async with aiohttp.ClientSession(connector=connector) as session:
            return (await _get(session, url, headers))[0]

    try:
        with haproxy(tmp_path, config, env=env, port=port) as balancer:
            through = balancer.url
            assert await get("127.0.0.2", through + alpine) == 200  # a miss
            assert await get("127.0.0.2", through + alpine) == 200  # cached: the fast path
            assert await get("127.0.0.3", through + alpine) == 401
            spoofed = {"X-Forwarded-For": "127.0.0.2"}
            assert await get("127.0.0.3", through + alpine, spoofed) == 401
            assert await get("127.0.0.3", mirror.url + alpine, spoofed) == 401  # not trusted
            for _ in range(10):  # guesses from .3 hold .3 back, not everyone behind HAProxy
                assert await get("127.0.0.3", through + TEAM_APP, basic("ci", "guess")) == 401
            assert await get("127.0.0.3", through + TEAM_APP, basic("ci")) == 429
            assert await get("127.0.0.2", through + TEAM_APP, basic("ci")) == 200
        # HAProxy keeps its connections to the mirror, and a connection aiohttp took once
        # stays with it: a new one from the trusted address is the fast path's to answer.
        assert await get("127.0.0.1", mirror.url + alpine, {"X-Forwarded-For": "127.0.0.3"}) == 401
        assert await get("127.0.0.1", mirror.url + alpine, {"X-Forwarded-For": "127.0.0.2"}) == 200
        # a proxy in front of the operations port too; an entry with no address is "unknown"
        for port in (mirror.url, f"http://{ops}"):
            for client, status in (("127.0.0.2:4100", 200), ("127.0.0.3", 401), ("junk", 401)):
                got = await get("127.0.0.1", f"{port}/metrics", {"X-Forwarded-For": client})
                assert got == status, (port, client)
    finally:
        await mirror.stop()
    lines = [line for line in mirror.log.read_text().splitlines() if alpine in line]
    remotes = [line.split(": ", 1)[1].split(" ")[0] for line in lines]  # the access lines
    assert remotes == [*["127.0.0.2"] * 2, *["127.0.0.3"] * 4, "127.0.0.2"], lines
    assert lines[-1].split('" 200 ')[1].split()[2] == "hit", lines[-1]


TRUSTED = (ipaddress.ip_network("10.0.0.0/24"), ipaddress.ip_network("fd00::/64"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("10.0.0.5", "192.0.2.7", "192.0.2.7"),  # one trusted proxy
        ("10.0.0.5", "192.0.2.7, 10.0.0.9", "192.0.2.7"),  # two trusted hops
        ("10.0.0.5", "198.51.100.1, 192.0.2.7", "192.0.2.7"),  # what the client sent is before
        ("192.0.2.7", "10.0.0.1", "192.0.2.7"),  # not from a trusted proxy: ignored
        ("10.0.0.5", "", "10.0.0.5"),  # no header
        # No address: the client is "unknown", in no network (never the proxy's address)
        ("10.0.0.5", "unknown", "unknown"),
        ("10.0.0.5", "192.0.2.7, junk, 10.0.0.9", "unknown"),
        ("10.0.0.5", "192.0.2.7, ", "unknown"),
        ("10.0.0.5", "192.0.2.7:41234", "192.0.2.7"),  # with a port (Azure's gateway)
        ("10.0.0.5", "[2001:db8::1]:41234", "2001:db8::1"),
        ("10.0.0.5", "[2001:db8::1]", "2001:db8::1"),
        ("10.0.0.5", "[2001:db8::1]x", "unknown"),
        ("10.0.0.5", "192.0.2.7:http", "unknown"),
        ("10.0.0.5", "0177.0.0.1", "unknown"),  # no octal spellings
        ("fd00::2", "2001:db8::1", "2001:db8::1"),
        ("::ffff:10.0.0.5", "192.0.2.7", "192.0.2.7"),  # a v4 proxy on a dual-stack socket
        (None, "192.0.2.7", None),  # a unix socket
    ],
)
def test_the_client_is_the_first_address_from_the_right_that_is_no_trusted_proxy(
    peer: str | None, forwarded_for: str, client: str | None
) -> None:
    assert client_address(peer, forwarded_for, TRUSTED) == client
    assert client_address(peer, forwarded_for, ()) == peer  # nothing trusted: never read
    if client == "unknown":
        assert not in_networks(client, (ipaddress.ip_network("0.0.0.0/0"),))


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    assert from_mapping(
        {"trusted_proxies": ["10.0.0.5", "fd00::/64", "::ffff:10.1.0.0/112"]}
    ).trusted_proxies == (
        ipaddress.ip_network("10.0.0.5/32"),
        ipaddress.ip_network("fd00::/64"),
        ipaddress.ip_network("10.1.0.0/16"),  # as a dual-stack socket's peers are read
    )
    with pytest.raises(ConfigError, match=r"^trusted_proxies: 'haproxy' is not a network"):
        from_mapping({"trusted_proxies": ["haproxy"]})
    assert trust_warnings(from_mapping({"trusted_proxies": ["10.0.0.0/8"]})) == []
    (warning,) = trust_warnings(from_mapping({"trusted_proxies": ["10.0.0.5", "0.0.0.0/0"]}))
    assert warning.startswith("trusted_proxies: 0.0.0.0/0 holds every address: any client")
