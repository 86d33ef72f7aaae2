"""What each worker process alone knows (upstream health, its most requested
repositories, its transfers in flight), written to a small file now and then, so that the
status page, whichever worker answers it, shows every worker's.

Counters need none of this: Prometheus's multiprocess files add them up. These are the
live parts that are not counters. A snapshot older than STALE_SECONDS, or of a process
that is gone, is left out.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .metrics import Metrics
from .store.fill import process_alive

STALE_SECONDS = 30.0
POPULAR = 50  # repositories each worker reports
ERRORS_SHOWN = 10  # the latest upstream failures, across workers and upstreams


@dataclass
class Health:
    """One upstream as the workers together see it."""

    reachable: bool | None = None
    last_error: str = ""
    retry_at: float = 0.0  # wall-clock time a down upstream is asked again
    down_since: float | None = None
    last_answer: float | None = None
    ratelimit_limit: float | None = None
    ratelimit_remaining: float | None = None


@dataclass
class View:
    """The workers' live state, added up."""

    upstreams: dict[str, Health] = field(default_factory=dict)
    popular: list[tuple[str, int]] = field(default_factory=list)
    errors: list[tuple[float, str, str]] = field(default_factory=list)  # (when, upstream, what)
    transfers: int = 0
    waiting: int = 0
    workers: int = 1


def snapshot(metrics: Metrics, now: float) -> dict[str, Any]:
    """This process's live state, as JSON."""
    return {
        "pid": os.getpid(),
        "written": now,
        "upstreams": {
            name: {
                "reachable": health.reachable,
                "last_error": health.last_error,
                "retry_at": now + health.retry_in() if health.reachable is False else 0.0,
                "down_since": health.down_since,
                "errors": list(health.errors),
                "last_answer": health.last_answer,
                "ratelimit_limit": health.ratelimit_limit,
                "ratelimit_remaining": health.ratelimit_remaining,
            }
            for name, health in metrics.health.items()
        },
        "popular": metrics.repositories.most_common(POPULAR),
        "transfers": metrics.live.transfers_in_flight(),
        "waiting": metrics.live.waiting_clients(),
    }


def write(folder: Path, metrics: Metrics) -> None:
    """Replace this process's snapshot (blocking: run in a thread)."""
    state = snapshot(metrics, time.time())
    final = folder / f"state-{state['pid']}.json"
    temp = folder / f"state-{state['pid']}.json.tmp"
    temp.write_text(json.dumps(state))
    os.replace(temp, final)


def others(folder: Path, now: float) -> list[dict[str, Any]]:
    """The other live workers' snapshots (blocking: run in a thread)."""
    found = []
    for path in folder.glob("state-*.json"):
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(path.read_text())
            pid = int(state["pid"])
            if pid == os.getpid():
                continue
            if not process_alive(pid):  # a worker gone (a restart): its file goes too
                path.unlink(missing_ok=True)
                continue
            if now - float(state["written"]) <= STALE_SECONDS:
                found.append(state)
    return found


def merged(own: dict[str, Any], rest: list[dict[str, Any]], now: float) -> View:
    """Every worker's state as one: an upstream is down while any worker is backing off
    from it, else up if any found it up; its last answer is the latest any had; counts
    are added."""
    view = View(workers=1 + len(rest))
    popular: Counter[str] = Counter()
    errors: set[tuple[float, str, str]] = set()
    for state in (own, *rest):
        view.transfers += int(state["transfers"])
        view.waiting += int(state["waiting"])
        popular.update({name: int(count) for name, count in state["popular"]})
        for name, seen in state["upstreams"].items():
            health = view.upstreams.setdefault(name, Health())
            errors.update((float(when), name, str(what)) for when, what in seen.get("errors", []))
            latest = health.last_answer is None or (
                seen["last_answer"] is not None and seen["last_answer"] > health.last_answer
            )
            if seen["last_answer"] is not None and latest:
                health.last_answer = seen["last_answer"]
                health.ratelimit_limit = seen["ratelimit_limit"]
                health.ratelimit_remaining = seen["ratelimit_remaining"]
            backing_off = health.reachable is False and health.retry_at > now
            if seen["reachable"] is False and seen["retry_at"] > now:  # down there now
                if not backing_off or seen["retry_at"] > health.retry_at:
                    health.last_error, health.retry_at = seen["last_error"], seen["retry_at"]
                since = seen.get("down_since")
                if since is not None and (health.down_since is None or since < health.down_since):
                    health.down_since = since  # the earliest any worker saw it go
                health.reachable = False
            elif seen["reachable"] is True and not backing_off:
                health.reachable = True
            elif seen["reachable"] is False and health.reachable is None:
                health.reachable, health.last_error = False, seen["last_error"]
    view.popular = popular.most_common(10)
    view.errors = sorted(errors, reverse=True)[:ERRORS_SHOWN]
    for health in view.upstreams.values():
        if health.reachable is not False:
            health.down_since = None
    return view
