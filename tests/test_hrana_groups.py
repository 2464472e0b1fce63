"""One sqld transaction for the writes of one pass of the event loop (issue 11, part 2).

Every test talks to a real sqld through tests/support/latency.py (no added delay),
which counts the ``BEGIN`` statements, i.e. the transactions, that sqld was asked for.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from durably import StorageError
from durably._ids import new_run_id
from durably._models import NewRun
from durably._storage._protocol import RunFilter
from durably.adapters import RemoteStorage
from durably.adapters._remote import RemoteDriver

from .support.latency import LatencyProxy
from .support.proxy import TcpProxy
from .support.sqld import SqldServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# One operation of one statement in a group: SAVEPOINT, the statement, ROLLBACK TO, RELEASE.
_STEPS_PER_OPERATION = 4


@pytest.fixture
async def proxy(server: SqldServer) -> AsyncIterator[LatencyProxy]:
    assert server.port is not None
    async with LatencyProxy(server.port, 0) as front:
        yield front


@pytest.fixture
async def driver(proxy: LatencyProxy) -> AsyncIterator[RemoteDriver]:
    remote = RemoteDriver(proxy.url)
    await remote.write([("CREATE TABLE t (x INTEGER PRIMARY KEY)", ())])
    # RAISE(ROLLBACK) ends the whole transaction, not only the failing statement.
    trigger = (
        "CREATE TRIGGER no_666 BEFORE INSERT ON t WHEN NEW.x = 666"
        " BEGIN SELECT RAISE(ROLLBACK, 'no 666'); END"
    )
    await remote.write([(trigger, ())])
    proxy.counts.figures.clear()
    yield remote
    await remote.close()


async def _stored(driver: RemoteDriver) -> list[int]:
    return [int(row[0]) for row in await driver.read("SELECT x FROM t ORDER BY x")]  # type: ignore[arg-type]


async def _together(*operations: object) -> list[object]:
    """Run ``operations`` concurrently, so they are queued in one pass of the event loop."""
    return await asyncio.gather(*operations, return_exceptions=True)  # type: ignore[arg-type]


async def test_a_failing_operation_is_undone_alone_and_answered_with_its_own_error(
    driver: RemoteDriver, proxy: LatencyProxy
) -> None:
    first, failing, last = await _together(
        driver.write([("INSERT INTO t VALUES (1) RETURNING x", ())]),
        # Its first statement lands, then its second fails: the first must be undone too.
        driver.write([("INSERT INTO t VALUES (2)", ()), ("INSERT INTO t VALUES (1)", ())]),
        driver.write([("INSERT INTO t VALUES (3) RETURNING x * 10", ())]),
    )
    assert first == [[(1,)]]
    assert last == [[(30,)]]
    assert isinstance(failing, StorageError)
    assert "UNIQUE constraint failed: t.x" in str(failing)
    assert not failing.transient
    assert await _stored(driver) == [1, 3]
    assert proxy.counts.figures["transactions"] == 1, "the three writes did not share one transaction"
    assert proxy.counts.figures["requests"] == 2  # the group, then the read


async def test_answers_go_back_to_their_callers(driver: RemoteDriver, proxy: LatencyProxy) -> None:
    values = list(range(1, 41))
    operations = []
    for value in values:
        operations.append(driver.write([(f"INSERT INTO t VALUES (?) RETURNING x + {value}", (value,))]))
        operations.append(driver.read("SELECT ? * 2", (value,)))
    operations.insert(10, driver.write([("INSERT INTO t VALUES (5)", ())]))  # taken: fails alone
    answers = await _together(*operations)
    failed = answers.pop(10)
    assert isinstance(failed, StorageError)
    assert answers == [answer for value in values for answer in ([[(2 * value,)]], [(2 * value,)])]
    assert await _stored(driver) == values
    assert proxy.counts.figures["transactions"] == 1


async def test_an_error_that_ends_the_transaction_sends_the_others_again(
    driver: RemoteDriver, proxy: LatencyProxy
) -> None:
    first, ending, last = await _together(
        driver.write([("INSERT INTO t VALUES (1)", ())]),
        driver.write([("INSERT INTO t VALUES (666)", ())]),
        driver.write([("INSERT INTO t VALUES (3)", ())]),
    )
    assert first == [[]] and last == [[]]
    assert isinstance(ending, StorageError) and "no 666" in str(ending)
    assert await _stored(driver) == [1, 3]
    # The first group rolled back whole; the two others went again, without the failing one.
    assert proxy.counts.figures["transactions"] == 2


async def test_a_busy_group_is_sent_again_whole(
    server: SqldServer, driver: RemoteDriver, proxy: LatencyProxy
) -> None:
    """A writer outside sqld holding the file's write lock makes sqld answer SQLITE_BUSY."""
    assert server.data_dir is not None
    [data] = [path for path in server.data_dir.rglob("dbs/default/data") if path.is_file()]
    outside = sqlite3.connect(data, isolation_level=None, check_same_thread=False)
    try:
        outside.execute("BEGIN IMMEDIATE")
        threading.Timer(0.5, outside.execute, ("COMMIT",)).start()
        with anyio.fail_after(20):
            answers = await _together(
                *(driver.write([(f"INSERT INTO t VALUES ({x})", ())]) for x in (1, 2, 3))
            )
    finally:
        await anyio.sleep(0.6)
        outside.close()
    assert answers == [[[]]] * 3
    assert await _stored(driver) == [1, 2, 3]
    figures = proxy.counts.figures
    assert figures["transactions"] > 1, "sqld never answered 'database is locked'"
    # Every attempt carried the whole group: BEGIN, 3 operations, COMMIT, ROLLBACK.
    assert figures["statements"] - 1 == figures["transactions"] * (2 + 3 * _STEPS_PER_OPERATION + 1)


async def test_a_group_whose_answer_was_lost_is_sent_again_and_read_as_done(server: SqldServer) -> None:
    """create_runs re-sent after its group landed finds its runs stored under their own ids."""
    assert server.port is not None
    with TcpProxy("127.0.0.1", server.port) as front:
        storage = RemoteStorage(front.url)
        try:
            await storage.migrate()
            runs = [
                NewRun(
                    id=new_run_id(),
                    job_name="echo",
                    input=b"{}",
                    labels={},
                    idempotency_key=None,
                    concurrency_key=None,
                )
                for _ in range(3)
            ]
            front.reset_counters()
            front.lose_answers(1)  # sqld commits the group; the client sees the connection close
            with anyio.fail_after(20):
                created = await _together(*(storage.create_runs([run]) for run in runs))
            # The lost group, the group sent again (its INSERTs find their ids taken), then
            # the reads that find those runs stored: each time the three together.
            assert front.http_requests == 3, "the answer was not lost and the group re-sent"
            assert [[run.disposition for run in answer] for answer in created] == [["created"]] * 3  # type: ignore[attr-defined]
            assert [[run.id for run in answer] for answer in created] == [[run.id] for run in runs]  # type: ignore[attr-defined]
            assert sorted(run.id for run in await storage.get_runs(RunFilter())) == sorted(r.id for r in runs)
        finally:
            await storage.close()


async def test_writes_beyond_two_groups_in_flight_share_the_next_one(server: SqldServer) -> None:
    """sqld spun its CPU with dozens of requests waiting for its write lock (4 processes x 16)."""
    assert server.port is not None
    async with LatencyProxy(server.port, 0.2) as slow:
        remote = RemoteDriver(slow.url)
        try:
            await remote.write([("CREATE TABLE t (x INTEGER PRIMARY KEY)", ())])
            slow.counts.figures.clear()
            writes = []
            for x in range(1, 7):  # each in its own pass of the loop, all within one round trip
                writes.append(asyncio.ensure_future(remote.write([(f"INSERT INTO t VALUES ({x})", ())])))
                await asyncio.sleep(0)
                await asyncio.sleep(0)
            with anyio.fail_after(20):
                assert await asyncio.gather(*writes) == [[[]]] * 6
            # Two groups in flight; the four writes made meanwhile waited and committed together.
            assert slow.counts.figures["transactions"] == 3
            assert [int(row[0]) for row in await remote.read("SELECT x FROM t ORDER BY x")] == [
                1,
                2,
                3,
                4,
                5,
                6,
            ]  # type: ignore[arg-type]
        finally:
            await remote.close()
