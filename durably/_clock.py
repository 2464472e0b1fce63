"""The one place durably reads the local wall clock.

Leases never use it: they are computed by the database clock. The local clock
stamps events, step timings and new run ids. ``set_offset`` lets tests run a
worker whose clock is wrong on purpose.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

_offset = 0.0


def set_offset(seconds: float) -> None:
    """Shift this process's notion of the wall clock (for clock-skew tests)."""
    global _offset
    _offset = seconds


def now() -> float:
    """Seconds since the Unix epoch on this host's (possibly shifted) clock."""
    return time.time() + _offset


def to_datetime(timestamp: float | None) -> datetime | None:
    """A stored epoch timestamp as a timezone-aware UTC datetime."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
