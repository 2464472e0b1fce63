"""The remote driver under faults, against a real sqld (SPEC §15; issue 7 items 4, 6, 8).

A busy database, a connection dropped after the server did the work, a blackholed
server, garbled and half answers, and URLs, tokens or timeouts that cannot work.
"""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from durably import ConfigurationError, StorageError, create_durably, open_storage
from durably._ids import new_run_id
from durably._models import NewRun
from durably._storage._protocol import Lease, RunFilter, Telemetry
from durably.adapters._remote import RemoteDriver

from .jobs import stored_echo as echo
from .support.proxy import TcpProxy
from .support.sqld import SqldServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def _http(status: str, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\nContent-Length: {size}\r\n\r\n".encode() + body


_CLOSE = b'{"type":"ok","response":{"type":"close"}}'


def _execute(rows: bytes) -> bytes:
    result = b'{"type":"ok","response":{"type":"execute","result":{"cols":[],"rows":' + rows + b"}}}"
    return b'{"baton":null,"results":[' + result + b"," + _CLOSE + b"]}"


GARBLED = {
    "not-json": _http("200 OK", b"<html>proxy error</html>"),
    "missing-keys": _http("200 OK", b'{"baton":null}'),
    "too-few-results": _http("200 OK", b'{"baton":null,"results":[' + _CLOSE + b"]}"),
    "unknown-value-type": _http("200 OK", _execute(b'[[{"type":"decimal","value":"1.0"}]]')),
    "garbled-integer": _http("200 OK", _execute(b'[[{"type":"integer","value":"one"}]]')),
    "batch-for-execute": _http(
        "200 OK",
        b'{"baton":null,"results":[{"type":"ok","response":{"type":"batch","result":'
        b'{"step_results":[],"step_errors":[]}}},' + _CLOSE + b"]}",
    ),
    "half-a-body": _http("200 OK", _execute(b"[]")[:20], length=len(_execute(b"[]"))),
    "not-http": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
    "nothing": b"",
}


# --- the disconnect retry: a re-sent write that had landed --------------------------------


@pytest.mark.parametrize("kind", ["plain", "labelled", "idempotency-key", "batch"])
async def test_a_trigger_resent_after_a_lost_answer_returns_the_run_written_once(
    server: SqldServer, proxy: TcpProxy, kind: str
) -> None:
    async with create_durably(proxy.url) as durably, create_durably(server.http_url) as observer:
        durably.register(echo=echo)
        observer.register(echo=echo)
        proxy.reset_counters()
        proxy.lose_answers(1)  # the server stores the run; the client sees the connection close
        with anyio.fail_after(20):
            if kind == "batch":
                runs = await durably.jobs.echo.batch_trigger([{"n": 1}, {"n": 2}], labels={"team": "a"})
            else:
                options: dict[str, Any] = {
                    "plain": {},
                    "labelled": {"labels": {"team": "a"}},
                    "idempotency-key": {"idempotency_key": "k1"},
                }[kind]
                runs = [await durably.jobs.echo.trigger({"n": 1}, **options)]
        assert proxy.http_requests >= 2, "the answer was not lost and the request re-sent"
        assert [run.disposition for run in runs] == ["created"] * len(runs)
        stored = await observer.get_runs()
        assert sorted(run.id for run in stored) == sorted(run.id for run in runs)
        if kind in ("labelled", "batch"):
            labelled = await observer.storage.get_runs(RunFilter(labels={"team": "a"}))
            assert len(labelled) == len(runs)


@pytest.mark.parametrize("ending", ["complete", "fail", "release"])
async def test_a_lease_ending_write_resent_after_a_lost_answer_is_not_a_lost_lease(
    server: SqldServer, proxy: TcpProxy, ending: str
) -> None:
    storage = open_storage(proxy.url)
    try:
        await storage.migrate()
        [run] = await storage.create_runs([_new_run()])
        claim = await storage.claim_runs(worker_id="w1", job_names=["echo"], limit=1, lease_seconds=30)
        [claimed] = claim.runs
        lease = Lease(claimed.run.id, claimed.lease_generation)
        proxy.lose_answers(1)
        with anyio.fail_after(20):
            if ending == "complete":
                held = await storage.complete_run(lease, b'{"n": 1}', Telemetry())
            elif ending == "fail":
                held = await storage.fail_run(lease, "boom", Telemetry())
            else:
                held = await storage.release_lease(lease, Telemetry())
        assert held, "a write that ended its own lease was read as a lost lease"
        done = await storage.get_run(run.id)
        assert done is not None
        assert done.status == {"complete": "completed", "fail": "failed", "release": "pending"}[ending]
        # A lease really lost (another generation now holds the run) is still told apart.
        if ending == "release":
            claim = await storage.claim_runs(worker_id="w2", job_names=["echo"], limit=1, lease_seconds=30)
            [again] = claim.runs
            assert again.lease_generation == lease.generation + 1
            assert not await storage.release_lease(lease, Telemetry())
    finally:
        await storage.close()


# --- "database is locked" -------------------------------------------------------------------


async def test_a_write_waits_out_database_is_locked_and_lands_once(
    server: SqldServer, proxy: TcpProxy
) -> None:
    """A writer outside sqld holding the file's write lock makes sqld answer SQLITE_BUSY at once."""
    async with create_durably(proxy.url) as durably:
        durably.register(echo=echo)
        assert server.data_dir is not None
        [data] = [path for path in server.data_dir.rglob("dbs/default/data") if path.is_file()]
        outside = sqlite3.connect(data, isolation_level=None, check_same_thread=False)
        try:
            outside.execute("BEGIN IMMEDIATE")
            threading.Timer(0.5, outside.execute, ("COMMIT",)).start()
            proxy.reset_counters()
            with anyio.fail_after(20):
                run = await durably.jobs.echo.trigger({"n": 1})
        finally:
            await anyio.sleep(0.6)
            outside.close()
        assert proxy.http_requests > 1, "sqld never answered 'database is locked'"
        assert [stored.id for stored in await durably.get_runs()] == [run.id]


# --- timeouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "kept-alive-connection"])
async def test_a_blackholed_server_is_a_transient_error_within_the_timeout(
    proxy: TcpProxy, warm: bool
) -> None:
    storage = open_storage(proxy.url, timeout=0.5)
    try:
        if warm:
            await storage.migrate()
        proxy.drop()
        with anyio.fail_after(5), pytest.raises(StorageError) as caught:  # bound: 10x the timeout
            await storage.get_runs(RunFilter())
        assert caught.value.transient
        assert proxy.url in str(caught.value)
        if warm:
            assert "within 0.5 s" in str(caught.value)
        proxy.heal()
        with anyio.fail_after(10):
            await storage.migrate()
            assert await storage.get_runs(RunFilter()) == []
    finally:
        await storage.close()


def test_the_default_timeout_is_under_the_default_lease() -> None:
    from durably.adapters._remote import DEFAULT_TIMEOUT

    assert DEFAULT_TIMEOUT < 3.0


# --- garbled answers ------------------------------------------------------------------------


@pytest.mark.parametrize("answer", list(GARBLED.values()), ids=list(GARBLED))
async def test_a_garbled_answer_fails_every_waiting_caller_as_transient(
    server: SqldServer, proxy: TcpProxy, answer: bytes
) -> None:
    storage = open_storage(proxy.url)
    try:
        await storage.migrate()
        proxy.answer_with(answer)
        with anyio.fail_after(10):
            # Three reads in one pass of the loop travel in one pipeline: all must be answered.
            outcomes = await asyncio.gather(
                storage.get_run("a"),
                storage.get_run("b"),
                storage.get_runs(RunFilter()),
                return_exceptions=True,
            )
        for outcome in outcomes:
            assert isinstance(outcome, StorageError), outcome
            assert outcome.transient
            assert proxy.url in str(outcome)
        proxy.heal()
        with anyio.fail_after(10):
            assert await storage.get_run("a") is None  # the same storage goes on working
    finally:
        await storage.close()


def _batch(step_results: bytes, step_errors: bytes) -> bytes:
    result = b'{"step_results":' + step_results + b',"step_errors":' + step_errors + b"}"
    batch = b'{"type":"ok","response":{"type":"batch","result":' + result + b"}}"
    return _http("200 OK", b'{"baton":null,"results":[' + batch + b"," + _CLOSE + b"]}")


_EMPTY = b'{"cols":[],"rows":[]}'


@pytest.mark.parametrize(
    "answer",
    [
        _batch(b"[" + _EMPTY + b"]", b"[null]"),  # fewer steps than sent
        _batch(b"[" + b",".join([_EMPTY, b"null", _EMPTY, b"null"]) + b"]", b"[null,null,null,null]"),
        _batch(b"[]", b"[]"),
    ],
    ids=["too-few-steps", "a-step-without-result", "no-steps"],
)
async def test_a_garbled_answer_to_a_write_is_transient(proxy: TcpProxy, answer: bytes) -> None:
    storage = open_storage(proxy.url)
    try:
        await storage.migrate()
        proxy.answer_with(answer)
        with anyio.fail_after(10), pytest.raises(StorageError, match="garbled answer") as caught:
            await storage.create_runs([_new_run()])
        assert caught.value.transient
    finally:
        await storage.close()


def _new_run() -> NewRun:
    return NewRun(
        id=new_run_id(), job_name="echo", input=b"{}", labels={}, idempotency_key=None, concurrency_key=None
    )


# --- configuration that cannot work ------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("http://127.0.0.1:99999", {}),
        ("ws://[::1", {}),
        ("http://127.0.0.1:8080", {"auth_token": "eyJhbGciOi.abc\n"}),
        ("http://127.0.0.1:8080?authToken=eyJ%0Aabc", {}),
        ("http://127.0.0.1:8080", {"timeout": 0}),
        ("http://127.0.0.1:8080", {"timeout": -1.0}),
        ("http://127.0.0.1:8080", {"timeout": float("nan")}),
        ("http://127.0.0.1:8080", {"timeout": "2"}),
    ],
)
def test_a_url_token_or_timeout_that_cannot_work_is_a_configuration_error(
    url: str, options: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(ConfigurationError) as remote:
        open_storage(url, **options)
    with pytest.raises(ConfigurationError) as replica:
        open_storage(f"file:{tmp_path / 'replica.db'}", sync_url=url, **options)
    for error in (remote.value, replica.value):
        assert "eyJ" not in str(error), "the token was shown"


async def test_a_refused_async_with_leaves_no_session_open() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    async def refused() -> None:
        with pytest.raises(StorageError):
            async with create_durably(url):
                pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await refused()
        gc.collect()
    left_open = [o for o in gc.get_objects() if isinstance(o, aiohttp.ClientSession) and not o.closed]
    assert left_open == [], "a session stays open: aiohttp warns 'Unclosed client session' when it goes"
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []


async def test_a_driver_timeout_reaches_the_wire(proxy: TcpProxy) -> None:
    driver = RemoteDriver(proxy.url, timeout=0.3)
    try:
        proxy.drop()
        with anyio.fail_after(5), pytest.raises(StorageError, match=r"within 0\.3 s"):
            await driver.write([("SELECT 1", ())])
    finally:
        proxy.heal()
        await driver.close()
