"""Failed logins, counted per client address: past the limit in a minute, a client is
told to wait (429) before its password is even looked at, so guessing costs time.
Checks still running count as failures until they end, so guesses sent all at once are
held to the limit too. (Each worker process counts its own.)"""

from __future__ import annotations

from collections import deque

from ..clock import Clock

WINDOW = 60.0  # seconds
MAX_ADDRESSES = 10_000  # remembered at once; the oldest are forgotten past it


class FailedLogins:
    def __init__(self, limit: int, clock: Clock) -> None:
        self._limit = limit
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._checking: dict[str, int] = {}  # password checks running, by address

    def _recent(self, address: str) -> deque[float]:
        failures = self._failures.get(address)
        if failures is None:
            return deque()
        since = self._clock() - WINDOW
        while failures and failures[0] <= since:
            failures.popleft()
        if not failures:
            del self._failures[address]
        return failures

    def wait(self, address: str) -> float:
        """Seconds `address` must wait before it may try again; 0 when it may now."""
        failures = self._recent(address)
        if len(failures) + self._checking.get(address, 0) < self._limit:
            return 0.0
        if not failures:
            return 1.0  # its checks under way: their outcome first
        return max(1.0, failures[0] + WINDOW - self._clock())

    def checking(self, address: str) -> None:
        """A password check of `address` begins (end it with `checked`)."""
        self._checking[address] = self._checking.get(address, 0) + 1

    def checked(self, address: str) -> None:
        left = self._checking.get(address, 1) - 1
        if left:
            self._checking[address] = left
        else:
            self._checking.pop(address, None)

    def failed(self, address: str) -> None:
        failures = self._recent(address)
        if not failures:
            if len(self._failures) >= MAX_ADDRESSES:
                del self._failures[next(iter(self._failures))]
            self._failures[address] = failures
        failures.append(self._clock())
