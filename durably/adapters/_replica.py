"""The embedded-replica driver: reads from a local ``libsql`` replica file, writes to the primary.

Writes go to the primary as one atomic request through the remote driver (a
``libsql`` transaction would cost a delegated round trip per statement and hold
the primary's write lock across them). The first read after this process's own
writes syncs first, so it reads its writes; the replica also syncs every
``sync_interval``. Syncs are kept few on purpose: ``libsql`` holds the GIL during
its network calls. It is synchronous, so its connection lives on one thread.
Pinned to ``libsql==0.1.8``: later wheels cannot sync from sqld 0.24.
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


_PERIODIC = object()  # the replica thread woke up to sync on schedule
_STOP = None


class ReplicaDriver:
    """A local replica for reads plus the primary for writes; no I/O before first use."""

    def __init__(self, path: str, *, sync_url: str, auth_token: str | None, sync_interval: float) -> None:
        self._path = path
        self._primary = RemoteDriver(sync_url, auth_token=auth_token)
        self._sync_url, _, url_token = http_base(sync_url)
        self._auth_token = auth_token or url_token or ""
        self._sync_interval = sync_interval
        self._queue: queue.SimpleQueue[_Read | None] = queue.SimpleQueue()
        self._writes = 0  # counted on the loop's thread, read on the replica's
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"file:{self._path} (replica of {self._primary.url})"

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Row]] = loop.create_future()
        self._queue.put(_Read(sql, params, future, loop))
        return await future

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        rows = await self._primary.write(statements)
        self._writes += 1  # the next read syncs first, so it sees this write
        return rows

    async def close(self) -> None:
        """Close the primary's connections and the replica; a later use opens them again."""
        await self._primary.close()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(thread.join)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="durably-replica", daemon=True)
            self._thread.start()

    # --- on the replica thread ------------------------------------------------------

    def _serve(self) -> None:
        conn: Any = None
        synced_at = 0.0  # monotonic time of the last successful sync
        synced_upto = 0  # the writes that sync covered
        retry_at = 0.0  # after a failed sync (libsql holds the GIL ~3 s doing one), back off
        backoff = 1.0
        while True:
            wait = None if conn is None else max(0.0, synced_at + self._sync_interval - time.monotonic())
            try:
                item: _Read | object | None = self._queue.get(timeout=wait)
            except queue.Empty:
                item = _PERIODIC
            if item is _STOP:
                break
            if conn is None:
                try:
                    conn = self._connect()
                except ValueError as exc:
                    self._reply(item, StorageError(f"cannot open {self.url}: {exc}", transient=True))
                    continue
                synced_at = time.monotonic()
            now = time.monotonic()
            if (item is _PERIODIC or self._writes > synced_upto) and now >= retry_at:
                upto = self._writes
                try:
                    conn.sync()
                    synced_at, synced_upto, backoff = time.monotonic(), upto, 1.0
                except ValueError as exc:
                    # Reads go on from the local copy; the next sync tries again later.
                    retry_at, backoff = now + backoff, min(backoff * 2, 30.0)
                    synced_at = now
                    _logger.warning("replica sync failed", url=self.url, error=str(exc))
            if isinstance(item, _Read):
                try:
                    value: Any = conn.execute(item.sql, tuple(item.params)).fetchall()
                except ValueError as exc:
                    value = StorageError(f"{self.url}: {exc}")
                self._reply(item, value)
        if conn is not None:
            conn.close()

    @staticmethod
    def _reply(item: object, value: Any) -> None:
        if isinstance(item, _Read):
            answer(item.loop, [(item.future, value)])

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
