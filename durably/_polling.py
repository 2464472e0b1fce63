"""How long an idle worker waits before it claims again.

Turso bills every request and every row read, so an idle worker backs off: each idle
wait is twice the last, from ``polling_interval`` up to ``max_polling_interval``.
Whatever may mean work starts it over (the worker calls ``restart()``), and so may a
due time this process knows: a run that began to wait here, a retry postponed here, a
delayed trigger made here. Each idle claim also tells when the next run of the worker's
jobs becomes due, whichever host made it wait (``learn()``). The idle wait never runs
past the earliest of those, so they are claimed as promptly as without the backoff.
"""

from __future__ import annotations

import bisect
import math

# Due times kept at most: the earliest ones matter; a dropped one is still claimed within
# the ceiling, and a process with thousands of sleepers does not grow this list unbounded.
MAX_DUE_TIMES = 1024


class IdlePolling:
    """The idle waits of one worker and the due times it knows (monotonic seconds)."""

    def __init__(self, interval: float, ceiling: float) -> None:
        self._interval = interval
        self._ceiling = ceiling
        self._next = interval
        self._due: list[float] = []  # sorted
        self._learned = math.inf

    @property
    def ceiling(self) -> float:
        """The longest idle wait: a due time further away never shortens one."""
        return self._ceiling

    def restart(self) -> None:
        """Something may mean work: the next idle wait is ``polling_interval`` again."""
        self._next = self._interval

    def next_wait(self) -> float:
        """The next idle wait; the one after it is twice as long, up to the ceiling."""
        wait = self._next
        self._next = min(self._next * 2, self._ceiling)
        return wait

    def expect(self, at: float) -> None:
        """A run may become claimable at ``at`` (monotonic seconds)."""
        bisect.insort(self._due, at)
        del self._due[MAX_DUE_TIMES:]

    def learn(self, at: float) -> None:
        """The database said the next run becomes due at ``at`` (monotonic seconds; infinity:
        none within the ceiling). Each answer replaces the last: a run cancelled meanwhile
        is forgotten."""
        self._learned = at

    def earliest_due(self) -> float:
        """The earliest due time known (monotonic seconds); infinity if none."""
        return min(self._due[0] if self._due else math.inf, self._learned)

    def take_due(self, now: float) -> bool:
        """Forget the due times up to ``now``; whether one known here was among them (then
        look for work, polling from the start). A learned one only ends the wait: the claim
        that follows takes its run, or learns the next due time if it was cancelled."""
        if self._learned <= now:
            self._learned = math.inf
        passed = bisect.bisect_right(self._due, now)
        del self._due[:passed]
        return passed > 0
