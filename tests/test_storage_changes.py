"""``get_run_changes`` and keyset pagination, on every adapter; upgrades of 0.1.0's and a v3 database."""

from __future__ import annotations

import re
import shutil
import sqlite3
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from durably import open_storage
from durably._models import LogEntry, NewRun, Progress
from durably._storage import _queries as q
from durably._storage._protocol import Lease, RunFilter, StepRecord, Storage, Telemetry
from durably._storage._schema import CREATE_VERSION_TABLE, LATEST_VERSION, MIGRATIONS
from tests.support.runs import new_run

pytestmark = pytest.mark.anyio


def _new(job: str = "job-a") -> NewRun:
    return new_run(job)


async def _changed(storage: Storage, cursor: int) -> tuple[list[str], int]:
    changes = await storage.get_run_changes(cursor, limit=100)
    assert changes.cursor >= cursor
    return [run.id for run in changes.runs], changes.cursor


async def _lease(storage: Storage) -> Lease:
    [claimed] = (await storage.claim_runs(worker_id="w", job_names=["job-a"], limit=1, lease_seconds=30)).runs
    return Lease(claimed.run.id, claimed.lease_generation)


async def test_every_visible_change_of_a_run_moves_it_past_the_cursor_once(storage: Storage) -> None:
    start = await storage.get_run_changes(None, limit=100)
    assert start.runs == []
    [run, other] = await storage.create_runs([_new(), _new("job-b")])
    ids, cursor = await _changed(storage, start.cursor)
    assert ids == [run.id, other.id]
    assert await _changed(storage, cursor) == ([], cursor)

    lease = await _lease(storage)
    now = datetime.now(UTC).timestamp()
    log = LogEntry(level="info", message="hi", created_at=datetime.now(UTC))
    step = StepRecord(name="s", index=0, started_at=now, completed_at=now)
    writes: dict[str, Callable[[], Awaitable[bool]] | None] = {
        "claim": None,  # done above, after the cursor was taken
        "step": lambda: storage.save_step(lease, step, Telemetry()),
        "progress": lambda: storage.save_telemetry(lease, Telemetry(progress=Progress(1, 2))),
        "log": lambda: storage.save_telemetry(lease, Telemetry(logs=[log])),
        "complete": lambda: storage.complete_run(lease, b"1", Telemetry()),
    }
    for what, write in writes.items():
        if write is not None:
            assert await write(), what
        ids, next_cursor = await _changed(storage, cursor)
        assert ids == [run.id], what
        assert next_cursor > cursor, what
        cursor = next_cursor
    [changed] = (await storage.get_run_changes(start.cursor, limit=100)).runs[-1:]
    assert (changed.id, changed.status, changed.progress) == (run.id, "completed", Progress(1, 2))


async def test_renewing_a_lease_is_not_a_change(storage: Storage) -> None:
    await storage.create_runs([_new()])
    lease = await _lease(storage)
    cursor = (await storage.get_run_changes(None, limit=10)).cursor
    assert await storage.renew_leases([lease], lease_seconds=30) == {lease.run_id}
    assert await _changed(storage, cursor) == ([], cursor)


async def test_a_run_changed_twice_comes_once_and_limit_pages_the_rest(storage: Storage) -> None:
    cursor = (await storage.get_run_changes(None, limit=10)).cursor
    runs = await storage.create_runs([_new() for _ in range(5)])
    await storage.cancel_run(runs[0].id)
    first = await storage.get_run_changes(cursor, limit=3)
    assert [r.id for r in first.runs] == [r.id for r in runs[1:4]]
    rest = await storage.get_run_changes(first.cursor, limit=3)
    assert [(r.id, r.status) for r in rest.runs] == [(runs[4].id, "pending"), (runs[0].id, "cancelled")]
    assert (await storage.get_run_changes(rest.cursor, limit=3)).runs == []


async def test_runs_claimed_together_are_all_seen_whatever_the_page_size(storage: Storage) -> None:
    runs = await storage.create_runs([_new() for _ in range(3)])
    cursor = (await storage.get_run_changes(None, limit=10)).cursor
    claimed = (await storage.claim_runs(worker_id="w", job_names=["job-a"], limit=3, lease_seconds=30)).runs
    assert len(claimed) == 3
    seen: list[tuple[str, str]] = []
    for _ in range(4):
        changes = await storage.get_run_changes(cursor, limit=1)
        seen += [(run.id, run.status) for run in changes.runs]
        cursor = changes.cursor
    assert sorted(seen) == sorted((run.id, "leased") for run in runs)


def _assignments(sql: str) -> str:
    """What an ``UPDATE durably_runs`` sets, or the columns an ``INSERT INTO durably_runs`` names."""
    statement = r"(?:UPDATE durably_runs SET|INSERT INTO durably_runs)(.*?)(?:\bWHERE\b|\bVALUES\b)"
    found = re.search(statement, sql, re.S)
    return found.group(1) if found else ""


def test_every_statement_that_changes_what_a_run_shows_moves_its_change() -> None:
    # The triggers that did this are gone (schema v4): a statement that forgets is a change the
    # dashboards never see.
    shown = re.compile(r"\b(status|progress|attempt|output|error)\s*=|\(id,")
    writers = {
        name: sql for name, sql in vars(q).items() if isinstance(sql, str) and shown.search(_assignments(sql))
    }
    assert {"INSERT_RUN", "CLAIM_RUNS", "COMPLETE_RUN", "SAVE_PROGRESS", "SUSPEND_RUN"} <= set(writers)
    forgot = [name for name, sql in writers.items() if "change_seq =" not in sql and "change_seq)" not in sql]
    assert forgot == []


async def test_get_runs_pages_by_cursor_even_when_the_cursor_run_is_gone(storage: Storage) -> None:
    runs = await storage.create_runs([_new() for _ in range(5)])
    newest_first = [r.id for r in reversed(runs)]
    page = await storage.get_runs(RunFilter(limit=2))
    assert [r.id for r in page] == newest_first[:2]
    page = await storage.get_runs(RunFilter(limit=2, before_id=page[-1].id))
    assert [r.id for r in page] == newest_first[2:4]
    await storage.cancel_run(page[-1].id)
    await storage.delete_run(page[-1].id)
    page = await storage.get_runs(RunFilter(limit=2, before_id=page[-1].id))
    assert [r.id for r in page] == newest_first[4:]
    assert await storage.get_runs(RunFilter(before_id=newest_first[-1])) == []


def test_the_change_query_is_an_index_seek(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        for version in MIGRATIONS:
            for sql in version:
                conn.execute(sql)
        plans = [
            " ".join(str(row[-1]) for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in ((q.RUN_CHANGES, (0, 10)), (q.LATEST_CHANGE, ()))
        ]
    finally:
        conn.close()
    for plan in plans:
        assert plan.startswith("SEARCH durably_runs USING") and "durably_runs_change" in plan, plan


RELEASE_DB = Path(__file__).parent / "fixtures" / "durably-0.1.0.db"


def _v1_columns(table: str) -> str:
    """The columns durably 0.1.0 created in ``table`` (later migrations add more)."""
    conn = sqlite3.connect(RELEASE_DB)
    try:
        return ", ".join(row[1] for row in conn.execute(f"PRAGMA table_info({table})"))
    finally:
        conn.close()


def _dump(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row durably 0.1.0 wrote, in the columns it knew."""
    conn = sqlite3.connect(path)
    try:
        return {
            key: conn.execute(f"SELECT {_v1_columns(table)} FROM {table} ORDER BY {order}").fetchall()
            for key, table, order in (
                ("runs", "durably_runs", "seq"),
                ("steps", "durably_steps", "run_id, name"),
                ("logs", "durably_logs", "seq"),
                ("labels", "durably_labels", "run_seq, key"),
            )
        }
    finally:
        conn.close()


def _column_of(path: Path, sql: str) -> list[object]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute(sql)]
    finally:
        conn.close()


async def test_the_released_v1_database_upgrades_keeping_every_row(tmp_path: Path) -> None:
    path = tmp_path / "release.db"
    shutil.copy(RELEASE_DB, path)
    before = _dump(path)
    assert len(before["runs"]) == 5 and before["steps"] and before["logs"] and before["labels"]
    storage = open_storage(f"file:{path}")
    try:
        await storage.migrate()
        assert _dump(path) == before
        runs = {run.id: run for run in await storage.get_runs(RunFilter())}
        assert sorted(run.status for run in runs.values()) == [
            "cancelled",
            "completed",
            "completed",
            "failed",
            "pending",
        ]
        for run_id in runs:
            await storage.get_steps(run_id)  # every stored row still decodes
            await storage.get_logs(run_id)
        # Old runs sit behind the cursor of an empty start; new changes come after them.
        old = await storage.get_run_changes(0, limit=10)
        assert sorted(run.id for run in old.runs) == sorted(runs)
        [new] = await storage.create_runs([_new()])
        assert [r.id for r in (await storage.get_run_changes(old.cursor, limit=10)).runs] == [new.id]
    finally:
        await storage.close()
    versions = _column_of(path, "SELECT version FROM durably_schema_versions")
    assert versions == list(range(1, LATEST_VERSION + 1))


async def test_a_v3_database_upgrades_to_statements_that_move_the_change_themselves(tmp_path: Path) -> None:
    path = tmp_path / "v3.db"
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(CREATE_VERSION_TABLE)
        for version, statements in enumerate(MIGRATIONS[:3], start=1):
            for sql in statements:
                conn.execute(sql)
            conn.execute(q.RECORD_VERSION, (version,))
        conn.execute(
            "INSERT INTO durably_runs (id, job_name, status, input, created_at)"
            " VALUES ('old', 'job-a', 'pending', '{}', 0)"
        )
    finally:
        conn.close()
    storage = open_storage(f"file:{path}")
    try:
        await storage.migrate()
        cursor = (await storage.get_run_changes(None, limit=10)).cursor
        assert cursor > 0  # the old run's change, made by the v2 trigger
        [new] = await storage.create_runs([_new("job-b")])
        ids, cursor = await _changed(storage, cursor)
        assert ids == [new.id]
        await _lease(storage)
        assert (await _changed(storage, cursor))[0] == ["old"]
    finally:
        await storage.close()
    triggers = _column_of(path, "SELECT name FROM sqlite_master WHERE type = 'trigger'")
    assert sorted(triggers) == ["durably_logs_inserted", "durably_steps_inserted", "durably_steps_updated"]
