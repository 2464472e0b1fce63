"""The released 0.1.0 database (schema v1) upgrades on every adapter, keeping every row,
and its runs still execute: its rows are replayed into a fresh database through the
adapter's own driver (a fresh sqld for remote and replica), then migrated."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from durably import create_durably
from durably._storage._protocol import RunFilter
from durably._storage._schema import LATEST_VERSION
from durably._storage._sql import SqlStorage

from .conftest import Database
from .fixtures.make_release_db import job as legacy  # the job 0.1.0 ran, unchanged

pytestmark = pytest.mark.anyio

RELEASE_DB = Path(__file__).parent / "fixtures" / "durably-0.1.0.db"
TABLES = {
    "durably_runs": "seq",
    "durably_steps": "run_id, name",
    "durably_logs": "seq",
    "durably_labels": "run_seq, key",
}


def _release_sql() -> list[str]:
    """The 0.1.0 database as SQL statements (schema and rows), without its transaction."""
    conn = sqlite3.connect(RELEASE_DB)
    try:
        return [line for line in conn.iterdump() if line not in ("BEGIN TRANSACTION;", "COMMIT;")]
    finally:
        conn.close()


def _release_rows() -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(RELEASE_DB)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()
            for table, order in TABLES.items()
        }
    finally:
        conn.close()


async def _rows(storage: SqlStorage, columns: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    found = {}
    for table, order in TABLES.items():
        [rows] = await storage._driver.write(
            [(f"SELECT {', '.join(columns[table])} FROM {table} ORDER BY {order}", ())]
        )
        found[table] = [tuple(row) for row in rows]
    return found


def _columns() -> dict[str, list[str]]:
    conn = sqlite3.connect(RELEASE_DB)
    try:
        return {table: [row[1] for row in conn.execute(f"PRAGMA table_info({table})")] for table in TABLES}
    finally:
        conn.close()


async def test_the_release_database_upgrades_and_its_runs_execute(database: Database) -> None:
    storage = database.open()
    assert isinstance(storage, SqlStorage)
    try:
        await storage._driver.write([(sql, ()) for sql in _release_sql()])
        await storage.migrate()
        assert await _rows(storage, _columns()) == _release_rows()  # every row, as 0.1.0 wrote it
        runs = await storage.get_runs(RunFilter(labels={"team": "a"}))
        assert sorted(run.input["n"] for run in runs) == [1, 4]  # labels survived, still indexed
        [version] = (await storage._driver.write([("SELECT MAX(version) FROM durably_schema_versions", ())]))[
            0
        ]
        assert version[0] == LATEST_VERSION
    finally:
        await storage.close()
    durably = create_durably(database.open(), polling_interval=0.01).register(legacy=legacy)
    try:
        assert await durably.process_until_idle() == 1  # the pending 0.1.0 run
        [pending] = await durably.get_runs(job_name="legacy", labels={"team": "a"}, limit=1)
        assert (pending.status, pending.output) == ("completed", {"ok": True, "n": 4})
        failed = [run for run in await durably.get_runs(status="failed")]
        await durably.retry(failed[0].id)  # an old failed run resumes after its stored step
        await durably.process_until_idle()
        assert [s.name for s in await durably.get_steps(failed[0].id)][:1] == ["a"]
    finally:
        await durably.close()
