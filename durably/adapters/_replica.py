"""The embedded-replica driver: reads from a local ``libsql`` replica file, writes to the primary.

Writes go to the primary as one atomic request through the remote driver (a
``libsql`` transaction would cost a delegated round trip per statement and hold
the primary's write lock across them). The first read after this process's own
writes syncs first, so it reads its writes; the replica also syncs every
``sync_interval``. Syncs are kept few on purpose: ``libsql`` holds the GIL during
its network calls. It is synchronous, so its connection lives on one thread.
``libsql`` comes with the ``durably[replica]`` extra, pinned below 0.1.9: later
wheels cannot sync from sqld 0.24.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import anyio
import structlog

from durably._storage._driver import Row, Statement, Value
from durably._storage._sql import SqlStorage
from durably._threads import answer
from durably.adapters._remote import RemoteDriver, check_timeout, http_base
from durably.errors import ConfigurationError, StorageError

_logger = structlog.get_logger("durably")


class _Read(NamedTuple):
    sql: str
    params: Sequence[Value]
    future: asyncio.Future[list[Row]]
    loop: asyncio.AbstractEventLoop


class _Behind(Exception):
    """The replica could not sync this process's own writes: the primary answers instead."""


_JOIN_SECONDS = 30.0  # a failing sync takes ~3 s; a first sync of a big log up to ~13 s
_PERIODIC = object()  # the replica thread woke up to sync on schedule
_STOP = None


def _import_libsql() -> Any:
    try:
        import libsql
    except ImportError as exc:
        raise ConfigurationError(
            "an embedded replica (sync_url=) needs the libsql package: pip install 'durably[replica]'"
        ) from exc
    return libsql


class _Shared:
    """What the event loop's side and the replica thread tell each other."""

    def __init__(self) -> None:
        self.writes = 0  # this process's writes, counted on the loop's thread
        self.behind = False  # set on the replica's thread: a sync owed to our writes failed


class ReplicaDriver:
    """A local replica for reads plus the primary for writes; no I/O before first use.

    Reads go to the primary instead while the replica cannot sync this process's own
    writes (SPEC §15), and when the replica thread has not answered within ``timeout``.
    """

    def __init__(
        self,
        path: str,
        *,
        sync_url: str,
        auth_token: str | None,
        sync_interval: float,
        timeout: float | None = None,
    ) -> None:
        self._libsql = _import_libsql()
        self._path = path
        self._primary = RemoteDriver(sync_url, auth_token=auth_token, timeout=timeout)
        self._patience = check_timeout(timeout)
        self._sync_url, _, url_token = http_base(sync_url)
        self._auth_token = auth_token or url_token or ""
        self._sync_interval = sync_interval
        self._shared = _Shared()
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def local(self) -> bool:
        return False

    @property
    def url(self) -> str:
        return f"file:{self._path} (replica of {self._primary.url})"

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        if self._shared.behind:
            return await self._primary.read(sql, params)
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Row]] = loop.create_future()
        self._queue.put(_Read(sql, params, future, loop))
        try:
            return await asyncio.wait_for(future, self._patience)
        except (_Behind, TimeoutError):
            # Not synced with our own writes, or stuck in a long sync: the primary has it all.
            return await self._primary.read(sql, params)

    async def read_primary(self, statements: Sequence[Statement]) -> list[list[Row]]:
        return await self._primary.read_primary(statements)

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        try:
            return await self._primary.write(statements)
        finally:
            # The next read syncs first, so it sees this write: also one that failed, since
            # a write whose answer was lost (a timeout) may have landed all the same.
            self._shared.writes += 1

    async def close(self) -> None:
        """Close the primary's connections and the replica; a later use opens them again."""
        await self._primary.close()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join, _JOIN_SECONDS)
            if thread.is_alive():  # stuck in libsql; a daemon thread, it cannot hold the process
                _logger.warning("replica thread did not stop", url=self.url, waited=_JOIN_SECONDS)

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # A queue per thread: a stopping thread never takes a read meant for the next one.
            self._queue = queue.SimpleQueue()
            replica = _Replica(self.url, self._connect, self._sync_interval, self._shared)
            self._thread = threading.Thread(
                target=replica.serve, args=(self._queue,), name="durably-replica", daemon=True
            )
            self._thread.start()

    def _connect(self) -> Any:
        """On the replica thread: open the replica file and bring it up to date."""
        # libsql logs every replication handshake at INFO to stdout unless told otherwise.
        os.environ.setdefault("RUST_LOG", "error")
        conn = self._libsql.connect(
            self._path, sync_url=self._sync_url, auth_token=self._auth_token, isolation_level=None
        )
        conn.sync()
        return conn


def _reply(item: object, value: Any) -> None:
    if isinstance(item, _Read):
        answer(item.loop, [(item.future, value)])


class _Replica:
    """The replica thread: its libsql connection, and when it last synced."""

    def __init__(self, url: str, connect: Callable[[], Any], interval: float, shared: _Shared) -> None:
        self._url = url
        self._connect = connect
        self._interval = interval
        self._shared = shared
        self._conn: Any = None
        self._synced_at = 0.0  # monotonic time of the last sync attempt that counts
        self._synced_upto = 0  # the writes the last successful sync covered
        self._retry_at = 0.0  # after a failed sync (libsql holds the GIL ~3 s doing one), back off
        self._backoff = 1.0

    def serve(self, items: queue.SimpleQueue[_Read | None]) -> None:
        try:
            while self._serve_one(items):
                pass
        finally:
            if self._conn is not None:
                self._conn.close()
            # Whatever ended the thread, nobody is left waiting on it.
            while not items.empty():
                _reply(items.get(), StorageError(f"{self._url} was closed", transient=True))

    def _serve_one(self, items: queue.SimpleQueue[_Read | None]) -> bool:
        """Take one read (or a scheduled sync) and answer it; False once told to stop."""
        wait = None if self._conn is None else max(0.0, self._synced_at + self._interval - time.monotonic())
        try:
            item: _Read | object | None = items.get(timeout=wait)
        except queue.Empty:
            item = _PERIODIC
        if item is _STOP:
            return False
        try:
            _reply(item, self._answer(item))
        except BaseException as exc:  # libsql panics raise pyo3's PanicException, a BaseException
            _logger.exception("replica thread failed", url=self._url)
            _reply(item, StorageError(f"{self._url}: {type(exc).__name__}: {exc}", transient=True))
        return True

    def _answer(self, item: object) -> Any:
        if self._conn is None:
            upto = self._shared.writes
            try:
                self._conn = self._connect()
            except BaseException as exc:  # a libsql panic is a BaseException
                return StorageError(f"cannot open {self._url}: {exc}", transient=True)
            self._synced_at, self._synced_upto = time.monotonic(), upto
        owed = self._shared.writes > self._synced_upto
        if (item is _PERIODIC or owed) and time.monotonic() >= self._retry_at:
            self._sync()
        if not isinstance(item, _Read):
            return None
        if self._shared.behind:
            return _Behind()
        try:
            return self._conn.execute(item.sql, tuple(item.params)).fetchall()
        except ValueError as exc:
            return StorageError(f"{self._url}: {exc}")

    def _sync(self) -> None:
        upto = self._shared.writes
        now = time.monotonic()
        try:
            self._conn.sync()
        except BaseException as exc:  # a libsql panic is a BaseException
            # Reads of our own writes go to the primary until a sync succeeds.
            self._retry_at, self._backoff = now + self._backoff, min(self._backoff * 2, 30.0)
            self._synced_at = now
            self._shared.behind = upto > self._synced_upto
            _logger.warning("replica sync failed", url=self._url, error=f"{type(exc).__name__}: {exc}")
            return
        self._synced_at, self._synced_upto, self._backoff = time.monotonic(), upto, 1.0
        self._shared.behind = False


class EmbeddedReplicaStorage(SqlStorage):
    """Storage in a local replica file of a remote libSQL primary (``file:PATH`` + ``sync_url``).

    ``timeout`` bounds each request to the primary in seconds (default 2).
    """

    def __init__(
        self,
        path: str,
        *,
        sync_url: str,
        auth_token: str | None = None,
        sync_interval: float = 1.0,
        timeout: float | None = None,
    ) -> None:
        super().__init__(
            ReplicaDriver(
                path, sync_url=sync_url, auth_token=auth_token, sync_interval=sync_interval, timeout=timeout
            )
        )
