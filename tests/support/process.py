"""`mirror serve` as a real child process, for tests that restart or kill it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.support.registry import free_port

MIRROR = [sys.executable, "-m", "mirror"]


class MirrorProcess:
    def __init__(self, workdir: Path, settings: dict[str, Any]) -> None:
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.config = workdir / f"mirror-{self.port}.yaml"
        self.config.write_text(yaml.safe_dump({"listen": self.host, **settings}))
        self.log = workdir / f"mirror-{self.port}.log"
        # Up when /healthz answers: on the operations port when there is one (the main
        # port may serve TLS).
        ops = settings.get("ops_listen")
        self._probe = f"http://{ops}/healthz" if ops else f"{self.url}/healthz"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> MirrorProcess:
        with self.log.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                *MIRROR,
                "serve",
                "--config",
                str(self.config),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                if self._process.returncode is not None:
                    raise RuntimeError(f"mirror exited: {self.log.read_text()[-2000:]}")
                try:
                    async with session.get(self._probe) as response:
                        if response.status == 200:
                            return self
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.05)
        self._process.kill()  # not left behind the failed test
        await self._process.wait()
        raise RuntimeError(f"mirror did not start: {self.log.read_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def kill(self) -> None:
        """SIGKILL: no clean-up of any kind runs."""
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        await self._process.wait()

    async def stop(self, within: float = 15) -> int:
        """SIGTERM, and the exit status; a mirror that does not stop `within` seconds is
        killed (never left behind) and the test fails saying so."""
        if self._process is None:
            return 0
        if self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), within)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
                raise AssertionError(
                    f"mirror did not stop within {within:g} s of SIGTERM: "
                    f"{self.log.read_text()[-3000:]}"
                ) from None
            log = self.log.read_text()
            assert "stop took over" not in log, f"the mirror's stop overran: {log[-3000:]}"
        return self._process.returncode or 0

    async def command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a maintenance command (`mirror verify`, ...) on this mirror's config."""
        return await mirror_command(self.config, *args)


async def mirror_command(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `mirror <args> --config <config>` and collect what it said."""
    process = await asyncio.create_subprocess_exec(
        *MIRROR,
        *args,
        "--config",
        str(config),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await process.communicate()
    return subprocess.CompletedProcess(
        list(args), process.returncode or 0, out.decode(), err.decode()
    )
