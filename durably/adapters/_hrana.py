"""A small Hrana-over-HTTP (v2 pipeline) client on aiohttp: what the remote driver speaks.

Why not ``libsql-client``: it is archived, speaks the legacy ``/v1`` endpoints, opens
batches with a deferred ``BEGIN`` (sqld answered 59 of 1,200 contended claims with
"database is locked" that way, 2 with ``BEGIN IMMEDIATE``), has no timeouts, and its
WebSocket mode raised ``InvalidStateError`` on a dropped connection and garbled
authentication errors (docs/deploying-on-turso.md has the measurements).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import aiohttp
import msgspec
import structlog

from durably._storage._driver import Row, Statement, Value

_logger = structlog.get_logger("durably")

_MAX_CONNECTIONS = 16
_MAX_GROUP = 128  # write operations per transaction
_GROUPS_IN_FLIGHT = 2  # per event loop: one being answered while the next is sent
_BUSY_RETRIES = 12
_FIRST_BACKOFF = 0.005
_MAX_BACKOFF = 0.5


class HranaError(Exception):
    """An error the server reported for a statement, with its Hrana ``code``."""

    def __init__(self, message: str, code: str | None, *, undone: bool = False) -> None:
        super().__init__(message)
        self.code = code or "UNKNOWN"
        self.undone = undone

    @property
    def busy(self) -> bool:
        """Whether another writer held the lock: the statement did not run and may be retried."""
        return self.code == "SQLITE_BUSY" or "database is locked" in str(self)

    @property
    def retryable(self) -> bool:
        """Whether nothing took effect: busy, or undone with the rest of its transaction."""
        return self.busy or self.undone


class HttpStatusError(Exception):
    """The server answered the request itself with an HTTP error."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status


class ProtocolError(Exception):
    """The server's answer was not a Hrana answer to what was asked (garbled, cut short)."""


# --- the wire shapes of a Hrana v2 pipeline answer ------------------------------------


class _Null(msgspec.Struct, tag="null", tag_field="type"):
    pass


class _Integer(msgspec.Struct, tag="integer", tag_field="type"):
    value: str


class _Float(msgspec.Struct, tag="float", tag_field="type"):
    value: float


class _Text(msgspec.Struct, tag="text", tag_field="type"):
    value: str


class _Blob(msgspec.Struct, tag="blob", tag_field="type"):
    base64: str


_Cell = _Null | _Integer | _Float | _Text | _Blob


class _StmtResult(msgspec.Struct):
    rows: list[list[_Cell]]


class _Error(msgspec.Struct):
    message: str = "unknown error"
    code: str | None = None


class _BatchResult(msgspec.Struct):
    step_results: list[_StmtResult | None]
    step_errors: list[_Error | None]


class _Execute(msgspec.Struct, tag="execute", tag_field="type"):
    result: _StmtResult


class _Batch(msgspec.Struct, tag="batch", tag_field="type"):
    result: _BatchResult


class _Close(msgspec.Struct, tag="close", tag_field="type"):
    pass


class _Ok(msgspec.Struct, tag="ok", tag_field="type"):
    response: _Execute | _Batch | _Close


class _Failed(msgspec.Struct, tag="error", tag_field="type"):
    error: _Error


class _PipelineAnswer(msgspec.Struct):
    results: list[_Ok | _Failed]


_Response = _Execute | _Batch | _Close

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_PipelineAnswer)


def encode_value(value: Value) -> dict[str, Any]:
    if value is None:
        return {"type": "null"}
    if isinstance(value, bool | int):
        return {"type": "integer", "value": str(int(value))}
    if isinstance(value, float):
        return {"type": "float", "value": value}
    if isinstance(value, str):
        return {"type": "text", "value": value}
    if isinstance(value, bytes):
        return {"type": "blob", "base64": base64.b64encode(value).decode()}
    raise TypeError(f"cannot send {type(value).__name__} to the database")


def _decode_cell(cell: _Cell) -> Value:
    if isinstance(cell, _Null):
        return None
    if isinstance(cell, _Integer):
        return int(cell.value)
    if isinstance(cell, _Blob):
        return base64.b64decode(cell.base64 + "=" * (-len(cell.base64) % 4), validate=True)
    return cell.value


def _rows(result: _StmtResult | None) -> list[Row]:
    if result is None:
        raise ProtocolError("a statement that ran has no result")
    try:
        return [tuple(_decode_cell(cell) for cell in row) for row in result.rows]
    except ValueError as exc:  # a garbled integer or base64 text
        raise ProtocolError(f"undecodable value: {exc}") from exc


def _error(error: _Error) -> HranaError:
    return HranaError(error.message, error.code)


def _ok(step: int) -> dict[str, Any]:
    return {"type": "ok", "step": step}


def _not(cond: dict[str, Any]) -> dict[str, Any]:
    return {"type": "not", "cond": cond}


def _stmt(sql: str, params: Sequence[Value]) -> dict[str, Any]:
    return {"sql": sql, "args": [encode_value(p) for p in params], "want_rows": True}


class _Read(NamedTuple):
    statement: Statement
    future: asyncio.Future[list[Row]]


class _Write(NamedTuple):
    statements: Sequence[Statement]
    future: asyncio.Future[list[list[Row]]]


_Queued = _Read | _Write
_Answer = tuple[_Queued, "list[Row] | list[list[Row]] | HranaError"]


class _Group:
    """Write operations of several callers as ONE Hrana batch: one sqld transaction.

    ``BEGIN IMMEDIATE``; per operation ``SAVEPOINT``, its statements (each only if the
    previous one succeeded), ``ROLLBACK TO`` if one failed, ``RELEASE``; ``COMMIT``, or
    ``ROLLBACK`` if anything broke the chain. A statement error undoes only its own
    operation, as the local file's group commit does; an error that ends the whole
    transaction (SQLite rolls back on some) makes ``ROLLBACK TO`` fail, so no later
    operation starts and nothing commits. A lone operation skips the savepoint.
    """

    def __init__(self, writes: Sequence[_Write]) -> None:
        self.writes = writes
        self.steps: list[dict[str, Any]] = []
        self._spans: list[range] = []  # the steps of each operation's statements
        after = self._add("BEGIN IMMEDIATE")  # the step whose success lets the next one run
        isolated = len(writes) > 1
        for write in writes:
            savepoint = after = self._add("SAVEPOINT durably_op", after) if isolated else after
            first = len(self.steps)
            for sql, params in write.statements:
                after = self._add(_stmt(sql, params), after)
            self._spans.append(range(first, len(self.steps)))
            if isolated:
                failed = {"type": "and", "conds": [_ok(savepoint), _not(_ok(after))]}
                undo = self._add("ROLLBACK TO durably_op", failed)
                after = self._add("RELEASE durably_op", {"type": "or", "conds": [_ok(after), _ok(undo)]})
        self._commit = self._add("COMMIT", after)
        self._add("ROLLBACK", _not(_ok(self._commit)))

    def _add(self, stmt: str | dict[str, Any], condition: int | dict[str, Any] | None = None) -> int:
        step: dict[str, Any] = {"stmt": {"sql": stmt, "want_rows": False} if isinstance(stmt, str) else stmt}
        if condition is not None:
            step["condition"] = _ok(condition) if isinstance(condition, int) else condition
        self.steps.append(step)
        return len(self.steps) - 1

    @property
    def request(self) -> dict[str, Any]:
        return {"type": "batch", "batch": {"steps": self.steps}}

    def answer(self, result: _BatchResult) -> list[tuple[_Write, list[list[Row]] | HranaError]]:
        """Each operation's rows or error; a busy error means it did not take effect."""
        if len(result.step_results) != len(self.steps) or len(result.step_errors) != len(self.steps):
            raise ProtocolError(f"{len(result.step_results)} step results for a batch of {len(self.steps)}")
        begin = result.step_errors[0]
        if begin is not None:
            return [(write, _error(begin)) for write in self.writes]
        committed = result.step_results[self._commit] is not None and result.step_errors[self._commit] is None
        # Operations that ran without error but did not commit: another one's error ended the
        # transaction, or COMMIT failed. Nothing of theirs took effect; they may be sent again.
        commit = result.step_errors[self._commit] or _Error("another operation's error ended it")
        undone = HranaError(f"undone with its transaction: {commit.message}", commit.code, undone=True)
        answers: list[tuple[_Write, list[list[Row]] | HranaError]] = []
        for write, span in zip(self.writes, self._spans, strict=True):
            error = next((e for e in (result.step_errors[i] for i in span) if e is not None), None)
            if error is not None:
                answers.append((write, _error(error)))
            elif committed:
                answers.append((write, [_rows(result.step_results[i]) for i in span]))
            else:
                answers.append((write, undone))
        return answers


def _kind(response: _Response) -> str:
    return type(response).__name__.strip("_").lower()


def _answers(payload: bytes, expected: int) -> list[_Ok | _Failed]:
    """The ``expected`` results of a pipeline answer (its closing one left out)."""
    try:
        results = _decoder.decode(payload).results
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed answer ({len(payload)} bytes): {exc}") from exc
    if len(results) != expected + 1:
        raise ProtocolError(f"{len(results)} results for {expected + 1} requests")
    return results[:expected]


class HranaClient:
    """Sends pipelines to ``{base_url}/v2/pipeline``.

    Requests made during one pass of the event loop travel together in one HTTP
    request, and their writes commit as ONE sqld transaction (``_Group``: each in its
    own savepoint, so a failing one does not undo the others). sqld commits about
    1,000 transactions/s, so a run's completion and the worker's next claim, or the
    step writes of runs executing at once, cost one round trip and one commit.
    "database is locked" means nothing took effect: those requests are sent again
    together, with jittered backoff. Every request is answered within ``timeout``
    seconds per attempt, with a result or an error.
    """

    def __init__(self, base_url: str, *, auth_token: str | None, timeout: float) -> None:
        self._endpoint = base_url.rstrip("/") + "/v2/pipeline"
        # sqld compresses responses unless told not to: small JSON, not worth the latency.
        self._headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if auth_token:
            self._headers["authorization"] = f"Bearer {auth_token}"
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=timeout / 2)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._queued: dict[asyncio.AbstractEventLoop, list[_Queued]] = {}
        self._sending: set[asyncio.Task[None]] = set()
        self._writing: dict[asyncio.AbstractEventLoop, int] = {}  # write groups in flight
        self._held: dict[asyncio.AbstractEventLoop, list[_Write]] = {}  # writes for the next group

    def _session_for(self, loop: asyncio.AbstractEventLoop) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed or self._session_loop is not loop:
            # A session belongs to one event loop; serverless handlers often run a new
            # loop per invocation (asyncio.run) with a module-level instance.
            self._session_loop = loop
            # sqld left some requests unanswered with ~48 in flight at once; 16 was always fine.
            connector = aiohttp.TCPConnector(limit=_MAX_CONNECTIONS)
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout, connector=connector
            )
        return self._session

    def _enqueue(self, item: _Queued, loop: asyncio.AbstractEventLoop) -> None:
        queued = self._queued.get(loop)
        if queued is None:
            queued = self._queued[loop] = []
            loop.call_soon(self._send_queued, loop)
        queued.append(item)

    def _send_queued(self, loop: asyncio.AbstractEventLoop) -> None:
        queued = self._queued.pop(loop)
        writes = any(isinstance(item, _Write) for item in queued)
        if writes and self._writing.get(loop, 0) >= _GROUPS_IN_FLIGHT:
            # sqld runs one writer at a time, and spun its CPU with dozens waiting for its
            # lock (4 processes x 16 requests): these writes join the next group instead.
            self._held.setdefault(loop, []).extend(item for item in queued if isinstance(item, _Write))
            queued = [item for item in queued if isinstance(item, _Read)]
            writes = False
        if not queued:
            return
        if writes:
            self._writing[loop] = self._writing.get(loop, 0) + 1
        task = loop.create_task(self._send(queued, loop))
        self._sending.add(task)
        task.add_done_callback(functools.partial(self._sent, loop, writes))

    def _sent(self, loop: asyncio.AbstractEventLoop, wrote: bool, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if wrote:
            self._writing[loop] -= 1
            if not self._writing[loop]:
                del self._writing[loop]
            for item in self._held.pop(loop, []):
                if not item.future.done():
                    self._enqueue(item, loop)
        if not task.cancelled() and task.exception() is not None:
            # _send answers its futures before anything can fail; this is only reported.
            _logger.error("sending a Hrana pipeline failed", exc_info=task.exception())

    async def _send(self, queued: list[_Queued], loop: asyncio.AbstractEventLoop) -> None:
        """Post ``queued``; what found the database busy is sent again, together, after a backoff.

        Every future gets its answer, or the failure. A caller that has gone (cancelled)
        is not sent again: its first request was made all the same.
        """
        delay = _FIRST_BACKOFF
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                answers = await self._post_once(queued, loop)
            except BaseException as exc:
                for item in queued:
                    if not item.future.done():
                        item.future.set_exception(exc)
                if not isinstance(exc, Exception):
                    raise
                await self._forget_session()
                return
            again: list[_Queued] = []
            for item, answer in answers:
                if item.future.done():
                    continue
                if isinstance(answer, HranaError) and answer.retryable and attempt < _BUSY_RETRIES:
                    again.append(item)
                elif isinstance(answer, HranaError):
                    item.future.set_exception(answer)
                else:
                    item.future.set_result(answer)  # type: ignore[arg-type]  # rows of its own kind
            if not again:
                return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _MAX_BACKOFF)
            queued = [item for item in again if not item.future.done()]
            if not queued:
                return

    async def _post_once(self, queued: list[_Queued], loop: asyncio.AbstractEventLoop) -> list[_Answer]:
        """One pipeline: the writes in groups (one transaction each), then the reads."""
        writes = [item for item in queued if isinstance(item, _Write)]
        groups = [_Group(writes[i : i + _MAX_GROUP]) for i in range(0, len(writes), _MAX_GROUP)]
        reads = [item for item in queued if isinstance(item, _Read)]
        requests = [group.request for group in groups]
        requests += [{"type": "execute", "stmt": _stmt(*read.statement)} for read in reads]
        body = _encoder.encode({"baton": None, "requests": [*requests, {"type": "close"}]})
        results = _answers(await self._post(body, loop), len(requests))
        answers: list[_Answer] = []
        for group, result in zip(groups, results[: len(groups)], strict=True):
            if isinstance(result, _Failed):
                answers += [(write, _error(result.error)) for write in group.writes]
            elif isinstance(result.response, _Batch):
                answers += group.answer(result.response.result)
            else:
                raise ProtocolError(f"a {_kind(result.response)} answer to a batch")
        for read, result in zip(reads, results[len(groups) :], strict=True):
            if isinstance(result, _Failed):
                answers.append((read, _error(result.error)))
            elif isinstance(result.response, _Execute):
                answers.append((read, _rows(result.response.result)))
            else:
                raise ProtocolError(f"a {_kind(result.response)} answer to an execute")
        return answers

    async def _forget_session(self) -> None:
        # After a failed request its connection is suspect; and a caller whose first use
        # failed (``async with`` refused) may never call close(), so nothing is left open.
        if len(self._sending) <= 1 and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _post(self, body: bytes, loop: asyncio.AbstractEventLoop) -> bytes:
        async with self._session_for(loop).post(self._endpoint, data=body) as response:
            payload = await response.read()
            if response.status != 200:
                raise HttpStatusError(response.status, payload.decode(errors="replace"))
            return payload

    async def execute(self, sql: str, params: Sequence[Value]) -> list[Row]:
        """Rows of one statement, outside any transaction of the others."""
        future: asyncio.Future[list[Row]] = asyncio.get_running_loop().create_future()
        self._enqueue(_Read((sql, params), future), future.get_loop())
        return await future

    async def batch(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """Rows of each statement, run all or nothing in the transaction of this pass's writes."""
        future: asyncio.Future[list[list[Row]]] = asyncio.get_running_loop().create_future()
        self._enqueue(_Write(statements, future), future.get_loop())
        return await future

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
