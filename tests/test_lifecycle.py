"""An instance started and stopped any number of times (SPEC §4): stop() and close() always
honour their timeout and the caller's cancellation."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from durably import Durably, StepContext, create_durably, define_job

from .conftest import Database
from .jobs import stored_echo as echo


@pytest.mark.anyio
async def test_async_with_twice_in_one_loop_runs_and_ends_both_times(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(echo=echo)
    for attempt in range(3):
        with anyio.fail_after(5):
            async with durably:
                pass
        with anyio.fail_after(5):
            async with durably:
                result = await durably.jobs.echo.trigger_and_wait({"n": attempt}, timeout=3)
        assert result.output == {"n": attempt}


@pytest.mark.anyio
async def test_init_stop_close_init_then_close_honours_its_timeout(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(echo=echo)
    await durably.init()
    await durably.stop()
    await durably.close()
    await durably.init()
    await asyncio.wait_for(durably.close(), 5)
    # Idempotent: stopping and closing a closed instance is a no-op.
    await asyncio.wait_for(durably.stop(), 5)
    await asyncio.wait_for(durably.close(), 5)
    # And it still works afterwards.
    await durably.init()
    with anyio.fail_after(5):
        result = await durably.jobs.echo.trigger_and_wait({"again": True}, timeout=3)
    assert result.output == {"again": True}
    await asyncio.wait_for(durably.close(), 5)


def test_an_instance_serves_in_successive_event_loops(database: Database) -> None:
    """``asyncio.run`` per invocation (serverless) with one module-level instance."""
    durably = create_durably(database.open(), polling_interval=0.01).register(echo=echo)

    async def invocation(n: int) -> Any:
        async with durably:
            result = await durably.jobs.echo.trigger_and_wait({"n": n}, timeout=5)
        return result.output

    assert [asyncio.run(asyncio.wait_for(invocation(n), 10)) for n in range(3)] == [
        {"n": 0},
        {"n": 1},
        {"n": 2},
    ]

    async def serverless(n: int) -> Any:
        run = await durably.jobs.echo.trigger({"n": n})
        assert await durably.process_until_idle() == 1
        done = await durably.get_run(run.id)
        await durably.close()
        return None if done is None else done.output

    assert asyncio.run(asyncio.wait_for(serverless(7), 10)) == {"n": 7}
    assert asyncio.run(asyncio.wait_for(serverless(8), 10)) == {"n": 8}


class StuckOnce:
    """A job whose one step hangs on its first execution only (async: cancellable; sync: not)."""

    def __init__(self, *, sync: bool) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.executions = 0

        async def hang_async() -> str:
            self._begin()
            await anyio.sleep(60)
            return "late"

        def hang_sync() -> str:
            self._begin()
            self.release.wait(30)  # a sync function's thread cannot be interrupted
            return "late"

        async def body(step: StepContext, payload: dict[str, Any]) -> Any:
            if self.executions:
                return await step.run("step", lambda: f"execution {self.executions + 1}")
            return await step.run("step", hang_sync if sync else hang_async)

        self.job = define_job(name="stuck", input=dict[str, Any], run=body)

    def _begin(self) -> None:
        self.executions += 1
        self.started.set()

    async def wait_started(self) -> None:
        assert await anyio.to_thread.run_sync(self.started.wait, 5), "the step never started"


@pytest.mark.anyio
async def test_a_cancelled_stop_returns_at_once_and_the_instance_starts_again(
    make_durably: Callable[..., Durably],
) -> None:
    stuck = StuckOnce(sync=False)
    durably = make_durably().register(job=stuck.job)
    await durably.init()
    run = await durably.jobs.job.trigger({})
    await stuck.wait_started()

    with anyio.fail_after(3):  # a hang here is the bug: stop(timeout=60) must yield to cancellation
        with anyio.move_on_after(0.2) as cancelled:
            await durably.stop(timeout=60)
    assert cancelled.cancelled_caught

    # The stopped execution released its lease; a fresh start resumes the run at once.
    await durably.init()
    with anyio.fail_after(5):
        done = await durably.wait_for_run(run.id)
    assert (done.status, done.output) == ("completed", "execution 2")
    with anyio.fail_after(5):
        await durably.close()


@pytest.mark.anyio
async def test_stop_with_a_sync_step_that_never_returns_honours_its_timeout(
    make_durably: Callable[..., Durably],
) -> None:
    stuck = StuckOnce(sync=True)
    durably = make_durably().register(job=stuck.job)
    await durably.init()
    run = await durably.jobs.job.trigger({})
    try:
        await stuck.wait_started()
        with anyio.fail_after(5):
            await durably.stop(timeout=0.1)
        stored = await durably.get_run(run.id)
        assert stored is not None
        assert stored.status == "pending"  # released for another worker, not left to expire
    finally:
        stuck.release.set()


@pytest.mark.anyio
async def test_closing_a_local_file_while_its_thread_waits_for_a_lock_honours_cancellation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    durably = create_durably(f"file:{path}").register(echo=echo)
    await durably.migrate()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the database thread's write now waits (busy timeout 10 s)
    trigger = asyncio.ensure_future(durably.jobs.echo.trigger({"n": 1}))
    try:
        await anyio.sleep(0.3)
        assert not trigger.done()
        began = time.monotonic()
        with anyio.move_on_after(0.5) as scope:
            await durably.close()
        assert scope.cancelled_caught
        waited = time.monotonic() - began
        assert waited < 5, f"close() ignored the caller's timeout for {waited:.1f} s"
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with anyio.fail_after(15):
        run = await trigger  # the write went through once the lock was free
    assert run.status == "pending"
    await durably.close()
