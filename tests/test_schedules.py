"""Cron schedules: validation, one run per tick across hosts, time zones and DST, the worker loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from structlog.testing import capture_logs

from durably import ConfigurationError, Durably, Run, ValidationError, _clock

from .jobs import echo, process_image

pytestmark = pytest.mark.anyio


def at(text: str) -> datetime:
    """A UTC instant from ``YYYY-MM-DDTHH:MM[:SS]``."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def clock_offset() -> Iterator[Callable[[float], None]]:
    try:
        yield _clock.set_offset
    finally:
        _clock.set_offset(0.0)


async def scheduled_runs(durably: Durably) -> list[Run]:
    runs = await durably.get_runs(limit=500)
    return sorted(runs, key=lambda run: run.idempotency_key or "")


def keys(runs: list[Run]) -> list[str | None]:
    return [run.idempotency_key for run in runs]


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cron",
    ["* * * *", "* * * * * *", "61 * * * *", "0 25 * * *", "0 0 30 2 *", "every minute", ""],
)
async def test_a_bad_cron_expression_is_rejected_at_once_naming_it(
    make_durably: Callable[..., Durably], cron: str
) -> None:
    durably = make_durably().register(echo=echo)
    with pytest.raises(ConfigurationError, match="cron expression") as info:
        durably.schedule(cron, durably.jobs.echo, {})
    assert repr(cron) in str(info.value)


async def test_an_unknown_timezone_is_rejected(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    with pytest.raises(ConfigurationError, match="'Mars/Olympus'"):
        durably.schedule("0 9 * * *", durably.jobs.echo, {}, timezone="Mars/Olympus")


async def test_a_payload_the_job_rejects_is_a_validation_error(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(process_image=process_image)
    with pytest.raises(ValidationError, match="filename"):
        durably.schedule("0 9 * * *", durably.jobs.process_image, {"name": "cat.png"})


async def test_schedule_names_are_unique_and_default_to_job_and_cron(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("0 9 * * *", durably.jobs.echo, {})
    durably.schedule("0 9 * * *", durably.jobs.echo, {"other": True}, name="second")
    with pytest.raises(ConfigurationError, match="'echo:0 9 \\* \\* \\*' already exists"):
        durably.schedule("0  9 * * *", durably.jobs.echo, {})
    with pytest.raises(ConfigurationError, match="'second' already exists"):
        durably.schedule("0 10 * * *", durably.jobs.echo, {}, name="second")


async def test_schedule_takes_a_job_handle(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    with pytest.raises(ConfigurationError, match="job handle"):
        durably.schedule("0 9 * * *", echo, {})  # type: ignore[arg-type]


# --- triggering ---------------------------------------------------------------------------------


async def test_each_due_schedule_triggers_one_run_and_a_second_pass_none(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(echo=echo, process_image=process_image)
    durably.schedule("0 * * * *", durably.jobs.echo, {"n": 1}, name="hourly")
    durably.schedule("30 9 * * *", durably.jobs.process_image, {"filename": "a.png"})
    await durably.migrate()
    now = at("2024-01-15T10:15")

    assert await durably._scheduler.trigger_due(now) == 2
    assert await durably._scheduler.trigger_due(now) == 0
    assert await durably._scheduler.trigger_due(now + timedelta(minutes=30)) == 0

    runs = await scheduled_runs(durably)
    assert [(r.job_name, r.idempotency_key, r.input, r.status) for r in runs] == [
        ("echo", "schedule:hourly:2024-01-15T10:00:00Z", {"n": 1}, "pending"),
        (
            "process-image",
            "schedule:process-image:30 9 * * *:2024-01-15T09:30:00Z",
            {"filename": "a.png"},
            "pending",
        ),
    ]


async def test_a_new_tick_triggers_again(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("*/15 * * * *", durably.jobs.echo, {}, name="q")
    await durably.migrate()
    assert await durably._scheduler.trigger_due(at("2024-01-15T10:14:59")) == 1
    assert await durably._scheduler.trigger_due(at("2024-01-15T10:15:00")) == 1
    assert keys(await scheduled_runs(durably)) == [
        "schedule:q:2024-01-15T10:00:00Z",
        "schedule:q:2024-01-15T10:15:00Z",
    ]


async def test_only_the_latest_missed_tick_is_triggered(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("*/5 * * * *", durably.jobs.echo, {}, name="five")
    await durably.migrate()
    assert await durably._scheduler.trigger_due(at("2024-01-15T09:00")) == 1
    # Nothing ran for 83 minutes: 16 ticks were missed; only the latest runs.
    assert await durably._scheduler.trigger_due(at("2024-01-15T10:23:30")) == 1
    assert keys(await scheduled_runs(durably)) == [
        "schedule:five:2024-01-15T09:00:00Z",
        "schedule:five:2024-01-15T10:20:00Z",
    ]


async def test_two_hosts_on_one_database_create_one_run_per_tick(
    make_durably: Callable[..., Durably],
) -> None:
    hosts = [make_durably().register(echo=echo) for _ in range(2)]
    for host in hosts:
        host.schedule("0 9 * * *", host.jobs.echo, {"from": "cron"}, name="daily")
        await host.migrate()
    created: list[int] = []

    async def run_pass(host: Durably, now: datetime) -> None:
        created.append(await host._scheduler.trigger_due(now))

    async with anyio.create_task_group() as tg:
        for host in hosts:
            tg.start_soon(run_pass, host, at("2024-01-15T09:00"))
    assert sorted(created) == [0, 1]
    # The host that lost the race remembers nothing; the database still refuses a second run.
    assert await hosts[1]._scheduler.trigger_due(at("2024-01-15T12:00")) == 0
    assert await hosts[0]._scheduler.trigger_due(at("2024-01-16T09:00")) == 1
    assert await hosts[1]._scheduler.trigger_due(at("2024-01-16T09:00")) == 0
    assert keys(await scheduled_runs(hosts[0])) == [
        "schedule:daily:2024-01-15T09:00:00Z",
        "schedule:daily:2024-01-16T09:00:00Z",
    ]


async def test_trigger_due_schedules_uses_the_clock(
    make_durably: Callable[..., Durably], clock_offset: Callable[[float], None]
) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("0 0 1 1 *", durably.jobs.echo, {}, name="new-year")
    clock_offset(at("2031-01-01T00:00:05").timestamp() - time.time())
    assert await durably.trigger_due_schedules() == 1
    assert await durably.trigger_due_schedules() == 0
    assert keys(await scheduled_runs(durably)) == ["schedule:new-year:2031-01-01T00:00:00Z"]


async def test_a_created_run_is_logged(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("0 9 * * *", durably.jobs.echo, {}, name="daily")
    await durably.migrate()
    with capture_logs() as logs:
        await durably._scheduler.trigger_due(at("2024-01-15T09:00"))
        await durably._scheduler.trigger_due(at("2024-01-15T09:00"))
    [entry] = [e for e in logs if e["event"] == "schedule triggered"]
    assert entry["schedule"] == "daily"
    assert entry["tick"] == "2024-01-15T09:00:00+00:00"


# --- time zones ---------------------------------------------------------------------------------


async def test_ticks_follow_the_schedules_timezone(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("0 9 * * *", durably.jobs.echo, {}, name="berlin", timezone="Europe/Berlin")
    await durably.migrate()
    scheduler = durably._scheduler
    # 09:00 in Berlin is 08:00 UTC in winter (CET) and 07:00 UTC in summer (CEST).
    assert scheduler.seconds_until_next(at("2024-01-15T07:59:30")) == 30.0
    assert await scheduler.trigger_due(at("2024-01-15T07:59:59")) == 1
    assert await scheduler.trigger_due(at("2024-01-15T08:00")) == 1
    assert await scheduler.trigger_due(at("2024-07-15T07:00")) == 1
    assert keys(await scheduled_runs(durably)) == [
        "schedule:berlin:2024-01-14T08:00:00Z",
        "schedule:berlin:2024-01-15T08:00:00Z",
        "schedule:berlin:2024-07-15T07:00:00Z",
    ]


async def trigger_every_minute(durably: Durably, start: datetime, end: datetime) -> None:
    """A pass at every minute from ``start`` to ``end``, as a running worker would do."""
    await durably.migrate()
    now = start
    while now <= end:
        await durably._scheduler.trigger_due(now)
        now += timedelta(minutes=1)


async def test_a_time_skipped_by_the_spring_jump_fires_once_shifted_forward(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("30 2 * * *", durably.jobs.echo, {}, name="daily", timezone="Europe/Berlin")
    durably.schedule("30 * * * *", durably.jobs.echo, {}, name="hourly", timezone="Europe/Berlin")
    # 2024-03-31: Berlin jumps from 02:00 CET to 03:00 CEST (01:00 UTC).
    await trigger_every_minute(durably, at("2024-03-30T23:00"), at("2024-03-31T03:00"))
    runs = await scheduled_runs(durably)
    assert keys(runs) == [
        "schedule:daily:2024-03-30T01:30:00Z",  # the first pass: the latest tick
        "schedule:daily:2024-03-31T01:30:00Z",  # 02:30 does not exist: 03:30 CEST
        "schedule:hourly:2024-03-30T22:30:00Z",  # the first pass: the latest tick
        "schedule:hourly:2024-03-30T23:30:00Z",  # 00:30 CET
        "schedule:hourly:2024-03-31T00:30:00Z",  # 01:30 CET
        "schedule:hourly:2024-03-31T01:30:00Z",  # 03:30 CEST (02:30 skipped, shared with 03:30)
        "schedule:hourly:2024-03-31T02:30:00Z",  # 04:30 CEST
    ]


async def test_a_repeated_time_fires_once_unless_the_schedule_runs_every_hour(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("30 2 * * *", durably.jobs.echo, {}, name="daily", timezone="Europe/Berlin")
    durably.schedule("30 * * * *", durably.jobs.echo, {}, name="hourly", timezone="Europe/Berlin")
    # 2024-10-27: Berlin falls back from 03:00 CEST to 02:00 CET (01:00 UTC); 02:30 happens twice.
    await trigger_every_minute(durably, at("2024-10-26T23:45"), at("2024-10-27T03:00"))
    runs = await scheduled_runs(durably)
    assert keys(runs) == [
        "schedule:daily:2024-10-26T00:30:00Z",  # the first pass: the latest tick
        "schedule:daily:2024-10-27T00:30:00Z",  # the first 02:30 (CEST) only
        "schedule:hourly:2024-10-26T23:30:00Z",  # the first pass: 01:30 CEST
        "schedule:hourly:2024-10-27T00:30:00Z",  # 02:30 CEST
        "schedule:hourly:2024-10-27T01:30:00Z",  # 02:30 CET
        "schedule:hourly:2024-10-27T02:30:00Z",  # 03:30 CET
    ]


async def test_seconds_until_next_is_none_without_schedules(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    assert durably._scheduler.seconds_until_next(at("2024-01-15T10:00")) is None
    durably.schedule("*/10 * * * *", durably.jobs.echo, {}, name="a")
    durably.schedule("0 11 * * *", durably.jobs.echo, {}, name="b", timezone="Asia/Kolkata")
    assert durably._scheduler.seconds_until_next(at("2024-01-15T10:00")) == 600.0
    # 11:00 in Kolkata (UTC+05:30) is 05:30 UTC.
    assert durably._scheduler.seconds_until_next(at("2024-01-15T05:29:59.5")) == 0.5


# --- the worker loop ----------------------------------------------------------------------------


async def wait_for_runs(durably: Durably, count: int, *, status: str, timeout: float) -> list[Run]:
    with anyio.fail_after(timeout):
        while True:
            runs = await durably.get_runs(status=status)
            if len(runs) >= count:
                return runs
            await anyio.sleep(0.05)


async def test_a_running_worker_triggers_each_tick_once(
    make_durably: Callable[..., Durably], clock_offset: Callable[[float], None]
) -> None:
    # Shift the clock to one second before a minute starts, so the tick is near; two
    # minutes ahead of the database's, so the latest tick is after the first registration.
    clock_offset(120.0 + 59.0 - time.time() % 60)
    host_a = make_durably().register(echo=echo)
    host_b = make_durably().register(echo=echo)
    for host in (host_a, host_b):
        host.schedule("* * * * *", host.jobs.echo, {"tick": True}, name="minutely")
    latest_tick = datetime.fromtimestamp(_clock.now() // 60 * 60, UTC)
    next_tick = datetime.fromtimestamp((_clock.now() // 60 + 1) * 60, UTC)
    async with host_a, host_b:
        # The latest tick fires at start-up, the next one a second later: each once.
        runs = await wait_for_runs(host_a, 2, status="completed", timeout=10)
        await anyio.sleep(0.3)  # a duplicate trigger would have shown up by now
        assert len(await host_a.get_runs()) == 2
    assert all(run.output == {"tick": True} for run in runs)
    assert sorted(run.idempotency_key or "" for run in runs) == [
        f"schedule:minutely:{tick:%Y-%m-%dT%H:%M:%SZ}" for tick in (latest_tick, next_tick)
    ]


async def test_a_starting_worker_triggers_the_latest_missed_tick(
    make_durably: Callable[..., Durably], clock_offset: Callable[[float], None]
) -> None:
    # 40 s before the next tick, and ahead of the database's clock, so the latest tick
    # comes after the schedule's first registration.
    clock_offset(120.0 + 20.0 - time.time() % 60)
    durably = make_durably().register(echo=echo)
    durably.schedule("* * * * *", durably.jobs.echo, {}, name="minutely")
    async with durably:
        await wait_for_runs(durably, 1, status="completed", timeout=3)


async def test_no_tick_from_before_the_first_registration_fires(make_durably: Callable[..., Durably]) -> None:
    first, later = make_durably().register(echo=echo), make_durably().register(echo=echo)
    for host in (first, later):
        host.schedule("0 * * * *", host.jobs.echo, {}, name="hourly")
    await first.migrate()
    # A tick long before the schedule existed on this database: not fired, by any host.
    for host in (first, later):
        assert await host._scheduler.trigger_due(at("2024-01-15T10:15"), host.storage.register_schedules) == 0
    assert await first.get_runs() == []
    registered = await later.storage.register_schedules(["hourly"])  # kept, not moved forward
    assert registered == await first.storage.register_schedules(["hourly"])
    soon = datetime.fromtimestamp(registered["hourly"], UTC) + timedelta(hours=1, minutes=1)
    assert await first._scheduler.trigger_due(soon, first.storage.register_schedules) == 1


async def test_a_pass_without_a_due_tick_triggers_nothing(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    durably.schedule("0 9 1 1 *", durably.jobs.echo, {}, name="yearly")
    await durably.migrate()
    # The latest tick is almost a year back; it is triggered once, then nothing until the next.
    assert await durably._scheduler.trigger_due(at("2024-12-31T23:59")) == 1
    assert keys(await scheduled_runs(durably)) == ["schedule:yearly:2024-01-01T09:00:00Z"]
    assert await durably._scheduler.trigger_due(at("2025-01-01T08:59:59")) == 0
