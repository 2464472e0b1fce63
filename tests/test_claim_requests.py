"""What a claim sends: on a local file one statement unless a claimed run was claimed before
(then a read of its steps) or a serving worker's claim took none (then a read of the next
due time); remotely one request that carries those reads too (a round trip costs more)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from durably._models import LogEntry, NewRun
from durably._storage import _queries as q
from durably._storage._driver import Driver, Row, Statement, Value
from durably._storage._protocol import Claim, Lease, StepRecord, Telemetry
from durably._storage._sql import SqlStorage
from durably.adapters._local import LocalFileDriver
from durably.adapters._remote import RemoteDriver
from tests.support.runs import new_run
from tests.support.sqld import SqldServer

pytestmark = pytest.mark.anyio


class _Recording:
    """A real driver that writes down the statements of every request it sends."""

    def __init__(self, inner: Driver) -> None:
        self._inner = inner
        self.requests: list[list[str]] = []

    @property
    def url(self) -> str:
        return self._inner.url

    @property
    def local(self) -> bool:
        return self._inner.local

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


@pytest.fixture(params=["local", "remote"])
async def recorded(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[SqlStorage, _Recording]]:
    with contextlib.ExitStack() as stack:
        if request.param == "local":
            inner: Driver = LocalFileDriver(str(tmp_path / "claims.db"))
        else:
            inner = RemoteDriver(stack.enter_context(SqldServer(tmp_path / "sqld")).http_url)
        driver = _Recording(inner)
        storage = SqlStorage(driver)
        await storage.migrate()
        try:
            yield storage, driver
        finally:
            await storage.close()


_RESUMED_READS = [q.COMPLETED_STEPS, q.LOG_COUNTS, q.STEP_ATTEMPTS]
_OPTIONS: dict[str, Any] = {"worker_id": "w", "job_names": ["job"], "limit": 5, "lease_seconds": 30}


def _new() -> NewRun:
    return new_run()


async def test_an_idle_poll_and_a_claim_of_fresh_runs_are_one_request(
    recorded: tuple[SqlStorage, _Recording],
) -> None:
    storage, driver = recorded
    one_request = [q.CLAIM_RUNS] if driver.local else [q.CLAIM_RUNS, *_RESUMED_READS]
    driver.requests.clear()
    assert await storage.claim_runs(**_OPTIONS) == Claim([], None)
    assert driver.requests == [one_request]
    await storage.create_runs([_new(), _new()])
    driver.requests.clear()
    claimed = await storage.claim_runs(**_OPTIONS)
    assert [c.lease_generation for c in claimed.runs] == [1, 1]
    assert driver.requests == [one_request]


async def test_a_serving_worker_s_claim_reads_the_next_due_time_only_when_idle_on_a_local_file(
    recorded: tuple[SqlStorage, _Recording],
) -> None:
    storage, driver = recorded
    driver.requests.clear()
    assert await storage.claim_runs(**_OPTIONS, next_due_within=2.0) == Claim([], None)
    idle = list(driver.requests)
    await storage.create_runs([_new()])
    driver.requests.clear()
    claimed = await storage.claim_runs(**_OPTIONS, next_due_within=2.0)
    assert len(claimed.runs) == 1
    # Locally a second request, only when idle; remotely it rides along in the claim's.
    if driver.local:
        assert (idle, driver.requests) == ([[q.CLAIM_RUNS], [q.NEXT_DUE]], [[q.CLAIM_RUNS]])
    else:
        assert idle == driver.requests == [[q.CLAIM_RUNS, *_RESUMED_READS, q.NEXT_DUE]]


async def test_a_resumed_run_gets_its_steps_log_counts_and_attempts(
    recorded: tuple[SqlStorage, _Recording],
) -> None:
    storage, driver = recorded
    [run] = await storage.create_runs([_new()])
    [first] = (await storage.claim_runs(worker_id="w", job_names=["job"], limit=5, lease_seconds=30)).runs
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
    [resumed] = (await storage.claim_runs(worker_id="w", job_names=["job"], limit=5, lease_seconds=30)).runs
    assert resumed.lease_generation == 2
    assert resumed.steps == {"done": (0, b"7")}
    assert resumed.log_counts == {"done": 1}
    assert resumed.step_attempts == {"flaky": 2}
    # A second request only where requests are cheap; remotely it rode along in the claim's.
    if driver.local:
        assert driver.requests == [[q.CLAIM_RUNS], _RESUMED_READS]
    else:
        assert driver.requests == [[q.CLAIM_RUNS, *_RESUMED_READS]]
