"""The ``Storage`` contract, tested against every adapter through the ``storage`` fixture."""

from __future__ import annotations

import difflib
import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from durably import ConflictError, NotFoundError, StorageError, open_storage
from durably._models import ClaimedRun, LogEntry, NewRun, Progress, Run
from durably._storage._driver import Row
from durably._storage._protocol import Lease, RunFilter, StepRecord, Storage, Telemetry
from durably._storage._schema import LATEST_VERSION
from durably._storage._sql import SqlStorage
from tests.support.runs import new_run

pytestmark = pytest.mark.anyio

SNAPSHOT = Path(__file__).parent / "snapshots" / "schema.sql"
WORKER = "worker-1"


def _new(
    job: str = "job-a",
    *,
    idempotency_key: str | None = None,
    concurrency_key: str | None = None,
    labels: dict[str, str] | None = None,
    payload: bytes = b'{"n":1}',
) -> NewRun:
    return new_run(
        job,
        input=payload,
        labels=labels or {},
        idempotency_key=idempotency_key,
        concurrency_key=concurrency_key,
    )


async def _create(storage: Storage, *runs: NewRun) -> list[Run]:
    return await storage.create_runs(list(runs))


async def _claim(
    storage: Storage,
    *,
    jobs: tuple[str, ...] = ("job-a", "job-b"),
    limit: int = 10,
    lease_seconds: float = 30.0,
    worker_id: str = WORKER,
) -> list[ClaimedRun]:
    claim = await storage.claim_runs(
        worker_id=worker_id, job_names=list(jobs), limit=limit, lease_seconds=lease_seconds
    )
    return claim.runs


async def _get(storage: Storage, run_id: str) -> Run:
    run = await storage.get_run(run_id)
    assert run is not None
    return run


def _step(name: str, index: int, output: bytes | None = b'"ok"', error: str | None = None) -> StepRecord:
    now = datetime.now(UTC).timestamp()
    return StepRecord(name=name, index=index, output=output, error=error, started_at=now, completed_at=now)


def _log(message: str) -> LogEntry:
    return LogEntry(level="info", message=message, data={"k": 1}, created_at=datetime.now(UTC))


async def _expired_and_reclaimed(storage: Storage, run: Run) -> tuple[Lease, Lease]:
    """Claim ``run`` with a tiny lease, let it expire, reclaim it: (old lease, new lease)."""
    [old] = await _claim(storage, lease_seconds=0.05)
    assert old.run.id == run.id
    await anyio.sleep(0.15)
    [new] = await _claim(storage, worker_id="worker-2")
    assert new.run.id == run.id
    return Lease(run.id, old.lease_generation), Lease(run.id, new.lease_generation)


async def _sql(storage: Storage, sql: str) -> list[Row]:
    # Raw SQL through the adapter's own driver, so this works for every adapter.
    assert isinstance(storage, SqlStorage)
    [rows] = await storage._driver.write([(sql, ())])
    return rows


# --- create_runs ------------------------------------------------------------------------


async def test_create_runs_writes_pending_runs_in_the_order_given(storage: Storage) -> None:
    news = [_new(payload=f'{{"n":{i}}}'.encode(), labels={"i": str(i)}) for i in range(3)]
    runs = await storage.create_runs(news)
    assert [r.id for r in runs] == [n.id for n in news]
    for i, run in enumerate(runs):
        assert run.status == "pending"
        assert run.disposition == "created"
        assert run.input == {"n": i}
        assert run.labels == {"i": str(i)}
        assert run.attempt == 1
        assert run.created_at.tzinfo is not None
        assert run.started_at is None
        assert run.completed_at is None
    stored = await storage.get_runs(RunFilter())
    assert [r.id for r in stored] == [n.id for n in reversed(news)]  # newest first
    assert all(r.disposition is None for r in stored)


async def test_create_runs_is_idempotent_per_job_and_key(storage: Storage) -> None:
    [original] = await _create(storage, _new(idempotency_key="k1", payload=b'{"v":"first"}'))
    again = _new(idempotency_key="k1", payload=b'{"v":"second"}')
    other_job = _new("job-b", idempotency_key="k1")
    fresh = _new(idempotency_key="k2")
    runs = await _create(storage, again, other_job, fresh)

    assert [r.disposition for r in runs] == ["idempotent", "created", "created"]
    assert runs[0].id == original.id
    assert runs[0].input == {"v": "first"}
    assert (runs[1].id, runs[2].id) == (other_job.id, fresh.id)
    assert await storage.get_run(again.id) is None
    assert len(await storage.get_runs(RunFilter())) == 3


async def test_one_idempotency_key_twice_in_one_batch_writes_one_run(storage: Storage) -> None:
    first, second = _new(idempotency_key="same"), _new(idempotency_key="same")
    runs = await _create(storage, first, second)
    assert [(r.id, r.disposition) for r in runs] == [(first.id, "created"), (first.id, "idempotent")]
    assert len(await storage.get_runs(RunFilter())) == 1


async def test_get_runs_filters_by_status_job_and_all_labels(storage: Storage) -> None:
    a = _new(labels={"env": "prod", "team": "x"})
    b = _new(labels={"env": "prod"})
    c = _new("job-b", labels={"env": "dev", "team": "x"})
    await _create(storage, a, b, c)
    await _claim(storage, jobs=("job-b",))

    def ids(runs: list[Run]) -> list[str]:
        return [r.id for r in runs]

    assert ids(await storage.get_runs(RunFilter(labels={"env": "prod"}))) == [b.id, a.id]
    assert ids(await storage.get_runs(RunFilter(labels={"env": "prod", "team": "x"}))) == [a.id]
    assert ids(await storage.get_runs(RunFilter(statuses=("leased",)))) == [c.id]
    assert ids(await storage.get_runs(RunFilter(job_names=("job-a",), limit=1, offset=1))) == [a.id]


# --- claim_runs ---------------------------------------------------------------------------


async def test_claim_runs_takes_the_oldest_first_up_to_the_limit(storage: Storage) -> None:
    news = [_new() for _ in range(3)]
    await storage.create_runs(news)

    claimed = await _claim(storage, limit=2)
    assert [c.run.id for c in claimed] == [news[0].id, news[1].id]
    for c in claimed:
        assert c.run.status == "leased"
        assert c.lease_generation == 1
        assert c.steps == {}
        assert c.run.started_at is not None
    assert [c.run.id for c in await _claim(storage, limit=2)] == [news[2].id]
    assert await _claim(storage) == []


async def test_claim_runs_only_takes_the_given_jobs(storage: Storage) -> None:
    a, b = _new("job-a"), _new("job-b")
    await _create(storage, a, b)
    assert [c.run.id for c in await _claim(storage, jobs=("job-b",))] == [b.id]
    assert await _claim(storage, jobs=("job-b", "job-c")) == []
    assert await _claim(storage, jobs=()) == []
    assert [c.run.id for c in await _claim(storage, jobs=("job-a",))] == [a.id]


async def test_a_live_lease_is_not_claimable(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    [claimed] = await _claim(storage, lease_seconds=30)
    assert claimed.run.id == run.id
    assert await _claim(storage, worker_id="worker-2") == []


async def test_an_expired_lease_is_claimable_again_with_a_higher_generation(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    old, new = await _expired_and_reclaimed(storage, run)
    assert (old.generation, new.generation) == (1, 2)
    assert (await _get(storage, run.id)).status == "leased"


async def test_claim_returns_the_completed_steps_of_a_resumed_run(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    [claimed] = await _claim(storage)
    lease = Lease(run.id, claimed.lease_generation)
    assert await storage.save_step(lease, _step("a", 0, b'{"x":[1,2]}'), Telemetry())
    assert await storage.save_step(lease, _step("b", 1, b"null"), Telemetry())
    assert await storage.save_step(lease, _step("c", 2, None, "RuntimeError: no"), Telemetry())
    assert await storage.release_lease(lease, Telemetry())

    [again] = await _claim(storage)
    assert again.lease_generation == 2
    assert again.steps == {"a": (0, b'{"x":[1,2]}'), "b": (1, b"null")}


async def test_a_concurrency_key_admits_one_leased_run_and_the_oldest_pending_one(storage: Storage) -> None:
    k1, k2, free, k1_later = (
        _new(concurrency_key="k"),
        _new(concurrency_key="k"),
        _new(),
        _new(concurrency_key="other"),
    )
    await _create(storage, k1, k2, free, k1_later)

    # One claim: only the oldest pending run per key (k2 waits behind k1).
    claimed = await _claim(storage)
    assert [c.run.id for c in claimed] == [k1.id, free.id, k1_later.id]
    # k1 is leased: k2 is not claimable, by anyone.
    assert await _claim(storage, worker_id="worker-2") == []

    lease = Lease(k1.id, claimed[0].lease_generation)
    assert await storage.complete_run(lease, b"1", Telemetry())
    assert [c.run.id for c in await _claim(storage)] == [k2.id]


async def test_an_expired_lease_on_a_keyed_run_is_reclaimed_before_later_runs_of_the_key(
    storage: Storage,
) -> None:
    first, second = _new(concurrency_key="k"), _new(concurrency_key="k")
    await _create(storage, first, second)
    assert [c.run.id for c in await _claim(storage, lease_seconds=0.05)] == [first.id]
    await anyio.sleep(0.15)
    assert [c.run.id for c in await _claim(storage, worker_id="worker-2")] == [first.id]


async def test_a_pending_run_behind_a_keyed_run_waits_even_when_limit_is_one(storage: Storage) -> None:
    first, second = _new(concurrency_key="k"), _new(concurrency_key="k")
    await _create(storage, first, second)
    assert [c.run.id for c in await _claim(storage, limit=1)] == [first.id]
    assert await _claim(storage, limit=1) == []


# --- fencing -------------------------------------------------------------------------


async def test_writes_with_an_old_generation_are_refused_and_change_nothing(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    old, new = await _expired_and_reclaimed(storage, run)
    telemetry = Telemetry(progress=Progress(5, 10, "stale"), logs=[_log("stale")])

    assert await storage.save_step(old, _step("s", 0), telemetry) is False
    assert await storage.save_telemetry(old, telemetry) is False
    assert await storage.save_telemetry(old, Telemetry(logs=[_log("stale")])) is False
    assert await storage.complete_run(old, b'"stale"', telemetry) is False
    assert await storage.fail_run(old, "RuntimeError: stale", telemetry) is False
    assert await storage.release_lease(old, telemetry) is False
    assert await storage.renew_leases([old], lease_seconds=30) == set()

    stored = await _get(storage, run.id)
    assert (stored.status, stored.output, stored.error, stored.progress) == ("leased", None, None, None)
    assert await storage.get_steps(run.id) == []
    assert await storage.get_logs(run.id) == []
    # The current holder is untouched: its lease is held and its writes land.
    assert await storage.renew_leases([new], lease_seconds=30) == {run.id}
    assert await storage.save_step(new, _step("s", 0), Telemetry(progress=Progress(1), logs=[_log("new")]))
    assert [s.name for s in await storage.get_steps(run.id)] == ["s"]
    assert [e.message for e in await storage.get_logs(run.id)] == ["new"]
    assert (await _get(storage, run.id)).progress == Progress(1)


async def test_held_writes_store_steps_telemetry_and_the_outcome(storage: Storage) -> None:
    [ok, bad] = await _create(storage, _new(), _new())
    leases = {c.run.id: Lease(c.run.id, c.lease_generation) for c in await _claim(storage)}

    assert await storage.save_step(leases[ok.id], _step("s", 0, b"[1]"), Telemetry())
    assert await storage.save_telemetry(leases[ok.id], Telemetry(progress=Progress(1, 2, "half")))
    assert await storage.save_telemetry(leases[ok.id], Telemetry(logs=[_log("one"), _log("two")]))
    assert await storage.complete_run(leases[ok.id], b'{"done":true}', Telemetry(logs=[_log("last")]))
    assert await storage.fail_run(leases[bad.id], "ValueError: bad", Telemetry(progress=Progress(9)))

    done = await _get(storage, ok.id)
    assert (done.status, done.output, done.progress) == ("completed", {"done": True}, Progress(1, 2, "half"))
    assert done.completed_at is not None
    assert [(s.name, s.index, s.status, s.output) for s in await storage.get_steps(ok.id)] == [
        ("s", 0, "completed", [1])
    ]
    assert [(e.message, e.data) for e in await storage.get_logs(ok.id)] == [
        ("one", {"k": 1}),
        ("two", {"k": 1}),
        ("last", {"k": 1}),
    ]
    failed = await _get(storage, bad.id)
    assert (failed.status, failed.error, failed.progress) == ("failed", "ValueError: bad", Progress(9))
    # A finished run's lease is no longer held.
    assert await storage.renew_leases(list(leases.values()), lease_seconds=30) == set()
    assert await storage.save_step(leases[ok.id], _step("late", 1), Telemetry()) is False


async def test_renew_leases_returns_only_the_leases_still_held(storage: Storage) -> None:
    a, b, c = _new(), _new(), _new()
    await _create(storage, a, b, c)
    claimed = {x.run.id: Lease(x.run.id, x.lease_generation) for x in await _claim(storage)}
    assert await storage.complete_run(claimed[c.id], b"null", Telemetry())

    held = await storage.renew_leases(
        [claimed[a.id], Lease(b.id, 99), claimed[c.id], Lease("no-such-run", 1)], lease_seconds=30
    )
    assert held == {a.id}
    assert await storage.renew_leases([], lease_seconds=30) == set()


async def test_renewing_a_lease_keeps_it_from_expiring(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    [claimed] = await _claim(storage, lease_seconds=0.3)
    assert await storage.renew_leases([Lease(run.id, claimed.lease_generation)], lease_seconds=30) == {run.id}
    await anyio.sleep(0.45)
    assert await _claim(storage, worker_id="worker-2") == []


async def test_release_lease_puts_the_run_back_to_pending_for_anyone(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    [claimed] = await _claim(storage, lease_seconds=30)
    lease = Lease(run.id, claimed.lease_generation)
    assert await storage.release_lease(lease, Telemetry(progress=Progress(3)))
    released = await _get(storage, run.id)
    assert (released.status, released.progress) == ("pending", Progress(3))
    assert await storage.renew_leases([lease], lease_seconds=30) == set()
    [again] = await _claim(storage, worker_id="worker-2")
    assert (again.run.id, again.lease_generation) == (run.id, 2)


# --- cancel / retry / delete / purge ---------------------------------------------------


async def test_cancel_run(storage: Storage) -> None:
    pending, leased, completed = _new(), _new("job-b"), _new("job-b")
    await _create(storage, pending, leased, completed)
    claims = {c.run.id: Lease(c.run.id, c.lease_generation) for c in await _claim(storage, jobs=("job-b",))}
    assert await storage.complete_run(claims[completed.id], b"1", Telemetry())

    run, changed = await storage.cancel_run(pending.id)
    assert (run.status, changed) == ("cancelled", True)
    assert run.completed_at is not None
    run, changed = await storage.cancel_run(pending.id)
    assert (run.status, changed) == ("cancelled", False)

    run, changed = await storage.cancel_run(leased.id)
    assert (run.status, changed) == ("cancelled", True)
    # The worker that held it can no longer write.
    assert await storage.renew_leases([claims[leased.id]], lease_seconds=30) == set()
    assert await storage.save_step(claims[leased.id], _step("s", 0), Telemetry()) is False
    assert await storage.complete_run(claims[leased.id], b"1", Telemetry()) is False
    assert (await _get(storage, leased.id)).status == "cancelled"
    assert await _claim(storage) == []

    with pytest.raises(ConflictError):
        await storage.cancel_run(completed.id)
    with pytest.raises(NotFoundError):
        await storage.cancel_run("no-such-run")


async def test_retry_run_keeps_completed_steps_and_counts_attempts(storage: Storage) -> None:
    failed, cancelled, completed, pending = _new(), _new("job-b"), _new("job-b"), _new("job-b")
    await _create(storage, failed, cancelled, completed)
    claims = {c.run.id: Lease(c.run.id, c.lease_generation) for c in await _claim(storage)}
    assert await storage.save_step(claims[failed.id], _step("a", 0, b'"kept"'), Telemetry())
    assert await storage.save_step(claims[failed.id], _step("b", 1, None, "E: x"), Telemetry())
    assert await storage.fail_run(claims[failed.id], "E: x", Telemetry())
    assert await storage.complete_run(claims[completed.id], b"1", Telemetry())
    await storage.cancel_run(cancelled.id)
    await _create(storage, pending)

    retried = await storage.retry_run(failed.id)
    assert (retried.status, retried.attempt, retried.error, retried.completed_at) == (
        "pending",
        2,
        None,
        None,
    )
    again = await storage.retry_run(cancelled.id)
    assert (again.status, again.attempt) == ("pending", 2)

    [claimed] = await _claim(storage, jobs=("job-a",))
    assert claimed.run.attempt == 2
    assert claimed.steps == {"a": (0, b'"kept"')}

    for run_id in (completed.id, pending.id, failed.id):  # completed, pending, leased
        with pytest.raises(ConflictError):
            await storage.retry_run(run_id)
    with pytest.raises(NotFoundError):
        await storage.retry_run("no-such-run")


async def test_delete_run_removes_an_ended_run_with_its_steps_logs_and_labels(storage: Storage) -> None:
    done, pending, leased = _new(labels={"l": "v"}), _new("job-b"), _new("job-c")
    await _create(storage, done, pending, leased)
    [claimed] = await _claim(storage, jobs=("job-a",))
    lease = Lease(done.id, claimed.lease_generation)
    assert await storage.save_step(lease, _step("s", 0), Telemetry(logs=[_log("m")]))
    assert await storage.complete_run(lease, b"1", Telemetry())
    await _claim(storage, jobs=("job-c",))

    deleted = await storage.delete_run(done.id)
    assert (deleted.id, deleted.job_name, deleted.labels) == (done.id, "job-a", {"l": "v"})
    assert await storage.get_run(done.id) is None
    assert await storage.get_runs(RunFilter(labels={"l": "v"})) == []
    with pytest.raises(NotFoundError):
        await storage.get_steps(done.id)
    with pytest.raises(NotFoundError):
        await storage.get_logs(done.id)
    with pytest.raises(NotFoundError):
        await storage.delete_run(done.id)

    for run_id, status in ((pending.id, "pending"), (leased.id, "leased")):
        with pytest.raises(ConflictError):
            await storage.delete_run(run_id)
        assert (await _get(storage, run_id)).status == status


async def test_purge_runs_deletes_only_terminal_runs_ended_before_the_cutoff(storage: Storage) -> None:
    runs = [_new() for _ in range(3)]
    await storage.create_runs(runs)
    pending = _new("job-b")
    claims = [Lease(c.run.id, c.lease_generation) for c in await _claim(storage, jobs=("job-a",))]
    assert await storage.complete_run(claims[0], b"1", Telemetry())
    assert await storage.fail_run(claims[1], "E: x", Telemetry())
    await storage.cancel_run(runs[2].id)
    await _create(storage, pending)

    past = datetime.now(UTC) - timedelta(hours=1)
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await storage.purge_runs(completed_before=past, limit=500) == 0
    assert await storage.purge_runs(completed_before=future, limit=2) == 2
    assert await storage.purge_runs(completed_before=future, limit=500) == 1
    assert await storage.purge_runs(completed_before=future, limit=500) == 0
    remaining = await storage.get_runs(RunFilter())
    assert [(r.id, r.status) for r in remaining] == [(pending.id, "pending")]


async def test_unknown_runs(storage: Storage) -> None:
    assert await storage.get_run("no-such-run") is None
    with pytest.raises(NotFoundError):
        await storage.get_steps("no-such-run")
    with pytest.raises(NotFoundError):
        await storage.get_logs("no-such-run")
    with pytest.raises(NotFoundError):
        await storage.delete_run("no-such-run")


# --- migrations -------------------------------------------------------------------------


async def test_migrate_twice_is_idempotent_and_keeps_data(storage: Storage) -> None:
    [run] = await _create(storage, _new())
    await storage.migrate()
    await storage.migrate()
    assert (await _get(storage, run.id)).status == "pending"
    rows = await _sql(storage, "SELECT version FROM durably_schema_versions ORDER BY version")
    assert [row[0] for row in rows] == list(range(1, LATEST_VERSION + 1))


async def test_a_database_from_a_newer_durably_refuses_to_migrate(storage: Storage, storage_url: str) -> None:
    newer = LATEST_VERSION + 41
    await _sql(storage, f"INSERT INTO durably_schema_versions (version, applied_at) VALUES ({newer}, 0)")
    with pytest.raises(StorageError, match=rf"\b{newer}\b"):
        await storage.migrate()
    other = open_storage(storage_url)
    try:
        with pytest.raises(StorageError, match=rf"\b{newer}\b"):
            await other.migrate()
    finally:
        await other.close()


def _schema_text(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name LIKE 'durably%' ORDER BY name"
        ).fetchall()
    finally:
        conn.close()
    return "\n".join(f"-- {kind} {name}\n{sql};\n" for kind, name, sql in rows)


async def test_a_fresh_migrate_matches_the_schema_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    store = open_storage(f"file:{path}")
    try:
        await store.migrate()
    finally:
        await store.close()
    actual = _schema_text(path)
    if os.environ.get("DURABLY_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(actual)
    expected = SNAPSHOT.read_text()
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=str(SNAPSHOT.relative_to(Path(__file__).parent.parent)),
                tofile="schema after migrate()",
            )
        )
        pytest.fail(
            "the migrated schema differs from the snapshot (a new migration must update it;"
            " regenerate with DURABLY_UPDATE_SNAPSHOTS=1):\n" + diff,
            pytrace=False,
        )


async def test_read_primary_answers_several_reads_in_order(storage: Storage) -> None:
    first, second = await _create(storage, _new(), _new())
    assert isinstance(storage, SqlStorage)
    rows = await storage._driver.read_primary(
        [
            ("SELECT id FROM durably_runs WHERE id = ?", (second.id,)),
            ("SELECT id FROM durably_runs WHERE id = ?", (first.id,)),
            ("SELECT id FROM durably_runs WHERE id = ?", ("missing",)),
        ]
    )
    assert rows == [[(second.id,)], [(first.id,)], []]
