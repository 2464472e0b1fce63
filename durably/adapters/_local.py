"""The local-file driver: stdlib ``sqlite3``, on the loop when it cannot wait, else on a thread.

A thread hop (~100 µs here) costs several times a statement in WAL mode (~20 µs),
so an operation first runs on the event loop's own connection, which is set up
never to wait: ``busy_timeout = 0`` (another writer's lock makes it give up at
once, having changed nothing) and no automatic checkpoints (the only step that
fsyncs under ``synchronous = NORMAL``). Whatever would wait goes to the database
thread, which has a busy timeout, runs checkpoints, and takes every operation
queued at once in one ``BEGIN IMMEDIATE`` transaction (each in its own savepoint,
so one failing operation does not undo the others), answering them all with a
single wake-up of the loop.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio

from durably._storage._driver import Row, Statement, Value
from durably._storage._sql import SqlStorage
from durably._threads import Answer, answer
from durably.errors import StorageError

_MAX_GROUP = 128
_BUSY_TIMEOUT_MS = 10_000
_CHECKPOINT_EVERY = 500  # writes on the loop's connection between background checkpoints


def _is_busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _run(conn: sqlite3.Connection, statements: Sequence[Statement]) -> list[list[Row]]:
    return [conn.execute(sql, params).fetchall() for sql, params in statements]


def _run_atomically(conn: sqlite3.Connection, statements: Sequence[Statement]) -> list[list[Row]]:
    if len(statements) == 1:
        return _run(conn, statements)  # a writing statement takes the lock before it reads
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = _run(conn, statements)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return rows


class _NoWaitConnection:
    """The event loop's own connection: runs an operation only if it needs no waiting."""

    def __init__(self, path: str) -> None:
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        self._conn.execute("PRAGMA busy_timeout = 0")
        if self._conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            # Switching to WAL may wait for other connections: the database thread does it.
            self._conn.close()
            raise sqlite3.OperationalError("database is locked (not in WAL mode yet)")
        self._conn.execute("PRAGMA synchronous = NORMAL")
        self._conn.execute("PRAGMA wal_autocheckpoint = 0")  # the database thread checkpoints
        self.thread = threading.get_ident()
        self.writes = 0

    def run(self, statements: Sequence[Statement], *, write: bool) -> list[list[Row]] | None:
        """The rows, or ``None`` if another connection holds a lock (nothing was changed)."""
        try:
            rows = _run_atomically(self._conn, statements) if write else _run(self._conn, statements)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc):
                return None
            raise
        self.writes += write
        return rows

    def close(self) -> None:
        self._conn.close()


class _Job(NamedTuple):
    statements: Sequence[Statement]
    write: bool
    future: asyncio.Future[list[list[Row]]]
    loop: asyncio.AbstractEventLoop


class LocalFileDriver:
    """Runs statements on a SQLite file (or ``:memory:``) from one worker thread."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._queue: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        # Operations submitted during one pass of an event loop, handed over together.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._thread: threading.Thread | None = None
        # :memory: is private to one connection, so it lives on the thread's only.
        self._no_wait: _NoWaitConnection | None = None
        self._no_wait_possible = path != ":memory:"

    @property
    def url(self) -> str:
        return f"file:{self._path}"

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        return (await self._submit(((sql, params),), write=False))[0]

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        return await self._submit(statements, write=True)

    async def _submit(self, statements: Sequence[Statement], *, write: bool) -> list[list[Row]]:
        if self._no_wait_possible:
            rows = self._without_waiting(statements, write=write)
            if rows is not None:
                # Still a point where other tasks run and cancellation arrives, as on a thread.
                await asyncio.sleep(0)
                return rows
        return await self._on_thread(statements, write=write)

    def _without_waiting(self, statements: Sequence[Statement], *, write: bool) -> list[list[Row]] | None:
        try:
            if self._no_wait is None:
                self._no_wait = _NoWaitConnection(self._path)
        except sqlite3.OperationalError as exc:
            if _is_busy(exc) or "locked" in str(exc):
                return None
            raise self._error(exc) from exc
        try:
            if self._no_wait.thread != threading.get_ident():
                return None  # a second event loop in another thread: use the database thread
            rows = self._no_wait.run(statements, write=write)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        if write and self._no_wait.writes >= _CHECKPOINT_EVERY:
            self._no_wait.writes = 0
            self._checkpoint_in_background()
        return rows

    def _checkpoint_in_background(self) -> None:
        self._start_thread()
        loop = asyncio.get_running_loop()
        job = _Job((("PRAGMA wal_checkpoint(PASSIVE)", ()),), False, loop.create_future(), loop)
        self._queue.put([job])

    def _start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, args=(self._queue,), name="durably-sqlite", daemon=True
            )
            self._thread.start()

    async def _on_thread(self, statements: Sequence[Statement], *, write: bool) -> list[list[Row]]:
        self._start_thread()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[list[Row]]] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append(_Job(statements, write, future, loop))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        # A run's completion and the worker's next claim, submitted by two tasks in one
        # pass of the loop, reach the database thread together: one commit, one wake-up.
        self._start_thread()  # again: close() may have ended the thread meanwhile
        self._queue.put(self._pending.pop(loop))

    async def close(self) -> None:
        """Stop the thread and close the connections; a later use opens them again."""
        no_wait, self._no_wait = self._no_wait, None
        if no_wait is not None:
            no_wait.close()
        thread, self._thread = self._thread, None
        if thread is not None:
            # The thread ends by itself after its current group (a busy wait can take
            # seconds): the caller's cancellation and timeouts are honoured, and a later
            # use starts a new thread on a new queue.
            jobs, self._queue = self._queue, queue.SimpleQueue()
            jobs.put(None)
            await anyio.to_thread.run_sync(thread.join, abandon_on_cancel=True)

    # --- on the database thread -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if self._path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _serve(self, jobs_queue: queue.SimpleQueue[list[_Job] | None]) -> None:
        conn: sqlite3.Connection | None = None
        running = True
        while running:
            first = jobs_queue.get()
            if first is None:
                break
            jobs = list(first)
            while len(jobs) < _MAX_GROUP:
                try:
                    more = jobs_queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    running = False
                    break
                jobs.extend(more)
            try:
                if conn is None:
                    conn = self._connect()
                answers = self._run_group(conn, jobs)
            except Exception as exc:  # answer every waiter, whatever went wrong
                error = self._error(exc)
                answers = [(job.future, error) for job in jobs]
            self._answer(jobs, answers)
        if conn is not None:
            conn.close()

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[Answer]:
        if len(jobs) == 1:
            job = jobs[0]
            run = _run_atomically if job.write else _run
            return [(job.future, run(conn, job.statements))]
        conn.execute("BEGIN IMMEDIATE")
        try:
            answers = [(job.future, self._run_isolated(conn, job.statements)) for job in jobs]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return answers

    def _run_isolated(self, conn: sqlite3.Connection, statements: Sequence[Statement]) -> Any:
        """One operation of a group: its failure undoes only its own statements."""
        conn.execute("SAVEPOINT durably_op")
        try:
            answer: Any = _run(conn, statements)
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO durably_op")
            answer = self._error(exc)
        conn.execute("RELEASE durably_op")
        return answer

    def _error(self, exc: Exception) -> StorageError:
        message = str(exc)
        transient = "locked" in message or "busy" in message
        error = StorageError(f"{self.url}: {message}", transient=transient)
        error.__cause__ = exc
        return error

    @staticmethod
    def _answer(jobs: list[_Job], answers: list[Answer]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Answer]] = {}
        for job, job_answer in zip(jobs, answers, strict=True):
            by_loop.setdefault(job.loop, []).append(job_answer)
        for loop, loop_answers in by_loop.items():
            answer(loop, loop_answers)


class LocalFileStorage(SqlStorage):
    """Storage in a local SQLite file (WAL), or ``:memory:``; the default adapter."""

    def __init__(self, path: str) -> None:
        super().__init__(LocalFileDriver(path))
