"""Real OS processes on one local database file: crash and resume, concurrent migrate, keys."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import IO

import anyio
import pytest
from anyio import Path as AsyncPath
from anyio import to_thread

from durably import Durably, create_durably
from durably._storage._schema import LATEST_VERSION

from .procs.worker import HANG_AT, PAGES, keyed, pages, three_steps

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "procs" / "worker.py"


class Child:
    """A child process with its stderr kept in a file for failure messages."""

    def __init__(self, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.process = process
        self._stderr_path = stderr_path

    def output(self) -> str:
        return self._stderr_path.read_text()

    async def wait(self, timeout: float) -> int:
        # Waiting (like spawning) happens on a thread: neither may block the event loop.
        return await to_thread.run_sync(partial(self.process.wait, timeout))

    async def finish(self, timeout: float) -> None:
        code = await self.wait(timeout)
        assert code == 0, f"child exited with {code}:\n{self.output()}"


def _popen(command: list[str], stderr: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


@asynccontextmanager
async def _spawn(tmp_path: Path, name: str, *args: str) -> AsyncIterator[Child]:
    stderr_path = tmp_path / f"{name}.stderr"
    with stderr_path.open("w") as stderr:
        process = await to_thread.run_sync(_popen, [sys.executable, str(SCRIPT), *args], stderr)
        try:
            yield Child(process, stderr_path)
        finally:
            if process.poll() is None:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await to_thread.run_sync(process.wait)


async def _wait_for(path: Path, needle: str, count: int = 1, timeout: float = 10) -> None:
    file = AsyncPath(path)
    with anyio.fail_after(timeout):
        while True:
            if await file.exists() and (await file.read_text()).split().count(needle) >= count:
                return
            await anyio.sleep(0.02)


@asynccontextmanager
async def _instance(db: str) -> AsyncIterator[Durably]:
    """A durably instance for triggering and reading; it never starts a worker here."""
    durably = create_durably(db, polling_interval=0.05).register(
        three_steps=three_steps, keyed=keyed, pages=pages
    )
    try:
        yield durably
    finally:
        await durably.close()


async def test_a_killed_worker_process_is_resumed_by_another(tmp_path: Path) -> None:
    db = f"file:{tmp_path / 'jobs.db'}"
    counter = tmp_path / "counter.txt"
    counter.touch()
    stop = tmp_path / "stop"
    async with _instance(db) as durably:
        run = await durably.jobs.three_steps.trigger({"counter": str(counter)})
        worker_args = ("work", db, "--stop-file", str(stop), "--stale", "1.0")

        async with _spawn(tmp_path, "first", *worker_args) as first:
            await _wait_for(counter, "step2")  # step 1 is stored, step 2 is running
            first.process.send_signal(signal.SIGKILL)
            assert await first.wait(5) == -signal.SIGKILL
        stored = await durably.get_run(run.id)
        assert stored is not None
        assert stored.status == "leased"  # the dead worker's lease, until it expires

        async with _spawn(tmp_path, "second", *worker_args) as second:
            done = await durably.wait_for_run(run.id, timeout=10)
            stop.touch()
            await second.finish(10)

        assert done.status == "completed", done.error
        assert done.output == 6
        assert counter.read_text().split() == ["step1", "step2", "step2", "step3"]
        steps = await durably.get_steps(run.id)
        assert [(s.name, s.status, s.output) for s in steps] == [
            ("step1", "completed", 1),
            ("step2", "completed", 2),
            ("step3", "completed", 3),
        ]


async def test_a_resumed_body_does_not_store_or_emit_its_logs_and_progress_twice(tmp_path: Path) -> None:
    """SPEC §3: on resume, log lines and progress made by code that already ran are not repeated."""
    db = f"file:{tmp_path / 'jobs.db'}"
    counter = tmp_path / "counter.txt"
    counter.touch()
    stop = tmp_path / "stop"
    async with _instance(db) as durably:
        run = await durably.jobs.pages.trigger({"counter": str(counter)})
        # Before the kill: the body's "page 0..5" and the steps' "fetching 0..5" lines.
        before_kill = 2 * (HANG_AT + 1)
        async with _spawn(tmp_path, "first", "work", db, "--stop-file", str(stop), "--stale", "1.0") as first:
            await _wait_for(counter, f"page-{HANG_AT}")
            with anyio.fail_after(10):  # what the killed worker stored, within its 1 s flush
                while True:
                    if len(await durably.get_logs(run.id)) >= before_kill:
                        break
                    await anyio.sleep(0.05)
            first.process.send_signal(signal.SIGKILL)
            assert await first.wait(5) == -signal.SIGKILL
        stored = await durably.get_run(run.id)
        assert stored is not None
        assert stored.progress is not None
        assert stored.progress.current == HANG_AT

        emitted: list[str] = []
        progress: list[float] = []
        durably.on("log:write", lambda event: emitted.append(event.message))
        durably.on("run:progress", lambda event: progress.append(event.progress.current))
        with anyio.fail_after(10):  # the dead worker's lease expires after 1 s
            while True:
                if await durably.process_until_idle():
                    break
                await anyio.sleep(0.1)
        done = await durably.get_run(run.id)
        assert done is not None
        assert done.status == "completed", done.error
        logs = await durably.get_logs(run.id)

    expected = [message for page in range(PAGES) for message in (f"page {page}", f"fetching {page}")]
    assert [entry.message for entry in logs] == expected
    assert emitted == expected[2 * (HANG_AT + 1) :]  # nothing of what had run before
    assert progress == [float(page) for page in range(HANG_AT + 1, PAGES + 1)]
    # The interrupted step ran twice (at least once); its log line is stored once.
    assert counter.read_text().split().count(f"page-{HANG_AT}") == 2


async def test_several_processes_migrating_a_fresh_file_at_once_all_succeed(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    db = f"file:{path}"
    start_at = str(time.time() + 1.5)  # after every child has started up
    async with (
        _spawn(tmp_path, "m0", "migrate", db, start_at) as m0,
        _spawn(tmp_path, "m1", "migrate", db, start_at) as m1,
        _spawn(tmp_path, "m2", "migrate", db, start_at) as m2,
        _spawn(tmp_path, "m3", "migrate", db, start_at) as m3,
        _spawn(tmp_path, "m4", "migrate", db, start_at) as m4,
        _spawn(tmp_path, "m5", "migrate", db, start_at) as m5,
    ):
        for child in (m0, m1, m2, m3, m4, m5):
            await child.finish(10)

    conn = sqlite3.connect(path)
    try:
        versions = conn.execute(
            "SELECT version, COUNT(*) FROM durably_schema_versions GROUP BY version ORDER BY version"
        ).fetchall()
        tables = {
            row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        }
    finally:
        conn.close()
    assert versions == [(version, 1) for version in range(1, LATEST_VERSION + 1)]
    assert {"durably_runs", "durably_steps", "durably_logs", "durably_labels"} <= tables

    # The migrated database works.
    async with _instance(db) as durably:
        run = await durably.jobs.keyed.trigger({"log": str(tmp_path / "unused"), "i": 0})
        assert run.status == "pending"


async def test_a_concurrency_key_is_exclusive_across_worker_processes(tmp_path: Path) -> None:
    db = f"file:{tmp_path / 'jobs.db'}"
    log = tmp_path / "keyed.log"
    ready = tmp_path / "ready"
    stop = tmp_path / "stop"
    worker_args = ("work", db, "--stop-file", str(stop), "--ready-file", str(ready), "--concurrency", "3")
    async with _instance(db) as durably:
        await durably.migrate()
        async with _spawn(tmp_path, "a", *worker_args) as a, _spawn(tmp_path, "b", *worker_args) as b:
            await _wait_for(ready, "ready", count=2)  # both workers poll before any run exists
            runs = [
                await durably.jobs.keyed.trigger({"log": str(log), "i": i}, concurrency_key="shared")
                for i in range(6)
            ]
            for run in runs:
                done = await durably.wait_for_run(run.id, timeout=12)
                assert done.status == "completed", done.error
            stop.touch()
            await a.finish(10)
            await b.finish(10)

    entries = [line.split() for line in log.read_text().splitlines()]
    # Never two at once: every start is followed by the end of the same run ...
    assert [kind for kind, _, _ in entries] == ["start", "end"] * len(runs), entries
    for (_, started, pid_start), (_, ended, pid_end) in zip(entries[::2], entries[1::2], strict=True):
        assert (started, pid_start) == (ended, pid_end)
    # ... and the runs went in trigger order.
    assert [run_id for _, run_id, _ in entries[::2]] == [run.id for run in runs]
