"""The run API's writes (retry, cancel, delete, signal, purge), each safe to send twice.

The remote driver sends a request again when its connection turns out closed, and the
first send may have landed (SPEC §15). So each write carries a token of its own, stored
with its change (schema v5): a re-send finds it, changes nothing twice, and answers as
the first send did, in the same request. No extra round trip, re-sent or not.
"""

from __future__ import annotations

import secrets

from durably import _codec
from durably._models import Run
from durably._storage import _queries as q
from durably._storage._driver import Driver, Row, Statement
from durably._storage._rows import as_int, as_text, run_from_row
from durably.errors import ConflictError, NotFoundError

_TOKEN_LIFETIME = 600.0  # seconds: a re-send follows its first send within one request timeout


def _token() -> str:
    return secrets.token_hex(12)


def _prune() -> Statement:
    """Forgets tokens no re-send can still come for: the table stays small."""
    return (q.PRUNE_WRITES, (_TOKEN_LIFETIME,))


def _run(run_id: str, rows: list[Row]) -> Run:
    if not rows:
        raise NotFoundError(f"no run with id {run_id!r}")
    return run_from_row(rows[0])


async def retry_run(driver: Driver, run_id: str) -> Run:
    token = _token()
    *_, current, written = await driver.write(
        [
            _prune(),
            (q.RETRY_RUN, (run_id, token)),
            (q.RECORD_CHANGE, (token,)),
            (q.SELECT_RUN_BY_ID, (run_id,)),
            (q.WRITTEN, (token,)),
        ]
    )
    run = _run(run_id, current)
    if not written:
        raise ConflictError(f"run {run_id} is {run.status}; only failed or cancelled runs can be retried")
    return run


async def cancel_run(driver: Driver, run_id: str) -> tuple[Run, bool]:
    """The run, and whether this call cancelled it (not: it was cancelled already)."""
    token = _token()
    *_, current, written = await driver.write(
        [
            _prune(),
            (q.CANCEL_RUN, (run_id, token)),
            (q.RECORD_CHANGE, (token,)),
            (q.CANCEL_DESCENDANTS, (run_id,)),
            (q.WAKE_PARENT, (run_id,)),
            (q.SELECT_RUN_BY_ID, (run_id,)),
            (q.WRITTEN, (token,)),
        ]
    )
    run = _run(run_id, current)
    if not written and run.status != "cancelled":
        raise ConflictError(f"run {run_id} is {run.status} and cannot be cancelled")
    return run, bool(written)


async def send_signal(driver: Driver, run_id: str, name: str, payload: bytes) -> Run:
    token = _token()
    *_, current, written = await driver.write(
        [
            _prune(),
            (q.INSERT_SIGNAL, (run_id, name, payload.decode(), token)),
            (q.RECORD_CHANGE, (token,)),
            (q.WAKE_FOR_SIGNAL, (run_id, name)),
            (q.SELECT_RUN_BY_ID, (run_id,)),
            (q.WRITTEN, (token,)),
        ]
    )
    run = _run(run_id, current)
    if not written:
        raise ConflictError(f"run {run_id} is {run.status}: an ended run takes no signals")
    return run


async def delete_run(driver: Driver, run_id: str) -> Run:
    token = _token()
    *_, deleted, remaining, written = await driver.write(
        [
            _prune(),
            (q.RECORD_DELETED, (run_id, token)),
            (q.DELETE_STEPS, (run_id,)),
            (q.DELETE_LOGS, (run_id,)),
            (q.DELETE_SIGNALS, (run_id,)),
            (q.DELETE_LABELS, (run_id,)),
            (q.DELETE_RUN, (run_id,)),
            (q.SELECT_RUN_BY_ID, (run_id,)),
            (q.WRITTEN, (token,)),
        ]
    )
    if deleted:
        return run_from_row(deleted[0])
    if written:  # deleted by an earlier send of this request: as it was then
        return run_from_row(tuple(_codec.decode(as_text(written[0][0]))))
    run = _run(run_id, remaining)
    raise ConflictError(f"run {run_id} is {run.status}; only ended runs can be deleted")


async def purge_runs(driver: Driver, completed_before: float, limit: int) -> int:
    token = _token()
    purge = (completed_before, limit, token)
    *_, written = await driver.write(
        [
            _prune(),
            (q.PURGE_STEPS, purge),
            (q.PURGE_LOGS, purge),
            (q.PURGE_SIGNALS, purge),
            (q.PURGE_LABELS, purge),
            (q.PURGE_RUNS, purge),
            (q.RECORD_COUNT, (token,)),
            (q.WRITTEN, (token,)),
        ]
    )
    return as_int(written[0][0])
