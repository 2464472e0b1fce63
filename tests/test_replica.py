"""The embedded replica's failure paths against a real sqld (SPEC §15; issue 7 item 5, issue 9).

libsql holds the GIL while it syncs, so the proxy in front of sqld runs in a child
process here: an in-process proxy thread could not forward the sync it waits on.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from durably import ConfigurationError, StorageError, open_storage
from durably._ids import new_run_id
from durably._models import NewRun
from durably._storage._protocol import RunFilter
from durably.adapters._remote import RemoteDriver

from .support.proxy import ProxyProcess
from .support.sqld import SqldServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"
_SYNC = "/wal_log."  # libsql's replication requests; Hrana is /v2/pipeline


@pytest.fixture
def proxy(server: SqldServer) -> Iterator[ProxyProcess]:
    assert server.port is not None
    with ProxyProcess("127.0.0.1", server.port) as front:
        yield front


def _new_run() -> NewRun:
    return NewRun(
        id=new_run_id(), job_name="echo", input=b"{}", labels={}, idempotency_key=None, concurrency_key=None
    )


def _replica_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "durably-replica"]


@pytest.mark.allow_blocking  # a failing libsql sync holds the GIL ~3 s
async def test_reads_after_own_writes_go_to_the_primary_while_sync_fails(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    # A generous timeout: a failing sync stalls the whole process (the GIL) for ~3 s.
    storage = open_storage(
        f"file:{tmp_path / 'replica.db'}", sync_url=proxy.url, sync_interval=0.2, timeout=15
    )
    try:
        with anyio.fail_after(60):
            await storage.migrate()
            [first] = await storage.create_runs([_new_run()])
            assert await storage.get_run(first.id) is not None  # synced: read locally

            proxy.call("answer_with", _UNAVAILABLE, paths=_SYNC)  # sync fails, writes still land
            [second] = await storage.create_runs([_new_run()])
            seen = await storage.get_run(second.id)
            assert seen is not None, "a read after this process's own write returned stale data"
            claim = await storage.claim_runs(worker_id="w", job_names=["echo"], limit=1, lease_seconds=30)
            [claimed] = claim.runs
            again = await storage.get_run(claimed.run.id)
            assert again is not None
            assert again.status == "leased"

            # Once a sync succeeds, reads are local again: they go on with the primary's API down.
            proxy.call("heal")
            proxy.call("answer_with", _UNAVAILABLE, paths="/v2/")
            while True:
                try:
                    runs = await storage.get_runs(RunFilter())
                    break
                except StorageError:
                    await anyio.sleep(0.2)
            assert {run.id for run in runs} == {first.id, second.id}
    finally:
        proxy.call("heal")
        await storage.close()


@pytest.mark.allow_blocking
async def test_an_exception_on_the_replica_thread_is_a_storage_error_and_the_thread_lives(
    server: SqldServer, tmp_path: Path
) -> None:
    storage = open_storage(f"file:{tmp_path / 'replica.db'}", sync_url=server.http_url)
    primary = RemoteDriver(server.http_url)
    try:
        with anyio.fail_after(30):
            await storage.migrate()
            bad, good = await storage.create_runs([_new_run(), _new_run()])
            # Invalid UTF-8 as TEXT: libsql 0.1.8 panics reading it (pyo3's PanicException,
            # a BaseException, not the ValueError it raises otherwise).
            await primary.write(
                [("UPDATE durably_runs SET error = CAST(x'ff' AS TEXT) WHERE id = ?", (bad.id,))]
            )
            await storage.create_runs([_new_run()])  # a write of ours: the next read syncs
            with pytest.raises(StorageError, match="PanicException"):
                await storage.get_run(bad.id)
            still = await storage.get_run(good.id)
            assert still is not None
            assert still.id == good.id
    finally:
        await primary.close()
        await storage.close()


async def test_closing_stops_the_replica_thread_and_a_later_use_reopens_it(
    server: SqldServer, tmp_path: Path
) -> None:
    before = len(_replica_threads())
    storage = open_storage(f"file:{tmp_path / 'replica.db'}", sync_url=server.http_url)
    with anyio.fail_after(30):
        await storage.migrate()
        [run] = await storage.create_runs([_new_run()])
        assert await storage.get_run(run.id) is not None
        assert len(_replica_threads()) == before + 1
        await storage.close()
        assert len(_replica_threads()) == before
        assert await storage.get_run(run.id) is not None  # opened again
        await storage.close()
    assert len(_replica_threads()) == before


def test_a_replica_without_the_extra_names_the_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "libsql", None)  # as if durably[replica] was not installed
    with pytest.raises(ConfigurationError, match=r"pip install 'durably\[replica\]'"):
        open_storage(f"file:{tmp_path / 'replica.db'}", sync_url="http://127.0.0.1:8080")
    open_storage("http://127.0.0.1:8080")  # remote and local need no libsql
    open_storage(f"file:{tmp_path / 'local.db'}")
