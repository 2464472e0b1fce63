"""The statements of waits, signals and child runs (and the resumed steps read with each
claim) find their rows through indexes: a table
of parked runs or kept signals is never scanned (EXPLAIN QUERY PLAN on a migrated file)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from durably import open_storage
from durably._storage import _queries as q

pytestmark = pytest.mark.anyio

STATEMENTS = (
    "CONSUME_SIGNAL",
    "DROP_SIGNAL",
    "STORE_CHILDREN",
    "STORE_TIMEOUT",
    "SUSPEND_RUN",
    "WAKE_FOR_SIGNAL",
    "WAKE_PARENT",
    "CANCEL_DESCENDANTS",
    "NEXT_WAKE_AT",
    "WAIT_TIMER",
    "INSERT_SIGNAL",
    "DELETE_SIGNALS",
    "PURGE_SIGNALS",
    "PARKED_AS",
    "COMPLETED_STEPS",
    "LOG_COUNTS",
)


async def test_no_wait_statement_scans_runs_steps_or_signals(tmp_path: Path) -> None:
    path = tmp_path / "plans.db"
    storage = open_storage(f"file:{path}")
    await storage.migrate()
    await storage.close()
    conn = sqlite3.connect(path)
    try:
        for name in STATEMENTS:
            sql = getattr(q, name)
            count = max((int(n) for n in re.findall(r"\?(\d+)", sql)), default=sql.count("?"))
            plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", [None] * count)]
            scans = [step for step in plan if re.match(r"SCAN durably_(runs|steps|signals)\b", step)]
            # Walking the partial index of ready runs reads only claimable ones.
            assert all("USING INDEX durably_runs_ready" in step for step in scans), (name, plan)
    finally:
        conn.close()
