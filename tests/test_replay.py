"""Replay (SPEC §3): a resumed body's log lines and progress are not stored or emitted twice.

The SIGKILL case is in tests/test_processes.py; here a retried run replays on every adapter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from durably import Durably, StepContext, define_job

pytestmark = pytest.mark.anyio


async def test_a_retried_run_replays_its_body_without_repeating_logs_or_progress(
    make_durably: Callable[..., Durably],
) -> None:
    attempts: list[int] = []

    def flaky(step: StepContext) -> str:
        attempts.append(1)
        step.log.warn("trying")
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        step.log.info("worked")
        return "ok"

    @define_job(name="replayed", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        step.log.info("start", attempt=step.run_id is not None)
        step.progress(1, 3)
        await step.run("first", lambda: 1)
        step.log.info("between")
        step.progress(2, 3)
        result = await step.run("flaky", flaky, step)
        step.progress(3, 3)
        step.log.info("end")
        return result

    durably = make_durably().register(job=job)
    run = await durably.jobs.job.trigger({})
    assert await durably.process_until_idle() == 1
    failed = await durably.wait_for_run(run.id)
    assert failed.status == "failed"
    first_logs = [entry.message for entry in await durably.get_logs(run.id)]
    assert first_logs == ["start", "between", "trying"]

    emitted: list[tuple[str | None, str]] = []
    progress: list[float] = []
    durably.on("log:write", lambda event: emitted.append((event.step_name, event.message)))
    durably.on("run:progress", lambda event: progress.append(event.progress.current))
    await durably.retry(run.id)
    assert await durably.process_until_idle() == 1
    done = await durably.wait_for_run(run.id)
    assert done.status == "completed", done.error

    logs = await durably.get_logs(run.id)
    assert [(entry.step_name, entry.message) for entry in logs] == [
        (None, "start"),
        (None, "between"),
        ("flaky", "trying"),
        ("flaky", "worked"),
        (None, "end"),
    ]
    assert emitted == [("flaky", "worked"), (None, "end")]
    assert progress == [3.0]  # 1 and 2 were reached before; (2, 3) is the stored value
    assert done.progress is not None
    assert (done.progress.current, done.progress.total) == (3, 3)
    assert len(attempts) == 2


async def test_progress_held_back_during_replay_lands_when_it_was_never_stored(
    make_durably: Callable[..., Durably],
) -> None:
    failures = [RuntimeError("the body fails once, before reporting progress")]

    @define_job(name="late-progress", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("stored", lambda: 1)
        if failures:
            raise failures.pop()
        step.progress(5, 10, "halfway")  # still replaying: no new step has started
        return "done"

    durably = make_durably().register(job=job)
    run = await durably.jobs.job.trigger({})
    assert await durably.process_until_idle() == 1
    assert (await durably.wait_for_run(run.id)).progress is None
    await durably.retry(run.id)
    progress: list[Any] = []
    durably.on("run:progress", lambda event: progress.append(event.progress))
    assert await durably.process_until_idle() == 1
    done = await durably.wait_for_run(run.id)
    assert done.status == "completed", done.error
    assert [(p.current, p.total, p.message) for p in progress] == [(5, 10, "halfway")]
    assert done.progress is not None
    assert (done.progress.current, done.progress.total, done.progress.message) == (5, 10, "halfway")
