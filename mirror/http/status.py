"""The status page at `/`: server-rendered HTML, no script, readable on a phone.

Its numbers come from the same metrics Prometheus scrapes, plus the store's index for the
largest cached repositories, so the page and the dashboards never disagree.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from html import escape

from aiohttp import web

from .. import snapshots
from ..config import Config
from ..errors import Handler
from ..images.catalog import CachedImage, cached_images
from ..maintenance import human
from ..metrics import Metrics, shared_folder
from ..snapshots import Health, View
from ..store.base import BlobStore
from ..store.disk import DiskStore
from ..store.tags import TagIndex
from ..version import VERSION

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:56rem;padding:1rem;color:#1d232a}
h1{font-size:1.4rem;margin:.2rem 0 1rem}h2{font-size:1.05rem;margin:1.4rem 0 .4rem}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(11rem,1fr));gap:.6rem}
.card{border:1px solid #d5dbe1;border-radius:8px;padding:.6rem .8rem}
.card b{display:block;font-size:1.35rem}.card span{color:#56606b;font-size:.85rem}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.3rem .4rem;
border-bottom:1px solid #e6eaee;font-size:.92rem}th{color:#56606b;font-weight:600}
td.n{text-align:right;white-space:nowrap}.up{color:#17803d}.down{color:#b42318}
.bar{background:#e6eaee;border-radius:4px;height:.5rem;margin-top:.3rem}
.bar i{display:block;height:100%;border-radius:4px;background:#2f6fde}
footer{margin-top:1.5rem;color:#56606b;font-size:.8rem}
"""


IMAGES_SHOWN = 20  # the status page lists the most recently used cached images


def _card(value: str, label: str, extra: str = "") -> str:
    return f'<div class="card"><b>{escape(value)}</b><span>{escape(label)}</span>{extra}</div>'


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {seconds}s" if minutes else f"{seconds}s"


def _table(
    headers: tuple[str, ...],
    rows: Sequence[tuple[str, ...]],
    numeric: int = 1,
    styles: Sequence[str] = (),
) -> str:
    """A table; the last `numeric` columns right-aligned, the second column of row i in
    the class styles[i] (up, down) when given."""
    if not rows:
        return "<p>Nothing yet.</p>"
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = ""
    for number, row in enumerate(rows):
        style = styles[number] if number < len(styles) else ""
        cells = [
            f'<td class="n">{escape(c)}</td>'
            if i >= len(row) - numeric
            else f'<td class="{style}">{escape(c)}</td>'
            if i == 1 and style
            else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        ]
        body += "<tr>" + "".join(cells) + "</tr>"
    return f"<table><tr>{head}</tr>{body}</table>"


def render(
    config: Config,
    metrics: Metrics,
    store: BlobStore,
    usage_by: list[tuple[str, str, int, int]],
    view: View,
    images: list[CachedImage],
) -> str:
    content = {"kind": "blob"}, {"kind": "manifest"}
    hits = sum(
        metrics.total("mirror_requests_total", result=r, **k)
        for k in content
        for r in ("hit", "stale")
    )
    misses = sum(
        metrics.total("mirror_requests_total", result=r, **k)
        for k in content
        for r in ("miss", "coalesced")
    )
    ratio = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
    from_cache = metrics.value("mirror_served_bytes_total", source="cache")
    fetched = metrics.total("mirror_upstream_fetched_bytes_total")
    used, entries = store.usage()
    share = min(used / store.max_size, 1.0) if store.max_size else 0.0
    bar = f'<div class="bar"><i style="width:{share * 100:.1f}%"></i></div>'
    in_flight, waiting = view.transfers, view.waiting
    now = time.time()

    cards = "".join(
        [
            _card(ratio, f"hit ratio ({hits:.0f} of {hits + misses:.0f} requests)"),
            _card(human(from_cache), "served from the cache"),
            _card(human(fetched), "fetched from upstreams"),
            _card(f"{human(used)} / {human(store.max_size)}", f"cache use, {entries} entries", bar),
            _card(str(in_flight), f"transfers in flight, {waiting} clients on them"),
            _card(
                _duration(now - metrics.started),
                "up for" + (f" ({view.workers} workers)" if view.workers > 1 else ""),
            ),
        ]
    )

    upstream_rows = []
    styles = []
    for name, upstream in sorted(config.upstreams.items()):
        health = view.upstreams.get(name, Health())
        style = ""
        if upstream.offline:
            state = "offline (by configuration)"
        elif health.reachable is None:
            state = "not contacted yet"
        elif health.reachable:
            state, style = "up", "up"
        else:
            retry = max(0.0, health.retry_at - now)
            style = "down"
            state = f"down: {health.last_error}" + (
                f" (asked again in {retry:.0f}s)" if retry else ""
            )
            if health.down_since is not None:
                state += f"; down since {_duration(now - health.down_since)} ago"
        if health.last_answer is not None and style:
            state += f"; last answer {_duration(now - health.last_answer)} ago"
        styles.append(style)
        limit = (
            f"{health.ratelimit_remaining:.0f} of {health.ratelimit_limit:.0f}"
            if health.ratelimit_remaining is not None and health.ratelimit_limit is not None
            else "-"
        )
        requests = metrics.total("mirror_upstream_requests_total", upstream=name)
        fetched_here = metrics.total("mirror_upstream_fetched_bytes_total", upstream=name)
        cached = metrics.total("mirror_upstream_answers_total", upstream=name, source="cache")
        answered = metrics.total("mirror_upstream_answers_total", upstream=name)
        spared = metrics.total(
            "mirror_upstream_answered_bytes_total", upstream=name, source="cache"
        )
        upstream_rows.append(
            (
                name,
                state,
                f"{cached / answered:.0%}" if answered else "-",
                human(spared),
                f"{requests:.0f}",
                human(fetched_here),
                limit,
            )
        )

    popular = [(name, f"{count}") for name, count in view.popular]
    error_rows = [(f"{_duration(now - when)} ago", name, what) for when, name, what in view.errors]
    recent = sorted(images, key=lambda image: image.last_used, reverse=True)[:IMAGES_SHOWN]
    image_rows = [
        (
            image.reference,
            ", ".join(image.platforms) or "-",
            human(image.size),
            f"{_duration(now - image.last_used)} ago" if image.last_used else "-",
            ", ".join(
                word
                for word, applies in (("pinned", image.pinned), ("incomplete", not image.complete))
                if applies
            )
            or "-",
        )
        for image in recent
    ]
    more = (
        f"<p>{len(images) - len(recent)} more: <code>mirror ls</code> lists them all.</p>"
        if len(images) > len(recent)
        else ""
    )
    largest = [
        (f"{upstream}/{repository}" if upstream else repository or "-", human(size), str(count))
        for upstream, repository, size, count in usage_by[:10]
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="15">
<title>mirror status</title><style>{STYLE}</style></head>
<body>
<h1>Registry mirror <small>{escape(VERSION)}</small></h1>
<div class="cards">{cards}</div>
<h2>Upstreams</h2>
{
        _table(
            (
                "upstream",
                "state",
                "hit ratio",
                "from the cache",
                "requests",
                "fetched",
                "pulls left",
            ),
            upstream_rows,
            5,
            styles,
        )
    }
<h2>Latest upstream errors</h2>
{_table(("when", "upstream", "what"), error_rows, numeric=0)}
<h2>Most requested repositories</h2>
{_table(("repository", "requests"), popular)}
<h2>Largest cached repositories</h2>
{_table(("repository", "size", "entries"), largest, numeric=2)}
<h2>Cached images, most recently used first</h2>
{_table(("image", "platforms", "size", "last used", "state"), image_rows, numeric=2)}
{more}
<footer>Default upstream: {escape(config.default_upstream)}.
Metrics for Prometheus at <a href="/metrics">/metrics</a>.</footer>
</body></html>
"""


def status_handler(config: Config, metrics: Metrics, store: DiskStore, tags: TagIndex) -> Handler:
    async def status_page(request: web.Request) -> web.StreamResponse:
        """GET /: the status page (the usage by repository and the cached images are
        scans: off the loop)."""
        usage_by = await asyncio.to_thread(store.usage_by)
        images = await asyncio.to_thread(cached_images, store, tags)
        now = time.time()
        folder = shared_folder()
        rest = await asyncio.to_thread(snapshots.others, folder, now) if folder else []
        view = snapshots.merged(snapshots.snapshot(metrics, now), rest, now)
        page = render(config, metrics, store, usage_by, view, images)
        return web.Response(text=page, content_type="text/html")

    return status_page
