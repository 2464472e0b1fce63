"""A failed write of progress and logs is reported, and what it carried is stored later."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from durably import StepContext, create_durably, define_job

pytestmark = pytest.mark.anyio

_released: dict[str, anyio.Event] = {}


@define_job(name="chatty", input=dict[str, Any])
async def chatty(step: StepContext, payload: dict[str, Any]) -> dict[str, Any]:
    step.progress(1, 2, "half")
    step.log.info("before the outage")

    async def wait_for_the_outage() -> int:
        with anyio.fail_after(15):
            await _released[payload["key"]].wait()
        return 1

    await step.run("outage", wait_for_the_outage)
    return {"ok": True}


async def test_a_failed_progress_write_is_reported_and_its_lines_land_with_the_next_write(
    tmp_path: Path,
) -> None:
    path = tmp_path / "flush.db"
    durably = create_durably(
        f"file:{path}", polling_interval=0.01, heartbeat_interval=0.2, stale_threshold=1.0
    ).register(chatty=chatty)
    flush_failed, progressed = anyio.Event(), anyio.Event()
    errors: list[Any] = []
    durably.on("run:progress", lambda _: progressed.set())

    def on_error(event: Any) -> None:
        errors.append(event)
        if "storing progress and logs" in event.context:
            flush_failed.set()

    durably.on("worker:error", on_error)
    _released[str(path)] = released = anyio.Event()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        async with durably:
            run = await durably.jobs.chatty.trigger({"key": str(path)})
            with anyio.fail_after(20):
                await progressed.wait()
            # Another connection holds the write lock: the flush due within a second fails.
            blocker.execute("BEGIN IMMEDIATE")
            with anyio.fail_after(20):
                await flush_failed.wait()
            blocker.execute("COMMIT")
            released.set()
            done = await durably.wait_for_run(run.id, timeout=20)
            logs = await durably.get_logs(run.id)
    finally:
        if blocker.in_transaction:
            blocker.execute("COMMIT")
        blocker.close()
    flush_errors = [e for e in errors if "storing progress and logs" in e.context]
    assert flush_errors and all(e.run_id == run.id for e in flush_errors)
    assert done.status == "completed"
    assert done.progress is not None and (done.progress.current, done.progress.total) == (1, 2)
    assert [entry.message for entry in logs] == ["before the outage"]
