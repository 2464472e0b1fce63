"""Run-API writes re-sent after a lost answer report what the first send did (SPEC §15).

The remote driver sends a request again, once, when the connection it went on turns out
closed (aiohttp's ``ServerDisconnectedError``): the fault proxy lets sqld do the work and
closes the connection instead of passing the answer on, so the re-send finds the change
already made. Each call must answer as the first send would have, and change nothing twice.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import anyio
import pytest

from durably import Durably, create_durably, open_storage
from durably._ids import new_run_id
from durably._models import NewRun
from durably._storage import _queries as q
from durably._storage._protocol import Lease, Storage, Telemetry
from durably._storage._sql import SqlStorage

from .conftest import Database
from .jobs import stored_echo as echo
from .support.proxy import TcpProxy
from .support.sqld import SqldServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

T = TypeVar("T")


def _new_run(job_name: str = "echo") -> NewRun:
    return NewRun(
        id=new_run_id(),
        job_name=job_name,
        input=b"{}",
        labels={"team": "a"},
        idempotency_key=None,
        concurrency_key=None,
    )


@pytest.fixture
async def storage(server: SqldServer, proxy: TcpProxy) -> AsyncIterator[Storage]:
    """Storage whose requests go through the fault proxy."""
    store = open_storage(proxy.url)
    try:
        await store.migrate()
        yield store
    finally:
        await store.close()


@pytest.fixture
async def durably(server: SqldServer, proxy: TcpProxy) -> AsyncIterator[Durably]:
    """An instance whose requests go through the fault proxy. It polls rarely, so the answer
    lost is the call's under test, and a waiter wakes only when told."""
    async with create_durably(proxy.url, polling_interval=60) as instance:
        instance.register(echo=echo)
        await instance.migrate()
        yield instance


async def _ended(storage: Storage, ending: str) -> str:
    """The id of a run claimed and then completed or failed."""
    [run] = await storage.create_runs([_new_run()])
    claim = await storage.claim_runs(worker_id="w1", job_names=["echo"], limit=1, lease_seconds=30)
    [claimed] = claim.runs
    lease = Lease(run.id, claimed.lease_generation)
    if ending == "completed":
        assert await storage.complete_run(lease, b"{}", Telemetry())
    else:
        assert await storage.fail_run(lease, "boom", Telemetry())
    return run.id


async def _resent(proxy: TcpProxy, call: Awaitable[T]) -> T:
    """What ``call`` answers when sqld does its write but the answer is lost on the way back."""
    proxy.reset_counters()
    proxy.lose_answers(1)  # sqld does the work; the client sees the connection closed
    with anyio.fail_after(20):
        answer = await call
    assert proxy.http_requests >= 2, "the answer was not lost and the request re-sent"
    return answer


async def _count(storage: Storage, sql: str, *params: str) -> int:
    assert isinstance(storage, SqlStorage)
    [rows] = await storage._driver.read_primary([(sql, params)])
    return int(rows[0][0] or 0)


async def test_a_retry_resent_after_a_lost_answer_returns_the_retried_run(
    storage: Storage, proxy: TcpProxy
) -> None:
    run_id = await _ended(storage, "failed")
    # Before the fix: ConflictError, as the re-send found the run pending.
    run = await _resent(proxy, storage.retry_run(run_id))
    assert (run.id, run.status, run.attempt) == (run_id, "pending", 2)
    again = await storage.get_run(run_id)
    assert again is not None and (again.status, again.attempt) == ("pending", 2), "retried twice"


async def test_a_delete_resent_after_a_lost_answer_returns_the_deleted_run(
    storage: Storage, proxy: TcpProxy
) -> None:
    run_id = await _ended(storage, "completed")
    # Before the fix: NotFoundError, as the re-send found the run gone.
    run = await _resent(proxy, storage.delete_run(run_id))
    assert (run.id, run.job_name, run.status, run.labels) == (run_id, "echo", "completed", {"team": "a"})
    assert await storage.get_run(run_id) is None


async def test_a_cancel_resent_after_a_lost_answer_is_reported_as_this_calls(
    durably: Durably, proxy: TcpProxy
) -> None:
    # A job no worker here serves: the run stays pending until cancelled.
    [run] = await durably.storage.create_runs([_new_run("elsewhere")])
    cancelled: list[str] = []
    durably.on("run:cancel", lambda event: cancelled.append(event.run_id))
    # Before the fix: the re-send found the run cancelled already, "not changed", so the
    # caller neither announced it nor woke its waiters nor stopped a local execution.
    answer = await _resent(proxy, durably.cancel(run.id))
    assert answer.status == "cancelled"
    assert cancelled == [run.id], "run:cancel was not emitted for a cancel that landed"


async def test_a_signal_resent_after_a_lost_answer_is_stored_once(storage: Storage, proxy: TcpProxy) -> None:
    [run] = await storage.create_runs([_new_run()])
    answer = await _resent(proxy, storage.send_signal(run.id, "go", b'{"n": 1}'))
    assert (answer.id, answer.status) == (run.id, "pending")
    # Each signal is consumed by exactly one wait: a second copy would satisfy a second wait.
    stored = await _count(storage, "SELECT COUNT(*) FROM durably_signals WHERE run_id = ?", run.id)
    assert stored == 1, f"the signal was stored {stored} times"


async def test_a_purge_resent_after_a_lost_answer_counts_and_purges_one_batch(
    storage: Storage, proxy: TcpProxy
) -> None:
    for _ in range(3):
        await _ended(storage, "completed")
    purged = await _resent(
        proxy, storage.purge_runs(completed_before=datetime.now(UTC) + timedelta(days=1), limit=2)
    )
    assert purged == 2, "the count is not the first send's"
    left = await _count(storage, "SELECT COUNT(*) FROM durably_runs")
    assert left == 1, "the re-send purged a second batch"


async def test_a_run_api_write_forgets_tokens_no_resend_can_come_for(database: Database) -> None:
    storage = database.open()
    assert isinstance(storage, SqlStorage)
    try:
        await storage.migrate()
        # Two tokens by the database clock: from before the lifetime (600 s), and from just now.
        at = f"{q.NOW} - ?"
        record = f"INSERT INTO durably_writes (token, answer, created_at) VALUES (?, NULL, {at})"
        await storage._driver.write([(record, ("stale", 601.0)), (record, ("recent", 5.0))])
        [run] = await storage.create_runs([_new_run()])
        await storage.send_signal(run.id, "go", b"1")
        [rows] = await storage._driver.read_primary([("SELECT token FROM durably_writes", ())])
        tokens = {row[0] for row in rows}
        assert "stale" not in tokens, "the write table keeps tokens forever"
        assert "recent" in tokens and len(tokens) == 2, tokens  # and the signal's own
    finally:
        await storage.close()


async def test_each_run_api_write_is_one_request_with_its_token(storage: Storage, proxy: TcpProxy) -> None:
    # The token costs no round trip: recorded and read back in the request that makes the change.
    failed, completed = await _ended(storage, "failed"), await _ended(storage, "completed")
    [pending] = await storage.create_runs([_new_run()])
    calls = {
        "retry": lambda: storage.retry_run(failed),
        "signal": lambda: storage.send_signal(pending.id, "go", b"1"),
        "cancel": lambda: storage.cancel_run(pending.id),
        "delete": lambda: storage.delete_run(completed),
        "purge": lambda: storage.purge_runs(completed_before=datetime.now(UTC), limit=10),
    }
    requests = {}
    for name, call in calls.items():
        proxy.reset_counters()
        await call()
        requests[name] = proxy.http_requests
    assert requests == dict.fromkeys(calls, 1)
