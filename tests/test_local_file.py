"""The local file: statements run on the loop only when they need no waiting."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from durably import ConfigurationError, StepContext, StorageError, create_durably, define_job, open_storage
from durably._storage._driver import Statement
from durably._storage._protocol import Storage
from durably._storage._schema import LATEST_VERSION
from durably.adapters import LocalFileStorage
from durably.adapters._checkpoint import WAL_BOUND, Checkpointer
from durably.adapters._local import LocalFileDriver

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


# --- the write-ahead log stays bounded -------------------------------------------------------


@define_job(name="w3", input=dict[str, Any])
async def w3(step: StepContext, payload: dict[str, Any]) -> dict[str, Any]:
    for k in range(3):
        await step.run(f"s{k}", lambda k=k: {"i": k})
    return {"ok": True}


class _WalSampler:
    """Samples the size of a ``-wal`` file from a thread, however busy the event loop is."""

    def __init__(self, db: Path) -> None:
        self.wal = Path(f"{db}-wal")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            with contextlib.suppress(FileNotFoundError):
                self.peak = max(self.peak, self.wal.stat().st_size)

    def __enter__(self) -> _WalSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
async def test_the_wal_stays_bounded_while_a_worker_drains(tmp_path: Path) -> None:
    path = tmp_path / "durably.db"
    durably = create_durably(f"file:{path}").register(w3=w3)
    try:
        await durably.migrate()
        for _ in range(2):
            await durably.jobs.w3.batch_trigger([{}] * 1000)
        with capture_logs() as logs, _WalSampler(path) as wal:
            assert await durably.process_until_idle() == 2000
    finally:
        await durably.close()
    # Before checkpoints were checked and escalated, 2,000 runs left a ~75 MB log.
    assert 0 < wal.peak < 2 * WAL_BOUND
    assert [log for log in logs if log["event"] == "wal checkpoint failed"] == []


async def _wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.02)


async def test_a_failed_checkpoint_is_reported_counted_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "durably.db"
    driver = LocalFileDriver(str(path))
    blob = b"x" * 40_000
    await driver.write([("CREATE TABLE t (data BLOB)", ())])
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchall()  # holds a snapshot: the log cannot restart
    try:
        with capture_logs() as logs:
            for _ in range(600):  # 24 MB: past the bound, so the checkpoint must truncate
                await driver.write([("INSERT INTO t VALUES (?)", (blob,))])
            await _wait_until(lambda: driver.checkpointer.failed >= 1)
            reader.execute("COMMIT")
            for _ in range(500):
                await driver.write([("DELETE FROM t WHERE rowid = (SELECT min(rowid) FROM t)", ())])
            await _wait_until(lambda: driver.checkpointer.truncated >= 1)
            wal_after = driver.checkpointer.wal_bytes()
    finally:
        reader.close()
        await driver.close()
    gc.collect()  # an unread future holding the failure would be reported now
    assert [r for r in caplog.records if "never retrieved" in r.getMessage()] == []
    failed = [log for log in logs if log["event"] == "wal checkpoint failed"]
    assert failed[0]["mode"] == "TRUNCATE"
    assert "blocked by another connection" in failed[0]["error"]
    assert failed[0]["wal_bytes"] > WAL_BOUND
    assert driver.checkpointer.failed == len(failed)
    assert any(log["event"] == "wal checkpoint succeeded again" for log in logs)
    assert wal_after < WAL_BOUND


# --- group commit on the database thread -----------------------------------------------------


async def test_one_failing_operation_in_a_group_undoes_only_itself(tmp_path: Path) -> None:
    path = tmp_path / "durably.db"
    driver = LocalFileDriver(str(path))
    await driver.write([("CREATE TABLE t (x INTEGER PRIMARY KEY)", ())])
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # every write below goes to the database thread, together
    operations: dict[str, list[Statement]] = {
        "first": [("INSERT INTO t VALUES (1) RETURNING x", ())],
        "duplicate": [("INSERT INTO t VALUES (2)", ()), ("INSERT INTO t VALUES (1)", ())],
        "third": [("INSERT INTO t VALUES (3) RETURNING x", ())],
        "overflow": [("INSERT INTO t VALUES (4)", ()), ("INSERT INTO t VALUES (?)", (2**70,))],
    }
    outcomes: dict[str, Any] = {}

    async def submit(name: str) -> None:
        try:
            outcomes[name] = await driver.write(operations[name])
        except StorageError as exc:
            outcomes[name] = exc

    try:
        async with anyio.create_task_group() as task_group:
            for name in operations:
                task_group.start_soon(submit, name)
            await anyio.sleep(0.2)
            other.execute("COMMIT")
        rows = await driver.read("SELECT x FROM t ORDER BY x")
    finally:
        other.close()
        await driver.close()
    assert outcomes["first"] == [[(1,)]]
    assert outcomes["third"] == [[(3,)]]
    assert isinstance(outcomes["duplicate"], StorageError)
    assert "UNIQUE" in str(outcomes["duplicate"])
    assert isinstance(outcomes["overflow"], StorageError)
    assert "too large" in str(outcomes["overflow"])
    assert rows == [(1,), (3,)]


async def test_a_group_on_a_memory_database_answers_reads_and_writes() -> None:
    driver = LocalFileDriver(":memory:")
    await driver.write([("CREATE TABLE t (x INTEGER PRIMARY KEY)", ())])
    try:
        results = await asyncio.gather(
            driver.write([("INSERT INTO t VALUES (1)", ())]),
            driver.read("SELECT count(*) FROM t"),
            driver.write([("INSERT INTO t VALUES (1)", ())]),
            driver.read("SELECT x FROM t"),
            return_exceptions=True,
        )
    finally:
        await driver.close()
    assert results[0] == [[]]
    assert results[1] == [(1,)]
    assert isinstance(results[2], StorageError)
    assert results[3] == [(1,)]


# --- bad input -------------------------------------------------------------------------------

NOT_DATABASES = {
    "random bytes": random.Random(7).randbytes(16_384),
    "text": b"id,name\n1,not a database\n" * 500,
}


async def _refusals(storage: Storage) -> list[BaseException | None]:
    """What migrate(), one read and one write raise (``None`` if they did not)."""
    outcomes: list[BaseException | None] = []
    for operation in (
        storage.migrate,
        lambda: storage.get_run("r1"),
        lambda: storage.purge_runs(completed_before=datetime.now(UTC), limit=10),
    ):
        try:
            await operation()
        except Exception as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)
    return outcomes


@pytest.mark.parametrize("content", list(NOT_DATABASES.values()), ids=list(NOT_DATABASES))
async def test_a_file_that_is_no_database_is_a_storage_error_naming_it(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "not-a-database.db"
    path.write_bytes(content)
    storage = open_storage(str(path))
    try:
        on_loop = await _refusals(storage)  # the event loop's own connection
        # Another event loop, in another thread, is served by the database thread.
        on_thread = await anyio.to_thread.run_sync(lambda: asyncio.run(_refusals(storage)))
    finally:
        await storage.close()
    for outcome in on_loop + on_thread:
        assert isinstance(outcome, StorageError), outcome
        assert str(path) in str(outcome)
        assert "not a database" in str(outcome)
        assert not outcome.transient
    assert path.read_bytes() == content  # nothing was written


@pytest.mark.parametrize("url", ["durably\0.db", "file:durably\0.db", "file:///tmp/a\0b.db"])
def test_a_nul_in_a_path_is_a_configuration_error(url: str) -> None:
    with pytest.raises(ConfigurationError, match="NUL"):
        open_storage(url)


def test_the_local_adapter_class_refuses_a_nul_too() -> None:
    with pytest.raises(ConfigurationError, match="NUL"):
        LocalFileStorage("a\0b.db")


@pytest.mark.parametrize("url", ["file:q.db?mode=ro", "file:q.db?mode=rwc&cache=shared", "file:q.db#x"])
def test_file_urls_with_a_query_string_are_refused_not_taken_as_names(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=re.escape(url)):
        open_storage(url)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("url", "expected"),
    [("file:///srv/d.db", "/srv/d.db"), ("file://localhost/srv/d.db", "/srv/d.db"), ("d?.db", "d?.db")],
)
def test_local_urls_name_the_file_a_reader_expects(url: str, expected: str) -> None:
    assert open_storage(url).url == f"file:{expected}"


def test_a_file_url_naming_another_host_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"host 'example\.com'"):
        open_storage("file://example.com/srv/d.db")


# --- migrating from many processes at once ---------------------------------------------------

_MIGRATE = """
import asyncio, sys, time
from durably import open_storage

async def main(url: str, start_at: float) -> None:
    await asyncio.sleep(max(0.0, start_at - time.time()))
    stores = [open_storage(url) for _ in range(3)]  # several instances in this process too
    try:
        await asyncio.gather(*(store.migrate() for store in stores))
    finally:
        for store in stores:
            await store.close()

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def _versions(path: Path) -> list[tuple[int, int]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT version, COUNT(*) FROM durably_schema_versions GROUP BY version ORDER BY version"
        ).fetchall()
    finally:
        conn.close()


def _migrate_together(path: Path, processes: int) -> list[subprocess.CompletedProcess[str]]:
    start_at = str(time.time() + 1.0)  # after every child has imported durably
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE, f"file:{path}", start_at],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for child in children:
        _, stderr = child.communicate(timeout=90)
        results.append(subprocess.CompletedProcess(child.args, child.returncode, "", stderr))
    return results


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_six_processes_migrate_one_fresh_file_together_on_a_busy_machine(tmp_path: Path) -> None:
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for round_ in range(3):
            path = tmp_path / f"fresh-{round_}.db"
            results = _migrate_together(path, 6)
            failed = [result.stderr for result in results if result.returncode != 0]
            assert failed == [], f"round {round_}: {failed[0][-2000:]}"
            assert _versions(path) == [(version, 1) for version in range(1, LATEST_VERSION + 1)]
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_migrate_waits_for_a_writer_longer_than_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "durably.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("BEGIN IMMEDIATE")  # another process writing for 11 s, past SQLite's 10 s wait
    storage = open_storage(f"file:{path}")

    async def release() -> None:
        await anyio.sleep(11)
        other.execute("COMMIT")

    try:
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(release)
            await storage.migrate()
    finally:
        other.close()
        await storage.close()
    assert _versions(path) == [(version, 1) for version in range(1, LATEST_VERSION + 1)]


def test_a_checkpoint_never_raises_into_the_database_thread(tmp_path: Path) -> None:
    checkpointer = Checkpointer("file:x.db", str(tmp_path / "x.db-wal"), busy_timeout_ms=100)
    closed = sqlite3.connect(tmp_path / "x.db")
    closed.close()
    with capture_logs() as logs:
        checkpointer.run(closed)  # a database error: reported
        checkpointer.run(None)  # type: ignore[arg-type]  # anything else: reported too
    assert [log["event"] for log in logs] == ["wal checkpoint failed", "wal checkpoint crashed"]
    assert "closed database" in logs[0]["error"]
    assert checkpointer.failed == 2
