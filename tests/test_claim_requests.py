"""What a claim sends: one statement unless a claimed run was claimed before (local file)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from durably._ids import new_run_id
from durably._models import LogEntry, NewRun
from durably._storage import _queries as q
from durably._storage._driver import Row, Statement, Value
from durably._storage._protocol import Lease, StepRecord, Telemetry
from durably._storage._sql import SqlStorage
from durably.adapters._local import LocalFileDriver

pytestmark = pytest.mark.anyio


class _Recording:
    """A real local-file driver that writes down the statements of every request it sends."""

    def __init__(self, path: Path) -> None:
        self._inner = LocalFileDriver(str(path))
        self.requests: list[list[str]] = []

    @property
    def url(self) -> str:
        return self._inner.url

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        self.requests.append([sql])
        return await self._inner.read(sql, params)

    async def read_primary(self, statements: Sequence[Statement]) -> list[list[Row]]:
        self.requests.append([sql for sql, _ in statements])
        return await self._inner.read_primary(statements)

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        self.requests.append([sql for sql, _ in statements])
        return await self._inner.write(statements)

    async def close(self) -> None:
        await self._inner.close()


@pytest.fixture
async def recorded(tmp_path: Path) -> AsyncIterator[tuple[SqlStorage, _Recording]]:
    driver = _Recording(tmp_path / "claims.db")
    storage = SqlStorage(driver)
    await storage.migrate()
    try:
        yield storage, driver
    finally:
        await storage.close()


def _new() -> NewRun:
    return NewRun(
        id=new_run_id(), job_name="job", input=b"{}", labels={}, idempotency_key=None, concurrency_key=None
    )


async def test_an_idle_poll_and_a_claim_of_fresh_runs_are_one_statement(
    recorded: tuple[SqlStorage, _Recording],
) -> None:
    storage, driver = recorded
    driver.requests.clear()
    assert await storage.claim_runs(worker_id="w", job_names=["job"], limit=5, lease_seconds=30) == []
    await storage.create_runs([_new(), _new()])
    driver.requests.clear()
    claimed = await storage.claim_runs(worker_id="w", job_names=["job"], limit=5, lease_seconds=30)
    assert [c.lease_generation for c in claimed] == [1, 1]
    assert driver.requests == [[q.CLAIM_RUNS]]


async def test_a_resumed_run_gets_its_steps_log_counts_and_attempts_in_a_second_request(
    recorded: tuple[SqlStorage, _Recording],
) -> None:
    storage, driver = recorded
    [run] = await storage.create_runs([_new()])
    [first] = await storage.claim_runs(worker_id="w", job_names=["job"], limit=5, lease_seconds=30)
    lease = Lease(run.id, first.lease_generation)
    now = datetime.now(UTC).timestamp()
    log = LogEntry(level="info", message="hi", step_name="done", created_at=datetime.now(UTC))
    done = StepRecord(name="done", index=0, output=b"7", started_at=now, completed_at=now)
    assert await storage.save_step(lease, done, Telemetry(logs=[log]))
    backing_off = StepRecord(
        name="flaky", index=1, error="boom", started_at=now, completed_at=None, attempts=2
    )
    assert await storage.postpone_run(lease, backing_off, 0.0, Telemetry()) is not None
    driver.requests.clear()
    [resumed] = await storage.claim_runs(worker_id="w", job_names=["job"], limit=5, lease_seconds=30)
    assert resumed.lease_generation == 2
    assert resumed.steps == {"done": (0, b"7")}
    assert resumed.log_counts == {"done": 1}
    assert resumed.step_attempts == {"flaky": 2}
    assert driver.requests == [[q.CLAIM_RUNS], [q.COMPLETED_STEPS, q.LOG_COUNTS, q.STEP_ATTEMPTS]]
