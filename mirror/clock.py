"""The time that decides what has expired: tag answers, remembered 404s, tokens, the
eviction grace. One object on the app, so tests move it by hand instead of sleeping.

Timeouts of network operations are not measured with it: they are about real time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]  # wall-clock seconds since the epoch

system_clock: Clock = time.time
