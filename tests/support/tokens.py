"""A small JWT-issuing token server, as Docker Hub, GHCR and Quay run beside their registries.

docker-registry's `auth: token` trusts it through the certificate in `rootcertbundle`; the
server signs RS256 tokens with an `x5c` header, records every scope it grants, and holds
one private repository prefix (`private/`) that only `alice` may pull.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

SERVICE = "mirror-test-registry"
ISSUER = "mirror-test-issuer"
ACR_USER = "00000000-0000-0000-0000-000000000000"
ACR_REFRESH_TOKEN = "acr-refresh-token-for-tests"
AAD_REFRESH_TOKEN = "aad-refresh-token-for-tests"
USERS = {"alice": "wonderland", ACR_USER: ACR_REFRESH_TOKEN}
PRIVATE_READERS = ("alice", ACR_USER)
PRIVATE_PREFIX = "private/"


class TokenServer:
    def __init__(self, root: Path, lifetime: int = 30) -> None:
        self.lifetime = lifetime
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test token issuer")])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_path = root / "token-issuer.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self.grants: list[tuple[str | None, str]] = []  # (user, granted scope)
        self.requests = 0
        self.exchanges: list[dict[str, str]] = []  # ACR /oauth2/exchange forms received
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.realm = f"{self.url}/token"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def registry_auth(self) -> dict[str, Any]:
        """The `auth:` section for docker-registry's config."""
        return {
            "token": {
                "realm": self.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(self.cert_path),
            }
        }

    def issue(self, user: str | None, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": user or "",
            "aud": SERVICE,
            "exp": now + self.lifetime,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self._cert.public_bytes(serialization.Encoding.DER)
        return jwt.encode(
            claims,
            self._key,
            algorithm="RS256",
            headers={"x5c": [base64.b64encode(der).decode()]},
        )

    def admin_authorization(self, scope: str) -> str:
        """A push-and-pull token for seeding, granted without the HTTP round trip."""
        kind, name, actions = scope.split(":")
        token = self.issue("admin", [{"type": kind, "name": name, "actions": actions.split(",")}])
        return f"Bearer {token}"

    def granted_scopes(self) -> list[tuple[str | None, str]]:
        with self._lock:
            return list(self.grants)

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            _, name, _ = parts
            if name.startswith(PRIVATE_PREFIX) and user not in PRIVATE_READERS:
                continue
            access.append({"type": "repository", "name": name, "actions": ["pull"]})
            with self._lock:
                self.grants.append((user, f"repository:{name}:pull"))
        return access

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                """ACR's /oauth2/exchange: an AAD refresh token for a registry one."""
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                with server._lock:
                    server.exchanges.append(form)
                if (
                    urlsplit(self.path).path != "/oauth2/exchange"
                    or form.get("refresh_token") != AAD_REFRESH_TOKEN
                ):
                    self._answer(401, {"error": "invalid token"})
                    return
                self._answer(200, {"refresh_token": ACR_REFRESH_TOKEN})

            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                query = parse_qs(urlsplit(self.path).query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, password = base64.b64decode(header[6:]).decode().partition(":")
                    if USERS.get(name) != password:
                        self._answer(401, {"details": "bad credentials"})
                        return
                    user = name
                access = server._grant(user, query.get("scope", []))
                token = server.issue(user, access)
                self._answer(
                    200,
                    {
                        "token": token,
                        "access_token": token,
                        "expires_in": server.lifetime,
                        "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
                    },
                )

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
