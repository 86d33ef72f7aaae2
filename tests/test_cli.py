"""`mirror serve --config FILE` as a real process, as users run it."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Seeded
from tests.support.clients import skopeo_copy_to_dir
from tests.support.process import MIRROR, MirrorProcess
from tests.support.registry import Registry


@pytest.fixture(params=[1, 2], ids=["1-worker", "2-workers"])
async def served(
    tmp_path: Path, upstream: Registry, request: pytest.FixtureRequest
) -> AsyncIterator[str]:
    mirror = MirrorProcess(
        tmp_path,
        {
            "workers": request.param,
            "storage": {"path": str(tmp_path / "cache")},
            "upstreams": {"docker.io": {"url": upstream.url}},
        },
    )
    await mirror.start()
    yield mirror.host
    assert await mirror.stop() == 0


async def test_served_process_pulls_with_skopeo(
    served: str, seeded: Seeded, tmp_path: Path
) -> None:
    digest = await skopeo_copy_to_dir(f"{served}/library/alpine:3.20", tmp_path / "out")
    assert digest == seeded.oci.digest
    async with aiohttp.ClientSession() as session:
        for path in ("/healthz", "/readyz", "/metrics"):
            async with session.get(f"http://{served}{path}") as response:
                assert response.status == 200


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("storage: {max_size: huge}\n", "storage.max_size:"),
        ("upstreams: {docker.io: {url: https://r, colour: red}}\n", "upstreams.docker.io.colour"),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "mirror.yaml"
    config.write_text(text)
    result = subprocess.run(
        [*MIRROR, "serve", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [*MIRROR, "serve", "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "nope.yaml: cannot read" in result.stderr
