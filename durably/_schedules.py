"""Cron schedules turned into idempotent triggers (placeholder; implemented with its tests)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from durably._job import JobHandle


class Scheduler:
    """The schedules of one ``Durably`` instance."""

    def __init__(self) -> None:
        self._schedules: list[Any] = []

    def __bool__(self) -> bool:
        return bool(self._schedules)

    def add(
        self, cron: str, handle: JobHandle[Any, Any], payload: Any, *, name: str | None, timezone: str
    ) -> None:
        raise NotImplementedError

    async def trigger_due(self, now: datetime) -> int:
        raise NotImplementedError

    def seconds_until_next(self, now: datetime) -> float | None:
        raise NotImplementedError
