"""``SqlStorage``: the Storage contract written once in SQL over a ``Driver``."""

from __future__ import annotations

import random
import secrets
import time
from collections.abc import Sequence
from datetime import datetime

import anyio

from durably import _codec
from durably._clock import to_datetime
from durably._models import ClaimedRun, LogEntry, NewRun, Progress, Run, Step
from durably._storage import _queries as q
from durably._storage import _run_api, _waits
from durably._storage._driver import Driver, Row, Statement, Value
from durably._storage._protocol import (
    Claim,
    Lease,
    LeaseOffer,
    RunChanges,
    RunFilter,
    StepRecord,
    Telemetry,
    WaitRequest,
    WaitResult,
)
from durably._storage._rows import (
    RUN_WIDTH,
    Resumed,
    as_float,
    as_int,
    as_json,
    as_text,
    as_time,
    claimed_run,
    run_from_row,
)
from durably._storage._schema import CREATE_VERSION_TABLE, LATEST_VERSION, MIGRATIONS
from durably.errors import NotFoundError, StorageError

# A run whose lease ended under a given generation, leaving it in a given status.
_ENDED_AS = "SELECT 1 FROM durably_runs WHERE id = ? AND lease_generation = ? AND status = ?"
_NOTHING = Telemetry()  # never changed: a write that carries no progress or logs
_MIGRATE_PATIENCE = 60.0  # seconds a migration waits for other writers before giving up


def _progress_json(progress: Progress | None) -> str | None:
    return None if progress is None else _codec.encode(progress).decode()


def _log_statements(lease: Lease, telemetry: Telemetry) -> list[Statement]:
    if not telemetry.logs:
        return []
    lines = [
        [
            log.step_name,
            log.level,
            log.message,
            log.data,
            log.created_at.timestamp() if log.created_at else None,
        ]
        for log in telemetry.logs
    ]
    return [(q.SAVE_LOGS, (lease.run_id, _codec.encode(lines).decode(), lease.run_id, lease.generation))]


def _step_statement(lease: Lease, step: StepRecord) -> Statement:
    return (
        q.SAVE_STEP,
        (
            lease.run_id,
            step.name,
            step.index,
            "failed" if step.error is not None else "completed",
            None if step.output is None else step.output.decode(),
            step.error,
            step.started_at,
            step.completed_at,
            step.attempts,
            lease.run_id,
            lease.generation,
        ),
    )


def _save_steps_statements(
    lease: Lease, steps: Sequence[StepRecord], telemetry: Telemetry
) -> list[Statement]:
    """The steps first (each guarded by the lease), then the progress and logs riding along."""
    statements = [_step_statement(lease, step) for step in steps]
    if telemetry.progress is not None:
        progress = _progress_json(telemetry.progress)
        statements.append((q.SAVE_PROGRESS, (progress, lease.run_id, lease.generation)))
    statements.extend(_log_statements(lease, telemetry))
    return statements


def _leased_to(row: Row, offer: LeaseOffer) -> bool:
    """Whether a row read back by a trigger (``q.CREATED_COLUMNS``) is leased to ``offer``."""
    status, generation, owner = row[2], row[RUN_WIDTH], row[RUN_WIDTH + 2]
    return as_text(status) == "leased" and as_int(generation) == 1 and as_text(owner) == offer.owner


def _claimed(runs: list[Row], resumed_rows: list[list[Row]]) -> list[ClaimedRun]:
    """The claimed runs in id order; resumed ones with their steps, log counts and attempts."""
    resumed = Resumed()
    if resumed_rows:
        steps, log_counts, attempts = resumed_rows
        resumed.add_steps(steps)
        resumed.add_log_counts(log_counts)
        resumed.add_step_attempts(attempts)
    claimed = [claimed_run(row, resumed) for row in runs]
    claimed.sort(key=lambda c: c.run.id)
    return claimed


def _held(rows: list[Row]) -> bool:
    return bool(rows)


class SqlStorage:
    """The ``Storage`` implementation for every SQLite-family database."""

    def __init__(self, driver: Driver) -> None:
        self._driver = driver

    @property
    def url(self) -> str:
        return self._driver.url

    async def migrate(self) -> None:
        """Bring the schema up to date; another process migrating or writing meanwhile (a
        locked database) is waited for, with backoff, for at most ``_MIGRATE_PATIENCE`` s."""

        async def apply() -> None:
            await self._driver.write([(CREATE_VERSION_TABLE, ())])
            current = await self._schema_version()
            if current > LATEST_VERSION:
                raise StorageError(
                    f"the database at {self.url} has schema version {current}, newer than"
                    f" this durably supports ({LATEST_VERSION}); upgrade durably"
                )
            for version in range(current + 1, LATEST_VERSION + 1):
                statements: list[Statement] = [(sql, ()) for sql in MIGRATIONS[version - 1]]
                statements.append((q.RECORD_VERSION, (version,)))
                try:
                    await self._driver.write(statements)
                except StorageError:
                    # Another process may have applied this version at the same time.
                    if await self._schema_version() < version:
                        raise

        deadline = time.monotonic() + _MIGRATE_PATIENCE
        delay = 0.05
        while True:
            try:
                return await apply()
            except StorageError as exc:
                # Only another writer is worth waiting for; an unreachable server is reported at once.
                contended = exc.transient and ("locked" in str(exc) or "busy" in str(exc))
                if not contended or time.monotonic() + delay > deadline:
                    raise
            await anyio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 1.0)

    async def _schema_version(self) -> int:
        rows = await self._driver.read(q.SCHEMA_VERSION)
        return as_int(rows[0][0])

    async def create_runs(self, runs: Sequence[NewRun]) -> list[Run]:
        created, _ = await self._create(runs, None)
        return created

    async def create_leased_runs(
        self, runs: Sequence[NewRun], offer: LeaseOffer
    ) -> tuple[list[Run], list[ClaimedRun]]:
        return await self._create(runs, offer)

    async def _create(
        self, runs: Sequence[NewRun], offer: LeaseOffer | None
    ) -> tuple[list[Run], list[ClaimedRun]]:
        statements: list[Statement] = []
        positions: list[tuple[int, int | None]] = []  # per run: its INSERT, its idempotency SELECT
        for run in runs:
            insert = len(statements)
            statements.extend(_waits.insert_run(run, offer))
            existing = None
            if run.idempotency_key is not None:
                existing = len(statements)
                statements.append((q.SELECT_RUN_BY_IDEMPOTENCY_KEY, (run.job_name, run.idempotency_key)))
            positions.append((insert, existing))
        results = await self._driver.write(statements)
        found: dict[str, Row] = {}
        for run, (insert, existing) in zip(runs, positions, strict=True):
            rows = results[insert] or (results[existing] if existing is not None else [])
            if rows:
                found[run.id] = rows[0]
        if len(found) < len(runs):
            found |= await self._landed_runs([run.id for run in runs if run.id not in found])
        # A run stored under its own id was created by this call, perhaps by an earlier send of
        # this very request whose answer the connection lost (SPEC §15); another id is an
        # earlier run with the same idempotency key. Either is this offer's to execute only
        # if leased to its one-off owner under the first generation: no one else took it.
        created = [
            run_from_row(found[run.id], "created" if as_text(found[run.id][0]) == run.id else "idempotent")
            for run in runs
        ]
        leased = {as_text(row[0]): row for row in found.values() if offer and _leased_to(row, offer)}
        return created, [claimed_run(row, Resumed()) for row in leased.values()]

    async def _landed_runs(self, run_ids: list[str]) -> dict[str, Row]:
        """The rows of runs whose INSERT found its id taken: a re-sent request that had landed."""
        # On the primary: a replica may not have synced the first send yet.
        results = await self._driver.read_primary([(q.SELECT_CREATED, (run_id,)) for run_id in run_ids])
        missing = [run_id for run_id, rows in zip(run_ids, results, strict=True) if not rows]
        if missing:
            raise StorageError(f"{self.url}: runs {missing} were neither stored nor found")
        return {run_id: rows[0] for run_id, rows in zip(run_ids, results, strict=True)}

    async def claim_runs(
        self,
        *,
        worker_id: str,
        job_names: Sequence[str],
        limit: int,
        lease_seconds: float,
        next_due_within: float | None = None,
    ) -> Claim:
        # Resumed runs (claimed before) need their steps, log counts and step attempts, read
        # by this claim's one-off lease owner (on the primary: a replica may lag); no one else
        # writes steps for a run whose lease this worker now holds, so nothing comes between.
        # Remotely they ride in the claim's own request, with the next due time: a round trip
        # costs more than four indexed reads. On a local file the claim is one statement (no
        # transaction); only a claim that resumed a run pays a second request for them, and
        # only one that took nothing (the worker is about to idle) one for the next due time.
        owner = f"{worker_id}/{secrets.token_hex(6)}"
        jobs = _codec.encode(list(job_names)).decode()
        claim: Statement = (q.CLAIM_RUNS, (owner, lease_seconds, jobs, limit))
        resumed_reads: list[Statement] = [
            (q.COMPLETED_STEPS, (owner,)),
            (q.LOG_COUNTS, (owner,)),
            (q.STEP_ATTEMPTS, (owner,)),
        ]
        next_due: list[Statement] = []
        if next_due_within is not None:
            next_due.append((q.NEXT_DUE, (jobs, next_due_within)))
        if self._driver.local:
            [runs] = await self._driver.write([claim])
            resumed_rows: list[list[Row]] = []
            if any(as_int(row[RUN_WIDTH]) > 1 for row in runs):
                resumed_rows = await self._driver.read_primary(resumed_reads)
            due = await self._driver.read_primary(next_due) if next_due and not runs else []
        else:
            results = await self._driver.write([claim, *resumed_reads, *next_due])
            runs, resumed_rows, due = results[0], results[1:4], results[4:]
        return Claim(_claimed(runs, resumed_rows), as_float(due[0][0][0]) if due and due[0] else None)

    async def renew_leases(self, leases: Sequence[Lease], *, lease_seconds: float) -> set[str]:
        if not leases:
            return set()
        ids = _codec.encode([lease.run_id for lease in leases]).decode()
        pairs = _codec.encode([f"{lease.run_id}:{lease.generation}" for lease in leases]).decode()
        [rows] = await self._driver.write([(q.RENEW_LEASES, (lease_seconds, ids, pairs))])
        return {as_text(row[0]) for row in rows}

    async def _guarded(
        self,
        lease: Lease,
        main: Statement,
        telemetry: Telemetry,
        *after: Statement,
        steps: Sequence[StepRecord] = (),
    ) -> bool:
        # Steps and logs first: once ``main`` ends the lease, their guard would refuse them.
        first = [_step_statement(lease, step) for step in steps] + _log_statements(lease, telemetry)
        results = await self._driver.write([*first, main, *after])
        return _held(results[len(first)])

    async def _ending(
        self,
        lease: Lease,
        main: Statement,
        telemetry: Telemetry,
        status: str,
        steps: Sequence[StepRecord] = (),
    ) -> bool:
        """``_guarded`` for a write that ends the lease leaving the run in ``status``, storing
        ``steps`` before; a parent waiting for this run as its last child wakes in the same write."""
        if await self._guarded(lease, main, telemetry, (q.WAKE_PARENT, (lease.run_id,)), steps=steps):
            return True
        # Perhaps an earlier send of this very write ended it and the connection lost the answer
        # (SPEC §15): only this lease's holder can leave the run so under this generation.
        [rows] = await self._driver.read_primary([(_ENDED_AS, (lease.run_id, lease.generation, status))])
        return bool(rows)

    async def release_lease(self, lease: Lease, telemetry: Telemetry) -> bool:
        params = (_progress_json(telemetry.progress), lease.run_id, lease.generation)
        return await self._ending(lease, (q.RELEASE_LEASE, params), telemetry, "pending")

    async def save_step(self, lease: Lease, step: StepRecord, telemetry: Telemetry) -> bool:
        return await self.save_steps(lease, [step], telemetry)

    async def save_steps(self, lease: Lease, steps: Sequence[StepRecord], telemetry: Telemetry) -> bool:
        results = await self._driver.write(_save_steps_statements(lease, steps, telemetry))
        return _held(results[0])

    async def save_telemetry(self, lease: Lease, telemetry: Telemetry) -> bool:
        progress: Statement = (
            q.SAVE_PROGRESS,
            (_progress_json(telemetry.progress), lease.run_id, lease.generation),
        )
        if telemetry.progress is None:
            # Only logs: the progress statement still tells whether the lease is held.
            progress = ("SELECT 1 FROM durably_runs WHERE " + q.HELD, (lease.run_id, lease.generation))
        return await self._guarded(lease, progress, telemetry)

    async def complete_run(
        self, lease: Lease, output: bytes, telemetry: Telemetry, *, steps: Sequence[StepRecord] = ()
    ) -> bool:
        params = (output.decode(), _progress_json(telemetry.progress), lease.run_id, lease.generation)
        return await self._ending(lease, (q.COMPLETE_RUN, params), telemetry, "completed", steps)

    async def fail_run(
        self, lease: Lease, error: str, telemetry: Telemetry, *, steps: Sequence[StepRecord] = ()
    ) -> bool:
        params = (error, _progress_json(telemetry.progress), lease.run_id, lease.generation)
        return await self._ending(lease, (q.FAIL_RUN, params), telemetry, "failed", steps)

    async def retry_run_later(
        self, lease: Lease, error: str, delay: float, telemetry: Telemetry
    ) -> datetime | None:
        return await self._wake_later(lease, [], (1, error, delay), telemetry)

    async def postpone_run(
        self, lease: Lease, step: StepRecord, delay: float, telemetry: Telemetry
    ) -> datetime | None:
        save = _save_steps_statements(lease, [step], _NOTHING)
        return await self._wake_later(lease, save, (0, None, delay), telemetry)

    async def _wake_later(
        self, lease: Lease, first: list[Statement], params: tuple[Value, ...], telemetry: Telemetry
    ) -> datetime | None:
        wake: Statement = (
            q.WAKE_LATER,
            (*params, _progress_json(telemetry.progress), lease.run_id, lease.generation),
        )
        results = await self._driver.write([*first, *_log_statements(lease, telemetry), wake])
        rows = results[-1]
        if not rows:  # perhaps an earlier send landed and its answer was lost (SPEC §15)
            [rows] = await self._driver.write([(q.WOKEN_LATER, (lease.run_id, lease.generation))])
        return as_time(rows[0][0]) if rows else None

    async def get_run(self, run_id: str) -> Run | None:
        rows = await self._driver.read(q.SELECT_RUN_BY_ID, (run_id,))
        return run_from_row(rows[0]) if rows else None

    async def get_runs(self, run_filter: RunFilter) -> list[Run]:
        where: list[str] = []
        params: list[Value] = []
        for column, values in (("status", run_filter.statuses), ("job_name", run_filter.job_names)):
            if values:
                where.append(f"{column} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        for key, value in run_filter.labels.items():
            where.append("seq IN (SELECT run_seq FROM durably_labels WHERE key = ? AND value = ?)")
            params.extend((key, value))
        if run_filter.before_id is not None:
            where.append(q.BEFORE_RUN)
            params.extend((run_filter.before_id, run_filter.before_id))
        sql = f"SELECT {q.RUN_COLUMNS} FROM durably_runs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ? OFFSET ?"
        params.extend((run_filter.limit, run_filter.offset))
        return [run_from_row(row) for row in await self._driver.read(sql, params)]

    async def get_run_changes(self, cursor: int | None, *, limit: int) -> RunChanges:
        if cursor is None:
            rows = await self._driver.read(q.LATEST_CHANGE)
            return RunChanges(runs=[], cursor=as_int(rows[0][0]))
        rows = await self._driver.read(q.RUN_CHANGES, (cursor, limit))
        runs = [run_from_row(row[:RUN_WIDTH]) for row in rows]
        return RunChanges(runs=runs, cursor=as_int(rows[-1][RUN_WIDTH]) if rows else cursor)

    async def _require_run(self, run_id: str) -> None:
        if not await self._driver.read(q.RUN_EXISTS, (run_id,)):
            raise NotFoundError(f"no run with id {run_id!r}")

    async def get_steps(self, run_id: str) -> list[Step]:
        rows = await self._driver.read(q.SELECT_STEPS, (run_id,))
        if not rows:
            await self._require_run(run_id)
        return [
            Step(
                name=as_text(name),
                index=as_int(index),
                status=as_text(status),  # type: ignore[arg-type]
                output=as_json(output),
                error=None if error is None else as_text(error),
                started_at=to_datetime(as_float(started)),
                completed_at=to_datetime(as_float(completed)),
            )
            for name, index, status, output, error, started, completed in rows
        ]

    async def get_logs(self, run_id: str) -> list[LogEntry]:
        rows = await self._driver.read(q.SELECT_LOGS, (run_id,))
        if not rows:
            await self._require_run(run_id)
        return [
            LogEntry(
                step_name=None if step is None else as_text(step),
                level=as_text(level),  # type: ignore[arg-type]
                message=as_text(message),
                data=as_json(data) or {},
                created_at=to_datetime(as_float(created)),
            )
            for step, level, message, data, created in rows
        ]

    async def cancel_run(self, run_id: str) -> tuple[Run, bool]:
        return await _run_api.cancel_run(self._driver, run_id)

    async def wait(self, lease: Lease, request: WaitRequest, telemetry: Telemetry) -> WaitResult:
        logs = _log_statements(lease, telemetry)
        return await _waits.wait(self._driver, lease, request, logs, _progress_json(telemetry.progress))

    async def send_signal(self, run_id: str, name: str, payload: bytes) -> Run:
        return await _run_api.send_signal(self._driver, run_id, name, payload)

    async def register_schedules(self, names: Sequence[str]) -> dict[str, float]:
        encoded = _codec.encode(list(names)).decode()
        _, rows = await self._driver.write(
            [(q.REGISTER_SCHEDULES, (encoded,)), (q.SCHEDULES_REGISTERED, (encoded,))]
        )
        return {as_text(name): float(at or 0) for name, at in rows}

    async def next_wake_at(self, job_names: Sequence[str]) -> float | None:
        rows = await self._driver.read(q.NEXT_WAKE_AT, (_codec.encode(list(job_names)).decode(),))
        return as_float(rows[0][0]) if rows else None

    async def retry_run(self, run_id: str) -> Run:
        return await _run_api.retry_run(self._driver, run_id)

    async def delete_run(self, run_id: str) -> Run:
        return await _run_api.delete_run(self._driver, run_id)

    async def purge_runs(self, *, completed_before: datetime, limit: int) -> int:
        return await _run_api.purge_runs(self._driver, completed_before.timestamp(), limit)

    async def close(self) -> None:
        await self._driver.close()
