"""The local-file driver: stdlib ``sqlite3`` on one dedicated thread, with group commit.

A thread hop costs several times a SQLite statement, so the thread takes every
operation waiting in its queue at once and runs them in one ``BEGIN IMMEDIATE``
transaction (each inside its own savepoint, so one failing operation does not
undo the others), then answers them all with a single wake-up of the loop.
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
        # The connection is shared by the database thread and, for write_blocking(),
        # by step threads; the lock serialises them (sqlite3 releases the GIL meanwhile).
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @property
    def url(self) -> str:
        return f"file:{self._path}"

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        return (await self._submit(((sql, params),), write=False))[0]

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        return await self._submit(statements, write=True)

    async def _submit(self, statements: Sequence[Statement], *, write: bool) -> list[list[Row]]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="durably-sqlite", daemon=True)
            self._thread.start()
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
        self._queue.put(self._pending.pop(loop))

    async def close(self) -> None:
        """Stop the thread and close the connection; a later use opens them again."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)

    def write_blocking(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """``write()`` for a thread that is not the event loop's: no hop to the loop at all.

        A sync step's thread stores the step's result this way right after computing it.
        """
        try:
            with self._lock:
                conn = self._connection()
                if len(statements) == 1:
                    return self._run(conn, statements)
                conn.execute("BEGIN IMMEDIATE")
                try:
                    rows = self._run(conn, statements)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return rows
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    # --- on the database thread -------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        if self._path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    def _serve(self) -> None:
        running = True
        while running:
            first = self._queue.get()
            if first is None:
                break
            jobs = list(first)
            while len(jobs) < _MAX_GROUP:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    running = False
                    break
                jobs.extend(more)
            try:
                with self._lock:
                    answers = self._run_group(self._connection(), jobs)
            except Exception as exc:  # answer every waiter, whatever went wrong
                error = self._error(exc)
                answers = [(job.future, error) for job in jobs]
            self._answer(jobs, answers)
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> list[Answer]:
        if len(jobs) == 1 and (not jobs[0].write or len(jobs[0].statements) == 1):
            # A read needs no transaction; one write statement is a transaction of its own
            # (a writing statement takes the write lock before it reads).
            return [(jobs[0].future, self._run(conn, jobs[0].statements))]
        conn.execute("BEGIN IMMEDIATE")
        try:
            if len(jobs) == 1:
                answers: list[Answer] = [(jobs[0].future, self._run(conn, jobs[0].statements))]
            else:
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
            answer: Any = self._run(conn, statements)
        except sqlite3.Error as exc:
            conn.execute("ROLLBACK TO durably_op")
            answer = self._error(exc)
        conn.execute("RELEASE durably_op")
        return answer

    @staticmethod
    def _run(conn: sqlite3.Connection, statements: Sequence[Statement]) -> list[list[Row]]:
        return [conn.execute(sql, params).fetchall() for sql, params in statements]

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
