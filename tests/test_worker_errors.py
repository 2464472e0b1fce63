"""A worker never dies of an error (SPEC §8): rows it cannot decode fail their run, reported."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog

from durably import Durably, StepContext, StorageError, create_durably, define_job
from durably._events import WorkerErrorEvent

from .jobs import stored_echo as echo

pytestmark = pytest.mark.anyio


def _edit(path: Path, sql: str, *params: Any) -> None:
    """Change the database behind durably's back, as a bad deploy or a hand edit would."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        assert conn.execute(sql, params).rowcount == 1
    finally:
        conn.close()


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[tuple[Path, Durably]]:
    path = tmp_path / "jobs.db"
    durably = create_durably(
        f"file:{path}", polling_interval=0.01, heartbeat_interval=0.1, stale_threshold=1.0
    ).register(echo=echo)
    await durably.migrate()
    try:
        yield path, durably
    finally:
        await durably.close()


def _errors(durably: Durably) -> list[WorkerErrorEvent]:
    errors: list[WorkerErrorEvent] = []
    durably.on("worker:error", errors.append)
    return errors


@pytest.mark.parametrize(
    ("column", "garbage"),
    [("input", "not json {"), ("labels", "[1, 2"), ("progress", '{"current": "many"}'), ("created_at", "x")],
)
async def test_a_run_whose_row_cannot_be_decoded_fails_and_the_other_runs_go_on(
    db: tuple[Path, Durably], column: str, garbage: str
) -> None:
    path, durably = db
    durably.max_concurrent_runs = 3  # all three in one claim: the bad row must not poison it
    errors = _errors(durably)
    reported = anyio.Event()
    durably.on("worker:error", lambda _: reported.set())
    good_before = await durably.jobs.echo.trigger({"n": 1})
    bad = await durably.jobs.echo.trigger({"n": 2})
    good_after = await durably.jobs.echo.trigger({"n": 3})
    _edit(path, f"UPDATE durably_runs SET {column} = ? WHERE id = ?", garbage, bad.id)

    with structlog.testing.capture_logs() as logs:
        async with durably:
            with anyio.fail_after(5):
                for run in (good_before, good_after):
                    done = await durably.wait_for_run(run.id)
                    assert (done.status, done.output) == ("completed", run.input)
                await reported.wait()
            # The worker is alive and well: a later run executes too.
            with anyio.fail_after(5):
                later = await durably.jobs.echo.trigger_and_wait({"n": 4}, timeout=5)
            assert later.output == {"n": 4}

    [error] = errors
    assert error.run_id == bad.id
    assert error.error.startswith("ValidationError:")
    assert f"column {column} of run {bad.id!r} cannot be decoded" in error.error
    assert any(entry["event"] == "worker error" and entry.get("run_id") == bad.id for entry in logs)
    conn = sqlite3.connect(path)
    try:
        status, stored_error = conn.execute(
            "SELECT status, error FROM durably_runs WHERE id = ?", (bad.id,)
        ).fetchone()
    finally:
        conn.close()
    assert status == "failed"
    assert stored_error == error.error


async def test_a_stored_step_that_cannot_be_decoded_fails_its_run_naming_the_step(
    db: tuple[Path, Durably],
) -> None:
    path, durably = db
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first attempt fails")
        return "second"

    @define_job(name="two-steps", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        first = await step.run("first", lambda: {"ok": True})
        second = await step.run("second", flaky)
        return [first, second]

    durably.register(job=job)
    errors = _errors(durably)
    for column, garbage, expected in (
        ("output", "{broken", "stored result of step 'first' does not decode"),
        ("idx", "not a number", "stored step 'first' of run"),
    ):
        attempts.clear()
        run = await durably.jobs.job.trigger({})
        assert await durably.process_until_idle() == 1
        failed = await durably.get_run(run.id)
        assert failed is not None
        assert failed.status == "failed"
        _edit(
            path,
            f"UPDATE durably_steps SET {column} = ? WHERE run_id = ? AND name = 'first'",
            garbage,
            run.id,
        )
        await durably.retry(run.id)  # resumes after "first", whose stored row is now garbage
        assert await durably.process_until_idle() == 1
        done = await durably.get_run(run.id)
        assert done is not None
        assert done.status == "failed"
        assert done.error is not None
        assert done.error.startswith("ValidationError:")
        assert expected in done.error
        assert attempts == [1], "the step after the corrupt one must not run"
    assert any("stored step 'first'" in error.error for error in errors)

    # Nothing is stuck: the worker goes on with good runs.
    good = await durably.jobs.echo.trigger({"n": 5})
    assert await durably.process_until_idle() == 1
    assert (await durably.wait_for_run(good.id)).output == {"n": 5}


async def test_reading_a_corrupt_run_raises_a_storage_error_naming_the_column(
    db: tuple[Path, Durably],
) -> None:
    path, durably = db
    run = await durably.jobs.echo.trigger({"n": 1})
    _edit(path, "UPDATE durably_runs SET output = '{' WHERE id = ?", run.id)
    with pytest.raises(StorageError, match=f"column output of run '{run.id}' cannot be decoded"):
        await durably.get_run(run.id)
    with pytest.raises(StorageError, match="column output"):
        await durably.get_runs()


@pytest.mark.parametrize("noticed_by", ["completion", "renewal"])
@pytest.mark.parametrize("elsewhere", ["taken over", "finished elsewhere"])
async def test_a_lost_lease_is_always_reported_as_lease_lost_error(
    tmp_path: Path, noticed_by: str, elsewhere: str
) -> None:
    path = tmp_path / "jobs.db"
    release = anyio.Event()
    in_body = anyio.Event()

    @define_job(name="victim", input=dict[str, Any])
    async def victim(step: StepContext, payload: dict[str, Any]) -> Any:
        in_body.set()
        await release.wait()
        return "stale worker's output"

    # A long heartbeat: the refused write is the completion, not a renewal.
    heartbeat = 5.0 if noticed_by == "completion" else 0.05
    durably = create_durably(
        f"file:{path}", polling_interval=0.01, heartbeat_interval=heartbeat, stale_threshold=10.0
    ).register(victim=victim)
    errors = _errors(durably)
    reported = anyio.Event()
    durably.on("worker:error", lambda _: reported.set())
    completions: list[Any] = []
    durably.on("run:complete", completions.append)
    durably.on("run:fail", completions.append)
    try:
        run = await durably.jobs.victim.trigger({})
        async with durably:
            with anyio.fail_after(5):
                await in_body.wait()
            # Another worker's claim moved the fencing token on (and, maybe, finished the run).
            if elsewhere == "taken over":
                _edit(
                    path,
                    "UPDATE durably_runs SET lease_generation = lease_generation + 1, lease_owner = 'thief'"
                    " WHERE id = ?",
                    run.id,
                )
            else:
                _edit(
                    path,
                    "UPDATE durably_runs SET lease_generation = lease_generation + 1, status = 'completed',"
                    " output = '\"thief finished\"', lease_owner = NULL WHERE id = ?",
                    run.id,
                )
            if noticed_by == "completion":
                release.set()
            with anyio.fail_after(5):
                await reported.wait()
    finally:
        release.set()
        await durably.close()

    [error] = errors
    assert error.run_id == run.id
    assert error.error.startswith("LeaseLostError: the lease on run")
    how = "finished the run" if elsewhere == "finished elsewhere" else "took it over"
    assert how in error.error
    assert completions == []  # the stale worker announced nothing
    conn = sqlite3.connect(path)
    try:
        stored = conn.execute("SELECT status, output FROM durably_runs WHERE id = ?", (run.id,)).fetchone()
    finally:
        conn.close()
    expected = ("leased", None) if elsewhere == "taken over" else ("completed", '"thief finished"')
    assert stored == expected


async def test_a_hung_database_call_is_reported_within_the_lease_and_the_worker_carries_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    durably = create_durably(
        f"file:{path}", polling_interval=0.01, heartbeat_interval=0.1, stale_threshold=1.0
    ).register(echo=echo)
    await durably.migrate()
    errors = _errors(durably)
    reported = anyio.Event()
    durably.on("worker:error", lambda _: reported.set())
    # Another process holds the write lock: durably's writes wait (busy timeout: 10 s).
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        async with durably:
            holder.execute("BEGIN IMMEDIATE")
            try:
                with anyio.fail_after(3):  # far less than the busy timeout
                    await reported.wait()
            finally:
                holder.execute("ROLLBACK")
            with anyio.fail_after(10):
                result = await durably.jobs.echo.trigger_and_wait({"n": 1}, timeout=10)
            assert result.output == {"n": 1}
    finally:
        holder.close()
        await durably.close()
    assert errors[0].context == "claiming runs"
    # Two heartbeats short of the 1 s lease.
    assert errors[0].error == "StorageError: claiming runs: the database did not answer within 0.8 s"
