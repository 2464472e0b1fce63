"""The remote adapters against real sqld processes (SPEC §1, §8; issue 3).

Authentication with a real Ed25519 key, URL forms, clear errors that never show the
token, trigger() during an outage, a worker that survives dropped connections and a
crashed server, and contending writers. Every server and proxy listens on 127.0.0.1.
"""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, suppress
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import to_thread

from durably import Durably, StepContext, StorageError, create_durably, define_job, open_storage
from durably._events import Event, RunStartEvent, WorkerErrorEvent
from durably._models import Step
from durably._storage._protocol import Storage
from durably.adapters import EmbeddedReplicaStorage, RemoteStorage

from .jobs import stored_echo as echo
from .support.proxy import TcpProxy
from .support.sqld import SqldServer, free_port, make_ed25519_auth

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

STALE = 1.0
HEARTBEAT = 0.2


# --- fixtures and helpers ------------------------------------------------------------


class AuthServer:
    """A sqld that accepts only JWTs signed with its Ed25519 key."""

    def __init__(
        self, server: SqldServer, sign: Callable[..., str], foreign_sign: Callable[..., str]
    ) -> None:
        self.server = server
        self.url = server.http_url
        self.token = sign()
        self.sign = sign
        self.foreign_token = foreign_sign()  # signed with another key


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[AuthServer]:
    key_file, sign = make_ed25519_auth(tmp_path / "key")
    _, foreign_sign = make_ed25519_auth(tmp_path / "other-key")
    with SqldServer(tmp_path / "sqld-auth", auth_jwt_key_file=key_file) as srv:
        yield AuthServer(srv, sign, foreign_sign)


@asynccontextmanager
async def _closing(storage: Storage) -> AsyncIterator[Storage]:
    try:
        yield storage
    finally:
        await storage.close()


@asynccontextmanager
async def _durably(storage: Storage | str, **options: Any) -> AsyncIterator[Durably]:
    options.setdefault("polling_interval", 0.02)
    options.setdefault("heartbeat_interval", HEARTBEAT)
    options.setdefault("stale_threshold", STALE)
    instance = create_durably(storage, **options)
    try:
        yield instance
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(15):
            await instance.close()


async def _round_trip(storage: Storage) -> str:
    """Migrate, trigger, execute and read back one run through ``storage``; its id."""
    async with _durably(storage) as durably:
        durably.register(echo=echo)
        run = await durably.jobs.echo.trigger({"n": 7})
        assert await durably.process_until_idle() == 1
        done = await durably.wait_for_run(run.id, timeout=10)
        assert done.status == "completed", done.error
        assert done.output == {"n": 7}
        return run.id


async def _storage_error(storage: Storage) -> StorageError:
    """The ``StorageError`` the first use of ``storage`` raises."""
    async with _closing(storage):
        with anyio.fail_after(30), pytest.raises(StorageError) as caught:
            await storage.migrate()
    return caught.value


def _assert_auth_failure(error: StorageError, url: str, token: str) -> None:
    message = str(error)
    assert "authentication failed" in message.lower(), message
    assert url in message, message
    assert token not in message, message
    assert not error.transient, "a rejected token fails again: not transient"


class Recorder:
    """Per (run, step) executions, and any execution of a step already stored as completed."""

    def __init__(self, observer: Storage) -> None:
        self._observer = observer
        self.executions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.reexecuted_completed: list[tuple[str, str]] = []

    async def _stored_steps(self, run_id: str) -> list[Step]:
        # Straight to the server (no proxy); the server may be down for a moment.
        with anyio.fail_after(30):
            while True:
                try:
                    return await self._observer.get_steps(run_id)
                except StorageError:
                    await anyio.sleep(0.05)

    async def work(self, run_id: str, name: str, pause: float) -> str:
        stored = await self._stored_steps(run_id)
        if any(s.name == name and s.status == "completed" for s in stored):
            self.reexecuted_completed.append((run_id, name))
        self.executions[run_id, name] += 1
        await anyio.sleep(pause)
        return name

    def job(self, name: str, steps: int, pause: float) -> Any:
        async def run(step: StepContext, payload: dict[str, Any]) -> Any:
            for index in range(steps):
                await step.run(f"s{index}", self.work, step.run_id, f"s{index}", pause)
            return payload["i"]

        return define_job(name=name, input=dict[str, Any], run=run)

    def total(self) -> int:
        return sum(self.executions.values())

    async def check(self, durably: Durably, run_ids: list[str], steps: int) -> None:
        """Every run completed; completed steps never ran again; reruns only for an interrupted step."""
        names = [f"s{index}" for index in range(steps)]
        for run_id in run_ids:
            run = await durably.get_run(run_id)
            assert run is not None
            assert run.status == "completed", (run_id, run.status, run.error)
            stored = await durably.get_steps(run_id)
            assert [(s.name, s.status, s.output) for s in stored] == [(n, "completed", n) for n in names]
            for name in names:
                assert self.executions[run_id, name] >= 1, (run_id, name)
            rerun = {
                name: self.executions[run_id, name] for name in names if self.executions[run_id, name] > 1
            }
            # One outage interrupts at most the one step each run had in flight.
            assert len(rerun) <= 1 and all(count == 2 for count in rerun.values()), (run_id, rerun)
        assert self.reexecuted_completed == [], "completed steps were executed again"


async def _wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


def _errors(durably: Durably, errors: list[WorkerErrorEvent] | None = None) -> list[WorkerErrorEvent]:
    """Collect ``durably``'s worker:error events (into ``errors`` when given)."""
    errors = [] if errors is None else errors

    def keep(event: Event) -> None:
        assert isinstance(event, WorkerErrorEvent)
        errors.append(event)

    durably.on("worker:error", keep)
    return errors


# --- authentication ----------------------------------------------------------------


async def test_a_token_signed_with_the_servers_ed25519_key_works_remotely(auth_server: AuthServer) -> None:
    storage = open_storage(auth_server.url, auth_token=auth_server.token)
    assert isinstance(storage, RemoteStorage)
    await _round_trip(storage)


async def test_a_token_signed_with_the_servers_key_works_for_an_embedded_replica(
    auth_server: AuthServer, tmp_path: Path
) -> None:
    storage = open_storage(
        f"file:{tmp_path / 'replica.db'}", sync_url=auth_server.url, auth_token=auth_server.token
    )
    assert isinstance(storage, EmbeddedReplicaStorage)
    run_id = await _round_trip(storage)
    # The replica file really was synced from the authenticated primary.
    async with _closing(open_storage(f"file:{tmp_path / 'replica.db'}")) as local:
        synced = await local.get_run(run_id)
        assert synced is not None
        assert synced.status == "completed"


@pytest.mark.parametrize("which", ["foreign-key", "garbage", "expired"])
async def test_a_wrong_token_fails_clearly_without_showing_the_token(
    auth_server: AuthServer, which: str
) -> None:
    token = {
        "foreign-key": auth_server.foreign_token,
        "garbage": "not-a-jwt-" + auth_server.token[-20:],
        "expired": auth_server.sign(exp=int(time.time()) - 3600),
    }[which]
    error = await _storage_error(open_storage(auth_server.url, auth_token=token))
    _assert_auth_failure(error, auth_server.url, token)


async def test_no_token_at_all_fails_as_authentication(auth_server: AuthServer) -> None:
    error = await _storage_error(open_storage(auth_server.url))
    message = str(error)
    assert "authentication failed" in message.lower(), message
    assert auth_server.url in message, message


async def test_a_wrong_token_on_an_embedded_replica_fails_clearly(
    auth_server: AuthServer, tmp_path: Path
) -> None:
    token = auth_server.foreign_token
    storage = open_storage(f"file:{tmp_path / 'replica.db'}", sync_url=auth_server.url, auth_token=token)
    error = await _storage_error(storage)
    _assert_auth_failure(error, auth_server.url, token)


async def test_a_token_in_the_url_is_used_and_never_shown(auth_server: AuthServer) -> None:
    good_url = f"{auth_server.url}?authToken={auth_server.token}"
    storage = open_storage(good_url)
    assert auth_server.token not in storage.url
    assert storage.url.startswith(auth_server.url)
    async with _durably(storage) as durably:
        assert auth_server.token not in repr(durably)
    await _round_trip(open_storage(good_url))

    bad = auth_server.foreign_token
    bad_url = f"{auth_server.url}?authToken={bad}"
    bad_storage = open_storage(bad_url)
    assert bad not in bad_storage.url
    error = await _storage_error(bad_storage)
    _assert_auth_failure(error, auth_server.url, bad)


async def test_a_token_in_a_ws_url_is_used_for_an_embedded_replica(
    auth_server: AuthServer, tmp_path: Path
) -> None:
    assert auth_server.server.port is not None
    sync_url = f"ws://127.0.0.1:{auth_server.server.port}?authToken={auth_server.token}"
    storage = open_storage(f"file:{tmp_path / 'replica.db'}", sync_url=sync_url)
    assert auth_server.token not in storage.url
    await _round_trip(storage)


# --- URL forms --------------------------------------------------------------------


async def test_a_ws_url_is_served_over_http_by_sqld(server: SqldServer, proxy: TcpProxy) -> None:
    storage = open_storage(f"ws://127.0.0.1:{proxy.port}")
    assert isinstance(storage, RemoteStorage)
    assert storage.url.startswith("ws://127.0.0.1:")
    await _round_trip(storage)
    assert proxy.http_requests > 0
    assert proxy.ws_upgrades == 0
    assert {path for _, path in proxy.request_log} == {"/v2/pipeline"}


@pytest.mark.parametrize("scheme", ["libsql", "wss", "https"])
async def test_libsql_and_wss_urls_speak_tls(proxy: TcpProxy, scheme: str) -> None:
    """``libsql://`` (Turso) and ``wss://`` mean TLS: against plain-HTTP sqld they fail cleanly."""
    token = "secret-token-for-tls-test"
    url = f"{scheme}://127.0.0.1:{proxy.port}?authToken={token}"
    storage = open_storage(url)
    assert isinstance(storage, RemoteStorage)
    assert token not in storage.url
    error = await _storage_error(storage)
    message = str(error)
    assert f"{scheme}://127.0.0.1:{proxy.port}" in message, message
    assert token not in message, message
    assert proxy.connections_accepted >= 1  # it did connect ...
    assert proxy.http_requests == 0  # ... but sent no plaintext HTTP: a TLS handshake


# --- clear errors --------------------------------------------------------------------


async def test_an_unreachable_server_is_a_transient_error_naming_the_url() -> None:
    port = free_port()  # nothing listens there
    token = "secret-token-unreachable"
    error = await _storage_error(open_storage(f"http://127.0.0.1:{port}?authToken={token}", auth_token=token))
    message = str(error)
    assert f"http://127.0.0.1:{port}" in message, message
    assert token not in message, message
    assert error.transient


async def test_an_http_error_from_the_server_names_the_url_without_the_token(server: SqldServer) -> None:
    token = "secret-token-404"
    url = f"{server.http_url}/no/such/endpoint"
    error = await _storage_error(open_storage(f"{url}?authToken={token}"))
    message = str(error)
    assert url in message, message
    assert "404" in message, message
    assert token not in message, message
    assert not error.transient


# --- trigger() during an outage ----------------------------------------------------------


async def test_trigger_while_the_server_is_down_raises_and_writes_nothing(server: SqldServer) -> None:
    async with _durably(server.http_url) as durably:
        durably.register(echo=echo)
        await durably.migrate()
        kept = await durably.jobs.echo.trigger({"n": 0})

        await to_thread.run_sync(server.stop)
        with anyio.fail_after(30):
            with pytest.raises(StorageError) as single:
                await durably.jobs.echo.trigger({"n": 1})
            with pytest.raises(StorageError) as batch:
                await durably.jobs.echo.batch_trigger([{"n": 2}, {"n": 3}, {"n": 4}])
        for error in (single.value, batch.value):
            assert server.http_url in str(error)
            assert error.transient

        await to_thread.run_sync(partial(server.restart, graceful=False))
        with anyio.fail_after(30):
            runs = await durably.get_runs()
        assert [run.id for run in runs] == [kept.id]  # nothing of the failed triggers
        # The same instance reconnects: the next trigger works at once.
        again = await durably.jobs.echo.trigger({"n": 5})
        assert {run.id for run in await durably.get_runs()} == {kept.id, again.id}


@pytest.mark.parametrize("cut_after", [0.1, 0.6], ids=["before-the-server-has-it", "before-the-answer"])
async def test_a_batch_trigger_cut_off_mid_request_is_all_or_nothing(
    server: SqldServer, proxy: TcpProxy, cut_after: float
) -> None:
    async with (
        _durably(proxy.url) as durably,
        _durably(server.http_url) as observer,
    ):
        durably.register(echo=echo)
        observer.register(echo=echo)
        await durably.migrate()
        proxy.delay(0.4)  # each chunk waits 0.4 s: the request, then the answer
        outcome: list[BaseException | None] = []

        async def trigger() -> None:
            try:
                await durably.jobs.echo.batch_trigger([{"n": n} for n in range(5)])
            except BaseException as exc:
                outcome.append(exc)
                raise
            outcome.append(None)

        with anyio.fail_after(30):
            async with anyio.create_task_group() as group:
                group.start_soon(_swallow_storage_error, trigger)
                await anyio.sleep(cut_after)
                proxy.reset()
                proxy.heal()
        assert len(outcome) == 1
        assert isinstance(outcome[0], StorageError), outcome
        written = await observer.get_runs()
        assert len(written) in (0, 5), f"half a batch was written: {len(written)} of 5 runs"


async def _swallow_storage_error(function: Callable[[], Any]) -> None:
    with suppress(StorageError):
        await function()


# --- a worker through faults ---------------------------------------------------------


async def test_a_worker_survives_connections_being_dropped_and_reset(
    server: SqldServer, proxy: TcpProxy
) -> None:
    steps = 4
    async with _closing(open_storage(server.http_url)) as direct:
        recorder = Recorder(direct)
        job = recorder.job("resilient", steps, pause=0.02)
        async with (
            _durably(server.http_url) as observer,
            _durably(proxy.url, max_concurrent_runs=4) as worker,
        ):
            observer.register(resilient=job)
            worker.register(resilient=job)
            errors = _errors(worker)
            await observer.migrate()
            runs = await observer.jobs.resilient.batch_trigger([{"i": i} for i in range(16)])
            await worker.init()
            await _wait_until(lambda: recorder.total() >= 12, 20)

            # The outage: nothing moves, and what hangs is reset, for about 1.5 s.
            proxy.drop()
            for _ in range(5):
                await anyio.sleep(0.3)
                proxy.reset()
            proxy.heal()

            for run in runs:
                done = await observer.wait_for_run(run.id, timeout=30)
                assert done.status == "completed", (run.id, done.error)
            # The worker goes on after the outage.
            later = await observer.jobs.resilient.trigger({"i": 99})
            done = await observer.wait_for_run(later.id, timeout=15)
            assert done.status == "completed", done.error

            assert errors, "the outage was not reported as worker:error"
            assert all(proxy.url in e.error or "Lease" in e.error for e in errors), [e.error for e in errors]
            await recorder.check(observer, [run.id for run in runs] + [later.id], steps)


async def test_a_worker_survives_the_server_being_killed_and_restarted(server: SqldServer) -> None:
    steps = 4
    async with _closing(open_storage(server.http_url)) as direct:
        recorder = Recorder(direct)
        job = recorder.job("crash", steps, pause=0.03)
        async with _durably(server.http_url, max_concurrent_runs=3) as durably:
            durably.register(crash=job)
            errors = _errors(durably)
            await durably.migrate()
            runs = await durably.jobs.crash.batch_trigger([{"i": i} for i in range(12)])
            durably.start()
            await _wait_until(lambda: recorder.total() >= 10, 20)

            await to_thread.run_sync(server.kill)  # SIGKILL
            await anyio.sleep(1.5)
            await to_thread.run_sync(partial(server.restart, graceful=False))

            with anyio.fail_after(40):
                for run in runs:
                    done = await durably.wait_for_run(run.id)
                    assert done.status == "completed", (run.id, done.error)
            assert errors, "the crash was not reported as worker:error"
            # Backing off: not one claim per polling interval (0.02 s) while the server was down.
            claim_errors = [e for e in errors if e.context == "claiming runs"]
            assert len(claim_errors) <= 25, f"{len(claim_errors)} failed claims in a 1.5 s outage"
            assert all(server.http_url in e.error for e in claim_errors)
            await recorder.check(durably, [run.id for run in runs], steps)


# --- contention ------------------------------------------------------------------------


async def test_four_contending_writers_never_see_database_is_locked(server: SqldServer) -> None:
    steps = 3
    runs_per_writer = 20
    async with _closing(open_storage(server.http_url)) as direct:
        recorder = Recorder(direct)
        job = recorder.job("contended", steps, pause=0)
        async with (
            _durably(server.http_url, polling_interval=0.01, max_concurrent_runs=4) as w0,
            _durably(server.http_url, polling_interval=0.01, max_concurrent_runs=4) as w1,
            _durably(server.http_url, polling_interval=0.01, max_concurrent_runs=4) as w2,
            _durably(server.http_url, polling_interval=0.01, max_concurrent_runs=4) as w3,
        ):
            writers = [w0, w1, w2, w3]
            errors: list[WorkerErrorEvent] = []
            starts: collections.Counter[str] = collections.Counter()

            def started(event: Event) -> None:
                assert isinstance(event, RunStartEvent)
                starts[event.run_id] += 1

            for writer in writers:
                writer.register(contended=job)
                _errors(writer, errors)
                writer.on("run:start", started)
            await w0.migrate()
            for writer in writers:
                await writer.init()

            triggered: list[str] = []

            async def trigger_many(writer: Durably, base: int) -> None:
                for i in range(runs_per_writer):
                    run = await writer.jobs.contended.trigger({"i": base + i})
                    triggered.append(run.id)

            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for n, writer in enumerate(writers):
                        group.start_soon(trigger_many, writer, n * 1000)
                for run_id in triggered:
                    done = await w0.wait_for_run(run_id)
                    assert done.status == "completed", (run_id, done.error)

            assert len(triggered) == 4 * runs_per_writer
            assert [e.error for e in errors] == [], "contention surfaced as worker errors"
            assert sorted(starts) == sorted(triggered)
            assert set(starts.values()) == {1}  # each run started once
            await recorder.check(w0, triggered, steps)
