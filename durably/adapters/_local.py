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
from typing import Any, Literal, NamedTuple

import anyio

from durably._storage._driver import Row, Statement, Value
from durably._storage._sql import SqlStorage
from durably._threads import Answer, answer
from durably.adapters._checkpoint import JOURNAL_SIZE_LIMIT, Checkpointer
from durably.errors import ConfigurationError, StorageError

_MAX_GROUP = 128
_BUSY_TIMEOUT_MS = 10_000
_CHECKPOINT_EVERY = 500  # writes on one connection between checkpoints
_RISK_EVERY = 50  # writes between looks at whether the log could fill the disk
# Worth trying again: another writer, or a full disk (space may be freed; see _is_full).
_TRANSIENT = {sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED, sqlite3.SQLITE_FULL}


def _code(exc: BaseException) -> int:
    return int(getattr(exc, "sqlite_errorcode", None) or 0)


def _is_transient(exc: BaseException) -> bool:
    return _code(exc) & 0xFF in _TRANSIENT or _is_full(exc)


def _is_busy(exc: sqlite3.Error) -> bool:
    return _code(exc) & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _is_full(exc: BaseException) -> bool:
    # A -shm file that cannot grow is a full disk too (tmpfs, /dev/shm).
    return _code(exc) in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE)


def check_path(path: object) -> str:
    """``path`` if SQLite can open it as a file name, else ``ConfigurationError`` saying why."""
    if not isinstance(path, str) or not path:
        raise ConfigurationError(f"a local database path must be a non-empty string, got {path!r}")
    if "\0" in path:
        raise ConfigurationError(f"a local database path cannot contain a NUL character: {path!r}")
    return path


def _open(path: str, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection in autocommit mode; closed again if its setup fails."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, cached_statements=256)
    try:
        conn.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        if path != ":memory:":
            # Checked before anything else reads the file, so a non-database fails here.
            conn.execute("PRAGMA schema_version").fetchone()
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # checkpoints are ours, and checked
    except BaseException:
        conn.close()
        raise
    return conn


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


class _NotInWalMode(Exception):
    """Switching to WAL may wait for other connections: the database thread does it."""


Synchronous = Literal["normal", "full"]


def check_synchronous(value: object) -> Synchronous:
    """``synchronous=`` as given, or ``ConfigurationError`` naming the accepted values."""
    if value not in ("normal", "full"):
        raise ConfigurationError(f"synchronous must be 'normal' or 'full', got {value!r}")
    return value


class _NoWaitConnection:
    """The event loop's own connection: runs an operation only if it needs no waiting."""

    def __init__(self, path: str, synchronous: Synchronous) -> None:
        self._conn = _open(path, 0)
        try:
            in_wal = self._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        except BaseException:
            self._conn.close()
            raise
        if not in_wal:
            self._conn.close()
            raise _NotInWalMode
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


_Item = list[_Job] | None  # a group of operations (empty: only a wake-up), or stop


class LocalFileDriver:
    """Runs statements on a SQLite file (or ``:memory:``) from one worker thread."""

    def __init__(self, path: str, *, synchronous: Synchronous = "normal") -> None:
        self._path = check_path(path)
        self._synchronous = check_synchronous(synchronous)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        # Operations submitted during one pass of an event loop, handed over together.
        self._pending: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
        self._thread: threading.Thread | None = None
        # :memory: is private to one connection, so it lives on the thread's only.
        self._no_wait: _NoWaitConnection | None = None
        self._no_wait_possible = path != ":memory:"
        self._loop_thread: int | None = None  # the thread whose loop owns the no-wait connection
        self.checkpointer = Checkpointer(self.url, f"{path}-wal", busy_timeout_ms=_BUSY_TIMEOUT_MS)

    @property
    def local(self) -> bool:
        return True

    @property
    def url(self) -> str:
        return f"file:{self._path}"

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        return (await self._submit(((sql, params),), write=False))[0]

    async def read_primary(self, statements: Sequence[Statement]) -> list[list[Row]]:
        return await self._submit(statements, write=False)  # the file is the primary

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
        if self._loop_thread is None:
            self._loop_thread = threading.get_ident()
        elif self._loop_thread != threading.get_ident() or (write and self.checkpointer.hold_writes):
            return None  # a second event loop in another thread, or a checkpoint first: the thread
        try:
            if self._no_wait is None:
                self._no_wait = _NoWaitConnection(self._path, self._synchronous)
            rows = self._no_wait.run(statements, write=write)
        except _NotInWalMode:
            return None
        except (sqlite3.Error, OverflowError, ValueError, TypeError) as exc:  # as on the thread
            if self._no_wait is None and isinstance(exc, sqlite3.Error) and _is_busy(exc):
                return None  # not in WAL mode yet, or another connection is switching it
            raise self._error(exc) from exc
        if write and self._checkpoint_due(self._no_wait.writes):
            self._no_wait.writes = 0
            self._request_checkpoint()
        return rows

    def _checkpoint_due(self, writes: int) -> bool:
        """After this many writes on one connection, whether to ask for a checkpoint."""
        if writes >= _CHECKPOINT_EVERY:
            return True
        return writes > 0 and writes % _RISK_EVERY == 0 and self.checkpointer.at_risk()

    def _request_checkpoint(self, *, on_thread: bool = False) -> None:
        """Have the database thread checkpoint, between groups; nobody waits for it."""
        if self.checkpointer.wanted:
            return  # already asked: one checkpoint answers every request made before it
        if self.checkpointer.must_truncate():
            self.checkpointer.hold_writes = True  # a continuous writer would starve a TRUNCATE
        self.checkpointer.wanted = True
        if not on_thread:
            self._start_thread()
            self._queue.put([])  # wakes the thread

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
        self._loop_thread = None
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
        self.checkpointer.wanted = False  # a request the thread did not see dies with it

    # --- on the database thread -------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = _open(self._path, _BUSY_TIMEOUT_MS)
        try:
            if self._path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _take(jobs_queue: queue.SimpleQueue[_Item]) -> tuple[list[_Job], bool]:
        """The next group of operations (waiting for one) and whether to go on afterwards."""
        first = jobs_queue.get()
        if first is None:
            return [], False
        jobs = list(first)
        while len(jobs) < _MAX_GROUP:
            try:
                more = jobs_queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return jobs, False
            jobs.extend(more)
        return jobs, True

    def _serve(self, jobs_queue: queue.SimpleQueue[_Item]) -> None:
        conn: sqlite3.Connection | None = None
        writes = 0
        running = True
        while running:
            jobs, running = self._take(jobs_queue)
            if jobs:
                try:
                    if conn is None:
                        conn = self._connect()
                    answers = self._run_group(conn, jobs)
                    writes += any(job.write for job in jobs)
                except Exception as exc:  # answer every waiter, whatever went wrong
                    error = self._error(exc, on_thread=True)
                    answers = [(job.future, error) for job in jobs]
                self._answer(jobs, answers)
            if self._checkpoint_due(writes):
                writes = 0
                self._request_checkpoint(on_thread=True)
            if conn is not None and self._no_wait_possible and self.checkpointer.wanted:
                self.checkpointer.run(conn)  # never inside a transaction; reports its own failures
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
        except Exception as exc:  # whatever it is, it is this operation's alone
            if not conn.in_transaction:
                raise  # SQLite rolled the whole group back (a full disk, say): all of it failed
            conn.execute("ROLLBACK TO durably_op")
            answer = self._error(exc, on_thread=True)
        conn.execute("RELEASE durably_op")
        return answer

    def _error(self, exc: Exception, *, on_thread: bool = False) -> StorageError:
        if _is_full(exc):
            # Truncating the write-ahead log is what gives the space back.
            self.checkpointer.truncate = True
            self._request_checkpoint(on_thread=on_thread)
        error = StorageError(f"{self.url}: {exc}", transient=_is_transient(exc))
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
    """Storage in a local SQLite file (WAL), or ``:memory:``; the default adapter.

    ``synchronous="normal"`` (the default) survives a killed process but may lose the last
    commits to a power loss; ``"full"`` fsyncs every commit (docs/guarantees.md).
    """

    def __init__(self, path: str, *, synchronous: Synchronous = "normal") -> None:
        super().__init__(LocalFileDriver(path, synchronous=synchronous))
