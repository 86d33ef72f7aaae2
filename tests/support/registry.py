"""Debian's docker-registry (CNCF distribution 2.8) as a real upstream for the tests.

Each instance runs on an ephemeral loopback port with its own storage, and reads its access
log so tests can count exactly which requests reached the upstream.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_ACCESS_RE = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3}) ')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Hit:
    method: str
    path: str  # without the query
    status: int


class Registry:
    """One docker-registry process; `stop()` kills it, `start()` brings it back on its port."""

    def __init__(
        self,
        root: Path,
        auth: dict[str, Any] | None = None,
        tls: dict[str, Any] | None = None,
        probe: ssl.SSLContext | None = None,
    ) -> None:
        """`tls` is distribution's `http.tls` section (certificate, key, clientcas);
        `probe` the TLS context that checks it is up."""
        self.binary = shutil.which("docker-registry")
        if self.binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._probe = probe
        self.log_path = root / "registry.log"
        self.config_path = root / "config.yml"
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"addr": f"127.0.0.1:{self.port}", **({"tls": tls} if tls else {})},
        }
        if auth is not None:
            config["auth"] = auth
        self.config_path.write_text(yaml.safe_dump(config))
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert self.binary is not None
        log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            [self.binary, "serve", str(self.config_path)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_path.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=self._probe)
                return
            except urllib.error.HTTPError:
                return  # 401 under auth: it is up
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("docker-registry did not start")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def mark(self) -> int:
        """A position in the access log; `hits(since=mark)` lists what came after."""
        time.sleep(0.05)
        return self.log_path.stat().st_size

    def hits(self, since: int = 0, settle: float = 0.3) -> list[Hit]:
        time.sleep(settle)  # the registry logs a request just after answering it
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return [
            Hit(m.group(1), m.group(2).split("?")[0], int(m.group(3)))
            for m in _ACCESS_RE.finditer(text)
        ]
