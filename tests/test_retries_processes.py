"""Retries across real worker processes on one local file: crashes and exactly-once attempts."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from anyio import Path as AsyncPath
from anyio import to_thread

from durably import Durably, create_durably

from .procs.retrying import HANG_AT_CALL, JOBS

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).parent.parent


@asynccontextmanager
async def _worker(
    tmp_path: Path, name: str, db: str, stop: Path, ready: Path
) -> AsyncIterator[subprocess.Popen[bytes]]:
    """A worker process (tests/procs/retrying.py); killed at the end if it is still alive."""
    command = [
        sys.executable,
        "-m",
        "tests.procs.retrying",
        db,
        "--stop-file",
        str(stop),
        "--ready-file",
        str(ready),
    ]
    with (tmp_path / f"{name}.stderr").open("w") as stderr:
        process = await to_thread.run_sync(
            lambda: subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(process.wait, 10)


async def _lines(path: Path, count: int, timeout: float = 15) -> list[str]:
    """The file's lines once it has at least ``count`` of them."""
    file = AsyncPath(path)
    with anyio.fail_after(timeout):
        while True:
            if await file.exists():
                lines = (await file.read_text()).splitlines()
                if len(lines) >= count:
                    return lines
            await anyio.sleep(0.02)


async def _finished(process: subprocess.Popen[bytes], stop: Path) -> None:
    """Ask the workers to stop (the stop file) and check that this one exited cleanly."""
    await AsyncPath(stop).touch()
    assert await to_thread.run_sync(process.wait, 15) == 0, "a worker failed: see its .stderr file"


@asynccontextmanager
async def _instance(db: str) -> AsyncIterator[Durably]:
    durably = create_durably(db, polling_interval=0.05).register(**JOBS)
    try:
        await durably.migrate()
        yield durably
    finally:
        await durably.close()


async def test_a_crash_during_step_retries_keeps_the_stored_attempt_count(tmp_path: Path) -> None:
    db, log, stop, ready = (
        f"file:{tmp_path / 'jobs.db'}",
        tmp_path / "calls",
        tmp_path / "stop",
        tmp_path / "ready",
    )
    log.touch()
    async with _instance(db) as durably:
        run = await durably.jobs.step_retries.trigger({"log": str(log)})
        async with _worker(tmp_path, "first", db, stop, ready) as first:
            await _lines(log, HANG_AT_CALL)  # two attempts failed and were stored; the third hangs
            first.send_signal(signal.SIGKILL)
            assert await to_thread.run_sync(first.wait, 5) == -signal.SIGKILL
        async with _worker(tmp_path, "second", db, stop, ready) as second:
            done = await durably.wait_for_run(run.id, timeout=15)
            await _finished(second, stop)
    # The interrupted third attempt ran again as the third, then the step was out of attempts;
    # a count started over would have made calls 4, 5 and 6.
    assert log.read_text().split() == ["call-1", "call-2", "call-3", "call-4"]
    assert (done.status, done.error) == ("failed", "RuntimeError: call 4 failed")


async def test_each_retry_is_executed_by_exactly_one_of_several_worker_processes(tmp_path: Path) -> None:
    db, log, stop, ready = (
        f"file:{tmp_path / 'jobs.db'}",
        tmp_path / "attempts",
        tmp_path / "stop",
        tmp_path / "ready",
    )
    async with (
        _instance(db) as durably,
        _worker(tmp_path, "a", db, stop, ready) as a,
        _worker(tmp_path, "b", db, stop, ready) as b,
        _worker(tmp_path, "c", db, stop, ready) as c,
    ):
        await _lines(ready, 3)
        runs = await durably.jobs.run_retries.batch_trigger([{"log": str(log)} for _ in range(12)])
        for run in runs:
            done = await durably.wait_for_run(run.id, timeout=30)
            assert (done.status, done.attempt, done.output) == ("completed", 3, 3), done.error
        for process in (a, b, c):
            await _finished(process, stop)
    executions = Counter(
        (run_id, attempt) for run_id, attempt, _ in (line.split() for line in log.read_text().splitlines())
    )
    assert executions == Counter({(run.id, str(n)): 1 for run in runs for n in (1, 2, 3)})
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert len(pids) >= 2  # the work was shared, so the exactly-once claim was put to the test
