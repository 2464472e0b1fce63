"""The local file: statements run on the loop only when they need no waiting."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from durably import create_durably

from .jobs import echo

pytestmark = pytest.mark.anyio


async def test_a_write_waits_for_another_writer_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "durably.db"
    durably = create_durably(f"file:{path}").register(echo=echo)
    await durably.migrate()
    first = await durably.jobs.echo.trigger({"n": 1})
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.01)

    async def release() -> None:
        await anyio.sleep(0.3)
        other.execute("COMMIT")

    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(tick)
            task_group.start_soon(release)
            read_started = time.perf_counter()
            assert await durably.get_run(first.id) is not None  # WAL readers never wait
            read_seconds = time.perf_counter() - read_started
            second = await durably.jobs.echo.trigger({"n": 2})
            task_group.cancel_scope.cancel()
    finally:
        other.close()
        await durably.close()
    assert read_seconds < 0.2
    assert second.status == "pending"
    assert ticks >= 10  # the loop went on while the write waited for the lock


async def test_memory_databases_work_on_the_thread_alone() -> None:
    durably = create_durably(":memory:").register(echo=echo)
    try:
        await durably.migrate()
        run = await durably.jobs.echo.trigger({"n": 1})
        assert await durably.process_until_idle() == 1
        done = await durably.wait_for_run(run.id, timeout=5)
    finally:
        await durably.close()
    assert done.output == {"n": 1}
