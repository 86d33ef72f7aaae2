"""Waiting for something a test cannot be told about directly: bounded, and loud when the
time runs out (a wait that ends quietly would let the assertion after it pass unchecked)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    """Return once `condition()` holds; raise AssertionError naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g}s waiting until {what}")
        await asyncio.sleep(0.01)
