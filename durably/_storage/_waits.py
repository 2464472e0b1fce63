"""The statements of a wait (SPEC §12), built apart from ``SqlStorage`` to keep it small.

A wait is one atomic write: create children, store the deadline, try to resolve, else
suspend the run. The order of statements matters: each sees the ones before.
"""

from __future__ import annotations

from durably import _codec
from durably._models import NewRun
from durably._storage import _queries as q
from durably._storage._driver import Driver, Row, Statement
from durably._storage._protocol import Lease, LeaseOffer, WaitRequest, WaitResult


def insert_run(run: NewRun, offer: LeaseOffer | None = None) -> list[Statement]:
    """The statements that create ``run`` (and its labels); the INSERT comes first. With an
    ``offer``, the run is created leased to it if nothing is ahead of it (INSERT_RUN)."""
    labels = _codec.encode(run.labels).decode()
    params = (
        run.id,
        run.job_name,
        run.input.decode(),
        labels,
        run.idempotency_key,
        run.concurrency_key,
        run.priority,
        run.delay,
        run.run_at,
        run.parent_run_id,
        run.trace_context,
    )
    if offer is None:
        insert: Statement = (q.INSERT_RUN, (*params, None, None))
    else:
        jobs = _codec.encode(offer.job_names).decode()
        insert = (q.INSERT_OFFERED_RUN, (*params, offer.owner, offer.lease_seconds, jobs, offer.slots))
    statements: list[Statement] = [insert]
    if run.labels:
        statements.append((q.INSERT_LABELS, (labels, run.id)))
    return statements


def _held(lease: Lease) -> tuple[str, int]:
    return lease.run_id, lease.generation


def _children(request: WaitRequest) -> tuple[str | None, str | None]:
    """The children's idempotency keys (a JSON array) and job, or ``(None, None)``."""
    if not request.children:
        return None, None
    keys = _codec.encode([child.idempotency_key for child in request.children]).decode()
    return keys, request.children[0].job_name


def _resolvers(lease: Lease, request: WaitRequest) -> list[Statement]:
    held = (*_held(lease), request.key)
    statements: list[Statement] = []
    if request.signal is not None:
        statements.append((q.CONSUME_SIGNAL, (*held, request.signal, request.index)))
        statements.append((q.DROP_SIGNAL, (lease.run_id, request.key)))
    if request.children:
        keys, job = _children(request)
        statements.append((q.STORE_CHILDREN, (*held, keys, job, request.index)))
    if request.timer_key is not None and request.timer_key != request.key:
        statements.append((q.STORE_TIMEOUT, (*held, request.timer_key, request.index)))
    return statements


def wait_statements(lease: Lease, request: WaitRequest, progress: str | None) -> list[Statement]:
    """The wait's statements; the last three answer: suspended? still held? resolution."""
    statements: list[Statement] = []
    for child in request.children:
        statements.extend(insert_run(child))
    if request.timer_key is not None:
        timer = (*_held(lease), request.timer_key, request.index, request.timer, request.deadline)
        statements.append((q.WAIT_TIMER, timer))
    statements.extend(_resolvers(lease, request))
    sleep = request.signal is None and not request.children
    keys, job = _children(request)
    suspend = (
        lease.run_id,
        lease.generation,
        request.key,
        request.waiting_for,
        request.timer_key,
        progress,
        int(sleep),
        keys,
        job,
    )
    statements.append((q.SUSPEND_RUN, suspend))
    statements.append((q.STILL_HELD, (lease.run_id, lease.generation)))
    statements.append((q.WAIT_RESOLUTION, (lease.run_id, request.key)))
    return statements


def wait_result(request: WaitRequest, results: list[list[Row]]) -> WaitResult:
    """What the wait's write did, from the rows of its last three statements."""
    suspended, held, resolution = results[-3:]
    waiting = parked(suspended)
    if waiting is not None:
        return waiting
    if not held:
        return WaitResult("lost")
    sleep = request.signal is None and not request.children
    if sleep or not resolution or resolution[0][0] is None:
        return WaitResult("resolved")
    value = resolution[0][0]
    return WaitResult("resolved", output=value if isinstance(value, bytes) else str(value).encode())


def parked(rows: list[Row]) -> WaitResult | None:
    """A ``"waiting"`` result if ``PARKED_AS`` found the run parked, else ``None``."""
    if not rows:
        return None
    wake_at = rows[0][0]
    return WaitResult("waiting", wake_at=None if wake_at is None else float(wake_at))


async def wait(
    driver: Driver, lease: Lease, request: WaitRequest, logs: list[Statement], progress: str | None
) -> WaitResult:
    """``Storage.wait``: the logs, then the wait's statements, in one atomic write."""
    result = wait_result(request, await driver.write([*logs, *wait_statements(lease, request, progress)]))
    if result.state != "lost":
        return result
    # Perhaps an earlier send of this very write parked the run and the connection lost
    # the answer (SPEC §15): only this lease's holder can park it under this generation.
    [rows] = await driver.write([(q.PARKED_AS, (lease.run_id, lease.generation))])
    return parked(rows) or result
