"""The embedded-replica driver: reads from a local ``libsql`` replica file, writes to the primary.

Writes go to the primary as one atomic request through the remote driver (a
``libsql`` transaction would cost a delegated round trip per statement and hold
the primary's write lock across them). After each write the replica syncs in
the background, so this process reads its own writes; it also syncs every
``sync_interval``. ``libsql`` is synchronous, so its connection lives on one
thread. Pinned to ``libsql==0.1.8``: later wheels cannot sync from sqld 0.24.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import anyio
import structlog

from durably._storage._driver import Row, Statement, Value
from durably._storage._sql import SqlStorage
from durably._threads import answer
from durably.adapters._remote import RemoteDriver, http_base
from durably.errors import StorageError

_logger = structlog.get_logger("durably")


class _Read(NamedTuple):
    sql: str
    params: Sequence[Value]
    future: asyncio.Future[list[Row]]
    loop: asyncio.AbstractEventLoop


class _Sync(NamedTuple):
    """Sync so that reads see the primary as of write number ``upto``."""

    upto: int


_PERIODIC = _Sync(-1)


class ReplicaDriver:
    """A local replica for reads plus the primary for writes; no I/O before first use."""

    def __init__(self, path: str, *, sync_url: str, auth_token: str | None, sync_interval: float) -> None:
        self._path = path
        self._primary = RemoteDriver(sync_url, auth_token=auth_token)
        self._sync_url, _, url_token = http_base(sync_url)
        self._auth_token = auth_token or url_token or ""
        self._sync_interval = sync_interval
        self._queue: queue.SimpleQueue[_Read | _Sync | None] = queue.SimpleQueue()
        self._writes = 0  # counted on the loop's thread, read on the replica's
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        return f"file:{self._path} (replica of {self._primary.url})"

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        if self._closed:
            raise StorageError(f"{self.url}: storage is closed")
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Row]] = loop.create_future()
        self._queue.put(_Read(sql, params, future, loop))
        return await future

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        rows = await self._primary.write(statements)
        self._writes += 1
        if self._thread is not None:
            self._queue.put(_Sync(self._writes))  # reads queued after this see the write
        return rows

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._primary.close()
        if self._thread is not None:
            self._queue.put(None)
            thread = self._thread
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="durably-replica", daemon=True)
            self._thread.start()

    # --- on the replica thread ------------------------------------------------------

    def _serve(self) -> None:
        conn: Any = None
        synced_at = 0.0
        synced_upto = 0
        while True:
            timeout = max(0.0, synced_at + self._sync_interval - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout) if conn is not None else self._queue.get()
            except queue.Empty:
                item = _PERIODIC
            if item is None:
                break
            try:
                if conn is None:
                    conn = self._connect()
                    synced_at = time.monotonic()
                if isinstance(item, _Sync):
                    # Several writes queued several syncs; the first one covers them all.
                    if item is _PERIODIC or item.upto > synced_upto:
                        upto = self._writes
                        conn.sync()
                        synced_at, synced_upto = time.monotonic(), upto
                    continue
            except ValueError as exc:
                error = StorageError(f"{self.url}: {exc}", transient=True)
                _logger.warning("replica sync failed", url=self.url, error=str(exc))
                if isinstance(item, _Read):
                    answer(item.loop, [(item.future, error)])
                continue
            assert isinstance(item, _Read)
            try:
                value: Any = conn.execute(item.sql, tuple(item.params)).fetchall()
            except ValueError as exc:
                value = StorageError(f"{self.url}: {exc}")
            answer(item.loop, [(item.future, value)])
        if conn is not None:
            conn.close()

    def _connect(self) -> Any:
        # libsql logs every replication handshake at INFO to stdout unless told otherwise.
        os.environ.setdefault("RUST_LOG", "error")
        import libsql

        conn = libsql.connect(
            self._path, sync_url=self._sync_url, auth_token=self._auth_token, isolation_level=None
        )
        conn.sync()
        return conn


class EmbeddedReplicaStorage(SqlStorage):
    """Storage in a local replica file of a remote libSQL primary (``file:PATH`` + ``sync_url``)."""

    def __init__(
        self, path: str, *, sync_url: str, auth_token: str | None = None, sync_interval: float = 1.0
    ) -> None:
        super().__init__(
            ReplicaDriver(path, sync_url=sync_url, auth_token=auth_token, sync_interval=sync_interval)
        )
