"""``Storage``: every operation the engine performs on the database.

The docstrings are the contract each implementation keeps. Time for leases is
always the database's clock, never the caller's. A *lease* is a run id plus the
lease generation returned when the run was claimed: every write made on behalf
of a running run is guarded by it, so a worker whose lease was taken over (or
whose run was cancelled) writes nothing and learns so from a ``False`` result.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

import msgspec

from durably._models import ClaimedRun, LogEntry, NewRun, Progress, Run, Step


class Lease(msgspec.Struct, frozen=True):
    """The fencing token of a claimed run."""

    run_id: str
    generation: int


class StepRecord(msgspec.Struct, kw_only=True):
    """A finished step as written: ``output`` is its JSON, ``error`` its failure."""

    name: str
    index: int
    output: bytes | None = None
    error: str | None = None
    started_at: float
    #: None while the step backs off between attempts (SPEC §12); then resumed runs go on counting.
    completed_at: float | None
    attempts: int = 1


class Telemetry(msgspec.Struct, kw_only=True):
    """Progress and log lines not yet stored; they ride along with the next write."""

    progress: Progress | None = None
    logs: list[LogEntry] = msgspec.field(default_factory=list)

    def __bool__(self) -> bool:
        return self.progress is not None or bool(self.logs)


class WaitRequest(msgspec.Struct, kw_only=True, frozen=True):
    """A wait a running run reaches (SPEC §12): what resolves it, and what it waits as.

    ``key`` is the step under which the resolution is stored (a signal's payload, the
    children's outcomes); ``timer_key`` the step holding the wait's deadline (epoch
    seconds, database clock), written as now + ``timer`` (or ``deadline``) the first time. A wait with
    neither ``signal`` nor ``children`` is a sleep: it resolves once its deadline has
    passed and stores nothing more. ``waiting_for`` is stored on the run while it waits.
    """

    key: str
    index: int
    waiting_for: str
    timer_key: str | None = None
    timer: float | None = None
    deadline: float | None = None
    signal: str | None = None
    children: tuple[NewRun, ...] = ()


class WaitResult(msgspec.Struct, frozen=True):
    """``"resolved"`` with the stored resolution (JSON, ``None`` for a sleep), ``"waiting"``
    (the run now waits, its lease released, until ``wake_at`` if it has one) or ``"lost"``."""

    state: str
    output: bytes | None = None
    wake_at: float | None = None


class LeaseOffer(msgspec.Struct, kw_only=True, frozen=True):
    """Free slots of a worker serving in the triggering process: a run the trigger creates
    with nothing ahead of it is created leased to ``owner`` (a one-off lease owner, as a
    claim's), saving the claim's round trip. ``job_names`` are the worker's jobs."""

    owner: str
    job_names: tuple[str, ...]
    slots: int
    lease_seconds: float


class Claim(msgspec.Struct, frozen=True):
    """What one claim found: the runs it leased, and when the next run of its jobs becomes due.

    ``next_due_in``: seconds from the claim, on the database clock (so this host's clock never
    matters), until the earliest ``wake_at`` after now of a pending or waiting run of the
    jobs: an idle worker's wait never runs past it, whichever host made the run wait.
    ``None`` when there is none within the window asked for, or when it was not read: not
    asked for, or a local claim that took runs (the worker looks again soon after those).
    """

    runs: list[ClaimedRun]
    next_due_in: float | None = None


class RunFilter(msgspec.Struct, kw_only=True):
    """What ``get_runs`` selects; every given criterion must match."""

    statuses: tuple[str, ...] = ()
    job_names: tuple[str, ...] = ()
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    limit: int = 50
    offset: int = 0
    #: Keyset pagination: only runs older than the run with this id (the last one of
    #: the previous page). If that run was deleted meanwhile, runs older than the
    #: next newer run still there.
    before_id: str | None = None


class RunChanges(msgspec.Struct, frozen=True):
    """What ``get_run_changes`` found: changed runs, oldest change first, and where to go on."""

    runs: list[Run]
    cursor: int


@runtime_checkable
class Storage(Protocol):
    """Where runs, steps and logs live. Constructors do no I/O; errors are ``StorageError``.

    A trigger, a lease-ending write or a run-API change (retry, cancel, delete, signal,
    purge) whose request a driver sends again after losing its answer (SPEC §15) answers
    as its first send did, and changes nothing twice.
    """

    @property
    def url(self) -> str:
        """The database location, without credentials."""
        ...

    async def migrate(self) -> None:
        """Bring the schema to the latest version.

        Idempotent and safe when several processes migrate at once. Raises
        ``StorageError`` if the database was created by a newer durably.
        """
        ...

    async def create_runs(self, runs: Sequence[NewRun]) -> list[Run]:
        """Write ``runs`` atomically as ``pending``, in one round trip.

        A run whose ``(job_name, idempotency_key)`` already exists is not
        written; the existing run is returned in its place with disposition
        ``"idempotent"``. The others come back with disposition ``"created"``,
        in the order given.
        """
        ...

    async def create_leased_runs(
        self, runs: Sequence[NewRun], offer: LeaseOffer
    ) -> tuple[list[Run], list[ClaimedRun]]:
        """``create_runs``, in the same one round trip; and up to ``offer.slots`` of the new
        runs are created leased to ``offer.owner`` (generation 1), each only if a claim by
        the offering worker would take it first now: not delayed, no stale lease of
        ``offer.job_names`` to reclaim, no ready or due run of them at its priority or above,
        its concurrency key free. Those come back as claimed runs (no steps), to execute at once.
        """
        ...

    async def claim_runs(
        self,
        *,
        worker_id: str,
        job_names: Sequence[str],
        limit: int,
        lease_seconds: float,
        next_due_within: float | None = None,
    ) -> Claim:
        """Lease up to ``limit`` claimable runs of ``job_names`` in one statement.

        Claimable: ``pending`` runs oldest first, or ``leased`` runs whose lease
        expired (``expires_at <= now``). A pending run with a concurrency key is
        claimable only if no run with that key is leased and no older run with
        that key is pending. Claiming sets the owner, an expiry of ``now +
        lease_seconds`` and increments the lease generation; each result carries
        the run's completed steps.

        With ``next_due_within`` (seconds), ``next_due_in`` tells when the next run of
        ``job_names`` becomes due by time, if within that window: remotely in the claim's
        one request; on a local file by a second cheap read, only when nothing was claimed.
        """
        ...

    async def renew_leases(self, leases: Sequence[Lease], *, lease_seconds: float) -> set[str]:
        """Extend all ``leases`` in one statement; the ids of those still held.

        A lease is held while its run is ``leased`` with the same generation.
        """
        ...

    async def release_lease(self, lease: Lease, telemetry: Telemetry) -> bool:
        """Put a held run back to ``pending`` so any worker may claim it at once."""
        ...

    async def save_step(self, lease: Lease, step: StepRecord, telemetry: Telemetry) -> bool:
        """Store a finished step (replacing a failed one of the same name) if the lease is held."""
        ...

    async def save_steps(self, lease: Lease, steps: Sequence[StepRecord], telemetry: Telemetry) -> bool:
        """Store ``steps`` (at least one; as ``save_step`` each) and ``telemetry`` in one atomic
        write if the lease is held; nothing if not. Re-sending is safe: a step's row is replaced."""
        ...

    async def save_telemetry(self, lease: Lease, telemetry: Telemetry) -> bool:
        """Store progress and logs if the lease is held."""
        ...

    async def complete_run(
        self, lease: Lease, output: bytes, telemetry: Telemetry, *, steps: Sequence[StepRecord] = ()
    ) -> bool:
        """Mark the run ``completed`` with ``output`` (JSON) and drop the lease, if held.

        ``steps`` not stored yet (pipelined checkpoints, SPEC §3) are stored in the same
        atomic write, before it (here and in ``fail_run``). The last child of a waiting parent
        to end (completed, failed or cancelled) wakes it in the same write (here, in
        ``fail_run`` and in ``cancel_run``)."""
        ...

    async def fail_run(
        self, lease: Lease, error: str, telemetry: Telemetry, *, steps: Sequence[StepRecord] = ()
    ) -> bool:
        """Mark the run ``failed`` with ``error`` and drop the lease, if held."""
        ...

    async def retry_run_later(
        self, lease: Lease, error: str, delay: float, telemetry: Telemetry
    ) -> datetime | None:
        """Retry a held run automatically: one write, made only if the lease is held.

        The run goes back to ``pending`` with ``attempt + 1``, ``error`` kept as its last
        failure (cleared when it completes) and ``wake_at`` ``delay`` seconds from now on
        the database clock: no worker claims it before. The lease is released; completed
        steps are kept, so the run resumes after them. Returns ``wake_at``, or ``None`` if
        the lease was not held (nothing written).
        """
        ...

    async def postpone_run(
        self, lease: Lease, step: StepRecord, delay: float, telemetry: Telemetry
    ) -> datetime | None:
        """Store ``step`` (a failed attempt) and release the held run to wait: one write.

        As ``retry_run_later``, but ``attempt`` and ``error`` are unchanged: a step backing
        off for longer than a lease frees its worker slot. The run is claimable again
        ``delay`` seconds from now. Returns ``wake_at``, or ``None`` if the lease was not held.
        """
        ...

    async def wait(self, lease: Lease, request: WaitRequest, telemetry: Telemetry) -> WaitResult:
        """Resolve ``request`` or make the run wait for it, in one atomic write, if the lease is held.

        In that one write: the children are created (once: their idempotency keys derive
        from the parent and the step), the deadline is stored (once), and then either the
        wait resolves — the oldest unconsumed signal of that name is consumed by exactly
        this wait and stored as the step's result, or every child has ended and their
        outcomes are stored, or the deadline has passed on the database clock (stored as
        ``{"timeout": true}`` for a signal or children) — or the run becomes ``waiting``
        with ``waiting_for`` and ``wake_at`` = the deadline, its lease released, holding
        no slot. A waiting run becomes claimable when its ``wake_at`` passes, when a
        signal it waits for arrives (``send_signal``) or when its last child ends.
        """
        ...

    async def send_signal(self, run_id: str, name: str, payload: bytes) -> Run:
        """Keep a signal for the run until a wait of that name consumes it; wake the run if it
        waits for it now. The run (as it was); ``NotFoundError`` for an unknown run,
        ``ConflictError`` for an ended one (nothing is stored then)."""
        ...

    async def next_wake_at(self, job_names: Sequence[str]) -> float | None:
        """When the earliest run of ``job_names`` becomes claimable (epoch seconds, database
        clock): now's time if one is claimable at once, else the earliest ``wake_at`` or
        lease expiry; ``None`` if nothing is due ever (runs waiting for a signal or children)."""
        ...

    async def register_schedules(self, names: Sequence[str]) -> dict[str, float]:
        """Record the first registration of each schedule (once per database, by its clock);
        each name's first registration time in epoch seconds."""
        ...

    async def get_run(self, run_id: str) -> Run | None:
        """The run with ``run_id``, or ``None``."""
        ...

    async def get_runs(self, run_filter: RunFilter) -> list[Run]:
        """Runs matching ``run_filter``, newest first."""
        ...

    async def get_run_changes(self, cursor: int | None, *, limit: int) -> RunChanges:
        """Runs whose row, steps or logs changed after ``cursor``; one indexed read.

        Every change to a run's status, progress, attempt, output or error, and every
        step or log line stored for it, moves the run past all cursors handed out
        before, so polling with the returned ``cursor`` sees each later change once
        (a run changed twice between polls comes once, as it is now). At most
        ``limit`` runs come back, more only when runs changed together (one claim of
        several) share the last change; when ``limit`` came, call again at once. ``None``
        returns no runs and the current cursor: the place to start watching from.
        Deleted runs are not reported.
        """
        ...

    async def get_steps(self, run_id: str) -> list[Step]:
        """The stored steps of a run in execution order; ``NotFoundError`` if no such run."""
        ...

    async def get_logs(self, run_id: str) -> list[LogEntry]:
        """The stored log lines of a run, oldest first; ``NotFoundError`` if no such run."""
        ...

    async def cancel_run(self, run_id: str) -> tuple[Run, bool]:
        """Cancel a ``pending``, ``leased`` or ``waiting`` run, with its unfinished child runs
        (and theirs); the run and whether this call changed it. A parent waiting for it wakes.

        An already cancelled run is returned unchanged. ``NotFoundError`` for an
        unknown id, ``ConflictError`` for a completed or failed run.
        """
        ...

    async def retry_run(self, run_id: str) -> Run:
        """Put a ``failed`` or ``cancelled`` run back to ``pending`` with ``attempt + 1``.

        Completed steps are kept. ``NotFoundError``/``ConflictError`` otherwise.
        """
        ...

    async def delete_run(self, run_id: str) -> Run:
        """Delete a run that is not ``pending``/``leased``, with its steps, logs and labels."""
        ...

    async def purge_runs(self, *, completed_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` terminal runs that ended before the given time."""
        ...

    async def close(self) -> None:
        """Release connections and threads; idempotent. A later use opens them again."""
        ...
