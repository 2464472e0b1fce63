"""Cron schedules turned into idempotent triggers.

A schedule's tick becomes the run's idempotency key (``schedule:NAME:TICK``), so
every host may evaluate every schedule: the database lets exactly one trigger of a
tick create a run. Ticks are computed on the wall clock of the schedule's time
zone and mapped to UTC instants:

- a wall-clock time skipped by a daylight-saving jump (02:30 on the spring-forward
  night) fires once, shifted forward by the jump (03:30);
- a wall-clock time that happens twice (the fall-back night) fires once, at its
  first occurrence; schedules whose hour field is ``*`` fire at both, so "every
  hour" stays every hour.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog

from durably import _codec
from durably._job import JobHandle
from durably.errors import ConfigurationError

_logger = structlog.get_logger("durably")

# Sampling the zone's UTC offset this far either side of "now" bounds the offsets
# of every tick that could be the latest (or next) one; transitions are months apart.
_OFFSET_SAMPLE = timedelta(hours=26)
_MICROSECOND = timedelta(microseconds=1)
# A safety net only: the walks below stop after a handful of ticks.
_MAX_TICKS = 10_000


def _parse_cron(cron: object) -> tuple[str, bool]:
    """The normalised expression and whether its hour field is ``*``; ``ConfigurationError`` if invalid."""
    if not isinstance(cron, str):
        raise ConfigurationError(f"a cron expression must be a string, got {cron!r}")
    expression = " ".join(cron.split())
    fields = expression.split(" ")
    if not expression.startswith("@") and len(fields) != 5:
        raise ConfigurationError(
            f"invalid cron expression {cron!r}: expected 5 fields"
            f" (minute hour day-of-month month day-of-week), got {len(fields) if expression else 0}"
        )
    from croniter import croniter  # lazy: a slow import

    try:
        parsed = croniter(expression, datetime(2000, 1, 1))
        parsed.get_next(datetime)
    except (ValueError, KeyError, TypeError) as exc:
        # croniter's errors derive from ValueError; "never matches" (Feb 30) is one too.
        raise ConfigurationError(f"invalid cron expression {cron!r}: {exc}") from exc
    return expression, parsed.expressions[1] == "*"


def _parse_zone(timezone: object) -> ZoneInfo:
    if not isinstance(timezone, str):
        raise ConfigurationError(f"timezone must be an IANA time zone name, got {timezone!r}")
    try:
        return ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ConfigurationError(
            f"unknown timezone {timezone!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'"
        ) from exc


def _naive_utc(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(tzinfo=None)


@dataclass(eq=False)
class _Schedule:
    name: str
    cron: str
    zone: ZoneInfo
    every_hour: bool
    handle: JobHandle[Any, Any]
    payload: bytes
    last_tick: datetime | None = None
    first_registered: datetime | None = None  # on the database; no tick before it fires

    def instants(self, wall: datetime) -> tuple[datetime, ...]:
        """The UTC instants at which the naive wall-clock tick ``wall`` fires."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        second = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        if first < second and self.every_hour:  # a repeated hour: fires at both
            return (first, second)
        # Otherwise fold=0 is right: the first of a repeated time, or, for a time
        # skipped by a jump forward, the instant shifted past the gap.
        return (first,)

    def _offset_bounds(self, now: datetime) -> tuple[timedelta, timedelta]:
        offsets = [
            offset
            for at in (now - _OFFSET_SAMPLE, now, now + _OFFSET_SAMPLE)
            if (offset := at.astimezone(self.zone).utcoffset()) is not None
        ]
        return min(offsets), max(offsets)

    def _walk(self, start: datetime, *, backwards: bool) -> Iterator[datetime]:
        """Naive wall-clock ticks before (or after) ``start``, nearest first."""
        from croniter import croniter

        ticks = croniter(self.cron, start)
        step = ticks.get_prev if backwards else ticks.get_next
        for _ in range(_MAX_TICKS):
            try:
                yield step(datetime)
            except ValueError:  # no earlier tick at all (CroniterBadDateError)
                return

    def latest_tick(self, now: datetime) -> datetime | None:
        """The latest instant ``<= now`` at which this schedule fires (UTC)."""
        low, high = self._offset_bounds(now)
        best: datetime | None = None
        # A wall tick w fires at w - offset; only w <= now + high can be <= now.
        for wall in self._walk(_naive_utc(now) + high + _MICROSECOND, backwards=True):
            if best is not None and wall - low <= _naive_utc(best):
                break  # every earlier wall tick fires before ``best``
            for instant in self.instants(wall):
                if instant <= now and (best is None or instant > best):
                    best = instant
        return best

    def next_tick(self, now: datetime) -> datetime | None:
        """The earliest instant ``> now`` at which this schedule fires (UTC)."""
        low, high = self._offset_bounds(now)
        best: datetime | None = None
        for wall in self._walk(_naive_utc(now) + low, backwards=False):
            if best is not None and wall - high >= _naive_utc(best):
                break  # every later wall tick fires after ``best``
            for instant in self.instants(wall):
                if instant > now and (best is None or instant < best):
                    best = instant
        return best


class Scheduler:
    """The schedules of one ``Durably`` instance."""

    def __init__(self) -> None:
        self._schedules: dict[str, _Schedule] = {}

    def __bool__(self) -> bool:
        return bool(self._schedules)

    def add(
        self, cron: str, handle: JobHandle[Any, Any], payload: Any, *, name: str | None, timezone: str
    ) -> None:
        """Validate and register a schedule; nothing is written until a tick is due.

        Raises ``ConfigurationError`` for a bad cron expression, time zone, handle
        or a duplicate name, and ``ValidationError`` for a payload the job rejects.
        """
        expression, every_hour = _parse_cron(cron)
        zone = _parse_zone(timezone)
        if not isinstance(handle, JobHandle):
            raise ConfigurationError(
                f"schedule() takes a job handle such as durably.jobs.<name>, got {type(handle).__name__}"
            )
        if name is None:
            name = f"{handle.name}:{expression}"
        elif not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"a schedule name must be a non-empty string, got {name!r}")
        if name in self._schedules:
            raise ConfigurationError(
                f"a schedule named {name!r} already exists; pass name= to tell the schedules apart"
            )
        data = _codec.canonical(payload, handle.definition.input_type, what=f"payload of schedule {name!r}")
        self._schedules[name] = _Schedule(
            name=name, cron=expression, zone=zone, every_hour=every_hour, handle=handle, payload=data
        )

    async def trigger_due(
        self, now: datetime, register: Callable[[Sequence[str]], Awaitable[dict[str, float]]] | None = None
    ) -> int:
        """Trigger the latest tick ``<= now`` of every schedule; how many runs were created.

        Earlier missed ticks are not replayed, nor ticks from before a schedule's first
        registration on the database (``register`` stores and returns it, once per
        schedule and process; without it, as in tests of tick arithmetic, none is
        consulted). A tick already triggered (here or on any other host)
        creates nothing: its idempotency key is taken.
        """
        now = now.astimezone(UTC)
        unknown = [s.name for s in self._schedules.values() if s.first_registered is None]
        if unknown and register is not None:
            for name, at in (await register(unknown)).items():
                self._schedules[name].first_registered = datetime.fromtimestamp(at, UTC)
        created = 0
        for schedule in self._schedules.values():
            tick = schedule.latest_tick(now)
            if tick is None or tick == schedule.last_tick:
                continue
            if schedule.first_registered is not None and tick < schedule.first_registered:
                continue
            key = f"schedule:{schedule.name}:{tick.strftime('%Y-%m-%dT%H:%M:%SZ')}"
            run = await schedule.handle.trigger(_codec.decode(schedule.payload), idempotency_key=key)
            schedule.last_tick = tick
            if run.disposition == "created":
                created += 1
                _logger.info(
                    "schedule triggered", schedule=schedule.name, tick=tick.isoformat(), run_id=run.id
                )
        return created

    def seconds_until_next(self, now: datetime) -> float | None:
        """Seconds from ``now`` to the next tick of any schedule; ``None`` without schedules."""
        now = now.astimezone(UTC)
        ticks = [tick for s in self._schedules.values() if (tick := s.next_tick(now)) is not None]
        if not ticks:
            return None
        return max(0.0, (min(ticks) - now).total_seconds())
