"""A clock the test moves by hand: TTLs, remembered 404s, token expiry and the eviction
grace are tested without sleeping."""

from __future__ import annotations

import time


class ManualClock:
    """Wall-clock seconds that pass only when `advance` says so."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
