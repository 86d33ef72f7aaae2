"""What operators see: exact metrics after a scripted sequence, the status page in a real
headless browser, health endpoints, and JSON logs without secrets."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirror.app import STORE
from mirror.reference import parse_digest
from tests.conftest import MirrorFactory, RelayFactory, Seeded
from tests.support.clients import run
from tests.support.clock import ManualClock
from tests.support.images import Pusher
from tests.support.process import MirrorProcess
from tests.support.registry import Registry
from tests.support.tokens import TokenServer
from tests.support.waiting import until

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


async def _read(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as response:
        return response.status, await response.read()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _get(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def scripted(
    make_mirror: MirrorFactory, make_relay: RelayFactory, upstream: Registry, clock: ManualClock
) -> dict[str, object]:
    """A mirror taken through a miss, a hit, a coalesced pull, a stale answer, a negative
    answer and an eviction, with what it fetched."""
    image = Pusher(upstream.url).image("observed/app", "1", layer_sizes=(3000, 5000, 7000))
    config_digest = next(d for d in image.blobs if d not in image.layers)
    a, b, c = image.layers
    sizes = {d: len(image.blobs[d]) for d in image.blobs}
    relay = await make_relay(upstream.url, ratelimit=(100, 76))
    bound = sizes[a] + sizes[b] + len(image.manifest) + sizes[c] - 1
    mirror = await make_mirror(  # no prefetch: each blob is asked for by the script
        {"docker.io": {"url": relay.url, "prefetch": False}},
        max_size=bound,
        manifest_ttl=0,
        clock=clock,
    )
    base = f"{mirror.url}/v2/observed/app"
    async with aiohttp.ClientSession() as http:
        assert (await _read(http, f"{base}/blobs/{a}"))[0] == 200  # miss
        store = mirror.app[STORE]
        # kept once flushed, just after the client had it
        await until(lambda: store.has_blob(parse_digest(a)), "A is kept")  # type: ignore[arg-type]
        assert (await _read(http, f"{base}/blobs/{a}"))[0] == 200  # hit
        relay.faults.rate = 4000  # B takes over a second to arrive
        first = asyncio.create_task(_read(http, f"{base}/blobs/{b}"))  # miss
        while relay.count("GET", b) == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        second = asyncio.create_task(_read(http, f"{base}/blobs/{b}"))  # coalesced
        assert [r[0] for r in await asyncio.gather(first, second)] == [200, 200]
        relay.faults.rate = None
        assert (await _read(http, f"{base}/manifests/1"))[0] == 200  # miss
        relay.faults.status = 503
        assert (await _read(http, f"{base}/manifests/1"))[0] == 200  # stale
        relay.faults.status = None
        clock.advance(1.5)  # past the failed upstream's back-off
        assert (await _read(http, f"{base}/manifests/nope"))[0] == 404  # error
        assert (await _read(http, f"{base}/manifests/nope"))[0] == 404  # negative
        clock.advance(2)  # everything is past the eviction grace
        assert (await _read(http, f"{base}/blobs/{c}"))[0] == 200  # miss, evicts A
        await until(lambda: store.has_blob(parse_digest(c)), "C is kept")  # type: ignore[arg-type]
        # room is made just after C's rename: wait for it, not only for C
        await until(lambda: store.evictions()[0] >= 1, "A is evicted for C")
        status, metrics_text = await _read(http, f"{mirror.url}/metrics")
    assert status == 200
    return {
        "mirror": mirror,
        "metrics": metrics_text.decode(),
        "sizes": sizes,
        "layers": (a, b, c),
        "manifest": image.manifest,
        "config": config_digest,
    }


@pytest.mark.in_process  # metrics and health are per process
async def test_counters_after_a_scripted_sequence(scripted: dict[str, object]) -> None:
    samples = _samples(str(scripted["metrics"]))
    sizes: dict[str, int] = scripted["sizes"]  # type: ignore[assignment]
    a, b, c = scripted["layers"]  # type: ignore[misc]
    manifest: bytes = scripted["manifest"]  # type: ignore[assignment]

    def requests(kind: str, status: str, result: str) -> float:
        return _get(
            samples, "mirror_requests_total", kind=kind, method="GET", status=status, result=result
        )

    assert requests("blob", "2xx", "miss") == 3
    assert requests("blob", "2xx", "hit") == 1
    assert requests("blob", "2xx", "coalesced") == 1
    assert requests("manifest", "2xx", "miss") == 1
    assert requests("manifest", "2xx", "stale") == 1
    assert requests("manifest", "4xx", "error") == 1
    assert requests("manifest", "4xx", "negative") == 1
    assert _get(samples, "mirror_cache_evictions_total") == 1
    assert _get(samples, "mirror_cache_evicted_bytes_total") == sizes[a]
    fetched = sizes[a] + sizes[b] + sizes[c]
    assert _get(samples, "mirror_upstream_fetched_bytes_total", upstream="docker.io") == fetched
    assert _get(samples, "mirror_served_bytes_total", source="cache") == sizes[a] + len(manifest)
    served_upstream = sizes[a] + 2 * sizes[b] + sizes[c] + len(manifest)
    assert _get(samples, "mirror_served_bytes_total", source="upstream") == served_upstream
    up = {"upstream": "docker.io"}
    assert _get(samples, "mirror_upstream_requests_total", method="GET", status="200", **up) == 4
    assert _get(samples, "mirror_upstream_requests_total", method="HEAD", status="503", **up) == 1
    assert _get(samples, "mirror_upstream_requests_total", method="GET", status="404", **up) == 1
    assert _get(samples, "mirror_upstream_ratelimit_limit", **up) == 100
    assert _get(samples, "mirror_upstream_ratelimit_remaining", **up) == 76
    assert _get(samples, "mirror_upstream_request_duration_seconds_count", **up) == 6
    assert _get(samples, "mirror_cache_max_size_bytes") > 0
    assert _get(samples, "mirror_transfers_in_flight") == 0
    # bounded labels: no repository name or digest anywhere in the exposition
    assert "observed/app" not in str(scripted["metrics"])
    assert "sha256" not in str(scripted["metrics"])


@pytest.mark.in_process  # metrics and health are per process
async def test_status_page_in_headless_chromium(scripted: dict[str, object]) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser, "chromium is needed (apt-get install chromium): scripts/test installs it"
    mirror = scripted["mirror"]
    url = f"{mirror.url}/"  # type: ignore[attr-defined]
    ARTIFACTS.mkdir(exist_ok=True)
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={ARTIFACTS / 'chromium-profile'}",
    ]
    dom = await run(browser, *flags, "--dump-dom", url, timeout=120)
    text = " ".join(dom.split())
    assert "Registry mirror" in text
    assert "hit ratio (2 of 7 requests)" in text  # hit + stale, of 7 content answers
    assert "docker.io" in text and "76 of 100" in text  # pulls left, as last seen
    assert "observed/app" in text  # most requested and largest repositories
    assert "up for" in text and "last answer" in text
    assert '<td class="up">up; last answer' in dom  # the state in its colour
    # the 503 of the scripted sequence, among the latest upstream errors
    assert "Latest upstream errors" in text and "answered 503" in text
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    await run(browser, *flags, f"--screenshot={shot}", "--window-size=420,1300", url, timeout=120)
    assert shot.stat().st_size > 10_000
    shutil.rmtree(ARTIFACTS / "chromium-profile", ignore_errors=True)


@pytest.mark.in_process  # metrics and health are per process
async def test_health_and_readiness_with_the_upstream_down(
    make_mirror: MirrorFactory, http: aiohttp.ClientSession
) -> None:
    mirror = await make_mirror({"docker.io": "http://127.0.0.1:9"})
    await _read(http, f"{mirror.url}/v2/alpine/manifests/1")  # fails: upstream down
    async with http.get(f"{mirror.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{mirror.url}/readyz") as response:
        assert response.status == 200  # a mirror with a cache is useful without upstreams
        body = await response.json()
    assert body["store"] == "ok"
    assert body["upstreams"]["docker.io"]["reachable"] is False
    async with http.get(f"{mirror.url}/") as response:
        page = await response.text()
    assert '<td class="down">down: ' in page and re.search(r"; down since \d+s ago", page)


async def test_json_logs_parse_and_hold_no_secret(
    auth_upstream: Registry,
    auth_pusher: Pusher,
    token_server: TokenServer,
    tmp_path: Path,
    seeded: Seeded,
) -> None:
    image = auth_pusher.image("private/logged", "1")
    mirror = await MirrorProcess(
        tmp_path,
        {
            "storage": {"path": str(tmp_path / "cache")},
            "log_format": "json",
            "upstreams": {
                "docker.io": {
                    "url": auth_upstream.url,
                    "username": "alice",
                    "password": "wonderland",
                }
            },
        },
    ).start()
    try:
        async with aiohttp.ClientSession() as http:
            for digest in image.blobs:
                assert (await _read(http, f"{mirror.url}/v2/private/logged/blobs/{digest}"))[
                    0
                ] == 200
            assert (await _read(http, f"{mirror.url}/v2/private/logged/manifests/1"))[0] == 200
            assert (await _read(http, f"{mirror.url}/v2/private/none/manifests/1"))[0] == 404
            _, metrics_text = await _read(http, f"{mirror.url}/metrics")
    finally:
        await mirror.stop()
    lines = [line for line in mirror.log.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]
    access = [e for e in entries if e["logger"] == "mirror.access" and "/private/" in e["path"]]
    assert len(access) == len(image.blobs) + 2
    assert {"method", "path", "status", "bytes", "duration", "result", "upstream"} <= set(access[0])
    assert [e["status"] for e in access][-2:] == [200, 404]
    assert access[0]["agent"].startswith("Python/") and "aiohttp" in access[0]["agent"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", access[0]["time"])
    log_text = mirror.log.read_text()
    for secret in ("wonderland", "Basic ", "Bearer "):
        assert secret not in log_text
        assert secret not in metrics_text.decode()
    samples = _samples(metrics_text.decode())
    granted = _get(
        samples, "mirror_upstream_token_requests_total", upstream="docker.io", outcome="granted"
    )
    assert granted == 2  # one token per repository scope


@pytest.mark.in_process  # metrics and health are per process
async def test_dashboard_and_scrape_example_use_metrics_that_exist(
    scripted: dict[str, object],
) -> None:
    import re

    import yaml

    root = Path(__file__).parent.parent / "deploy"
    dashboard = json.loads((root / "grafana" / "mirror-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\bmirror_[a-z_]+", expr)}
    declared = set(re.findall(r"^# TYPE (mirror_[a-z_]+)", str(scripted["metrics"]), re.M))
    exposed = declared | {name for name, _ in _samples(str(scripted["metrics"]))}
    assert used and used <= exposed, used - exposed
    scrape = yaml.safe_load((root / "prometheus" / "prometheus.yml").read_text())
    assert scrape["scrape_configs"][0]["metrics_path"] == "/metrics"


async def test_each_upstreams_counters_exist_at_zero_from_the_start(
    make_mirror: MirrorFactory, upstream: Registry, http: aiohttp.ClientSession
) -> None:
    """A dashboard's rate() or an alert sees 0 before the first pull, not a missing series."""
    mirror = await make_mirror({"docker.io": upstream.url, "ghcr.io": upstream.url})
    async with http.get(f"{mirror.url}/metrics") as response:
        text = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    for upstream_name in ("docker.io", "ghcr.io"):
        for name in (
            "mirror_upstream_fetched_bytes_total",
            "mirror_prefetched_bytes_total",
            "mirror_prefetch_hits_total",
        ):
            assert samples[(name, (("upstream", upstream_name),))] == 0
    for source in ("cache", "upstream"):
        assert samples[("mirror_served_bytes_total", (("source", source),))] == 0
        for upstream_name in ("docker.io", "ghcr.io"):
            labels = (("source", source), ("upstream", upstream_name))
            assert samples[("mirror_upstream_answers_total", labels)] == 0
            assert samples[("mirror_upstream_answered_bytes_total", labels)] == 0
