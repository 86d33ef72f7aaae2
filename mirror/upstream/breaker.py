"""Remembering that an upstream is down: after a failure it is not asked again for a
back-off interval (1 s, doubling to a minute), then one request probes it while the others
keep failing at once; a success resets it. So a hanging upstream costs one client one
timeout, not every client one each, and the mirror finds it again by itself.
"""

from __future__ import annotations

import logging

from ..clock import Clock
from ..errors import UpstreamError

log = logging.getLogger("mirror.upstream")

FIRST_BACKOFF = 1.0  # seconds
MAX_BACKOFF = 60.0


class UpstreamDown(UpstreamError):
    """Refused without asking (502, with Retry-After): the upstream failed a moment ago."""

    logged = False  # the breaker said so once, when it tripped


class Breaker:
    """The down state of one upstream."""

    def __init__(self, name: str, clock: Clock) -> None:
        self._name = name
        self._clock = clock
        self._backoff = 0.0  # 0: up
        self._retry_at = 0.0
        self._probing = False
        self.why = ""
        self.learned = False  # down because another replica said so, not by its own failure

    @property
    def down(self) -> bool:
        return self._backoff > 0

    @property
    def retry_at(self) -> float:
        return self._retry_at

    def learn(self, retry_at: float, why: str) -> None:
        """Another replica of the cluster found the upstream down: this one does not ask it
        either until that back-off ends, at `retry_at` (wall clock; then one probe, as
        after its own failure)."""
        retry_in = retry_at - self._clock()
        if retry_in <= 0 or self._probing:
            return
        if self.down:  # down here too: wait as long as the longest back-off in the cluster
            self._retry_at = max(self._retry_at, retry_at)
            return
        self._backoff = min(MAX_BACKOFF, max(FIRST_BACKOFF, retry_in))
        self._retry_at = self._clock() + retry_in
        self.why = why
        self.learned = True
        log.warning(
            "upstream %s is down, another replica says (%s): asked again in %.0fs",
            self._name,
            why,
            retry_in,
        )

    def retry_in(self) -> float:
        return max(0.0, self._retry_at - self._clock())

    def admit(self) -> bool:
        """Whether a request may go out now; True for the one probe once the back-off is
        over. Raises UpstreamDown otherwise."""
        if not self.down:
            return False
        if not self._probing and self._clock() >= self._retry_at:
            self._probing = True
            return True
        wait = max(1, round(self.retry_in()))
        raise UpstreamDown(
            f"upstream {self._name} is down ({self.why}); asked again in {wait}s",
            detail={"upstream": self._name, "cause": self.why},
            headers={"Retry-After": str(wait)},
        )

    def release(self) -> None:
        """The probe ended without saying anything of the upstream (it was cancelled, or
        refused for another reason): the next request may probe."""
        self._probing = False

    def succeeded(self) -> None:
        if self.down:
            log.warning("upstream %s answers again", self._name)
        self._backoff = 0.0
        self._probing = False
        self.why = ""
        self.learned = False

    def failed(self, why: str) -> None:
        """A failure: it trips the breaker, or (the probe's) doubles the back-off. Requests
        that were already under way when it tripped do not push it further."""
        if self.down and not self._probing:
            return
        self._backoff = min(MAX_BACKOFF, self._backoff * 2 or FIRST_BACKOFF)
        self._retry_at = self._clock() + self._backoff
        log.warning(
            "upstream %s is %s (%s): asked again in %gs",
            self._name,
            "still down" if self._probing else "down",
            why,
            self._backoff,
        )
        self._probing = False
        self.why = why
        self.learned = False
