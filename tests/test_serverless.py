"""Serverless helpers (SPEC §8): process_until_idle(deadline=), next_wake_at()."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest

from durably import ConfigurationError, Durably, StepContext, define_job

pytestmark = pytest.mark.anyio


async def test_deadline_stops_a_run_and_releases_its_lease(make_durably: Callable[..., Durably]) -> None:
    calls: list[str] = []
    executions: list[int] = []

    @define_job(name="slow", input=Any)
    async def slow(step: StepContext, payload: Any) -> str:
        executions.append(1)
        await step.run("first", lambda: calls.append("first"))
        if len(executions) == 1:  # only the first execution is slow
            await step.run("slow", anyio.sleep, 30)
        return "done"

    # A long lease: only an explicit release lets the next invocation take the run at once.
    durably = make_durably(stale_threshold=60.0, heartbeat_interval=1.0).register(slow=slow)
    run = await durably.jobs.slow.trigger({})
    started = time.monotonic()
    assert await durably.process_until_idle(deadline=0.5) == 0  # stopped: not completed
    assert time.monotonic() - started < 0.5 + 5.0  # the deadline plus one (slow CI) round trip
    stored = await durably.get_run(run.id)
    assert stored is not None and stored.status == "pending"
    assert await durably.process_until_idle(deadline=10) == 1
    stored = await durably.get_run(run.id)
    assert stored is not None and stored.status == "completed"
    assert calls == ["first"]  # resumed after its last completed step


async def test_process_until_idle_counts_waiting_runs(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="nap", input=Any)
    async def nap(step: StepContext, payload: Any) -> None:
        await step.sleep("nap", timedelta(hours=1))

    durably = make_durably().register(nap=nap)
    assert await durably.next_wake_at() is None
    await durably.jobs.nap.batch_trigger([{}, {}])
    now = await durably.next_wake_at()
    assert now is not None  # claimable now
    assert await durably.process_until_idle(deadline=30) == 2
    later = await durably.next_wake_at()
    assert later is not None and timedelta(minutes=59) < later - now < timedelta(minutes=61)
    with pytest.raises(ConfigurationError, match="deadline"):
        await durably.process_until_idle(deadline=-1)
