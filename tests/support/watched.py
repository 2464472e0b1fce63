"""A real storage, watched: instrumentation for tests of pipelined checkpoints.

``WatchedStorage`` forwards every call to a real storage. It counts the fenced writes and
how many were in flight at once, and can *cut* the line after ``hold_after`` checkpoint
writes: from then on every write, renewal and claim is held (as by a partition) until the
caller gives up on it; those attempted after the cut are recorded.
``latency`` s are added before each fenced write reaches the database (a slow network).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio

from durably import Storage

FENCED = frozenset(
    {
        "save_step",
        "save_steps",
        "save_telemetry",
        "complete_run",
        "fail_run",
        "retry_run_later",
        "postpone_run",
        "wait",
        "release_lease",
    }
)
_HELD = FENCED | {"renew_leases", "claim_runs"}
CHECKPOINTS = frozenset({"save_step", "save_steps", "complete_run", "fail_run"})


class WatchedStorage:
    def __init__(self, inner: Storage, *, hold_after: int | None = None, latency: float = 0.0) -> None:
        self._inner = inner
        self._latency = latency
        self.hold_after = hold_after
        self.writes: Counter[str] = Counter()  # fenced writes made, by method
        self.in_flight = 0  # checkpoint writes (steps, completion, failure)
        self.most_in_flight = 0
        self.after_cut: list[str] = []  # the fenced writes and renewals attempted after the cut

    @property
    def cut(self) -> bool:
        return self.hold_after is not None and self.writes["save_steps"] >= self.hold_after

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in _HELD:
            return method
        return self._watched(name, method)

    def _watched(self, name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.cut:
                self.after_cut.append(name)
                await anyio.sleep_forever()
            if name in FENCED:
                self.writes[name] += 1
            self.in_flight += name in CHECKPOINTS
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                if name in FENCED and self._latency:
                    await anyio.sleep(self._latency)
                return await method(*args, **kwargs)
            finally:
                self.in_flight -= name in CHECKPOINTS

        return call
