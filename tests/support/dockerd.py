"""A throwaway dockerd: its own data root and socket, no network set-up; for the end-to-end
tests (vfs storage, which works anywhere) and the wide-area benchmark (overlay2, what dockerd
uses on a real host)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path


@contextlib.contextmanager
def dockerd(
    root: Path, daemon_json: str, environ: Mapping[str, str], storage_driver: str = "vfs"
) -> Iterator[dict[str, str]]:
    """dockerd configured by `daemon_json`, run with `environ` added (proxies); yields the
    environment a `docker` command talks to it with. The socket path must stay short."""
    binary = shutil.which("dockerd")
    assert binary, "dockerd is needed (apt-get install docker.io): scripts/test installs it"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "daemon.json"
    config.write_text(daemon_json)
    socket = root / "docker.sock"
    process = subprocess.Popen(
        [
            binary,
            "--config-file",
            str(config),
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "--host",
            f"unix://{socket}",
            "--storage-driver",
            storage_driver,
            "--bridge",
            "none",
            "--iptables=false",
            "--ip6tables=false",
        ],
        stdout=(root / "dockerd.log").open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **environ},
    )
    env = {**os.environ, "DOCKER_HOST": f"unix://{socket}"}
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "version"], env=env, capture_output=True).returncode:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"dockerd did not start: {(root / 'dockerd.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield {"DOCKER_HOST": env["DOCKER_HOST"]}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
