"""A real uvicorn on 127.0.0.1 (a free port) serving ``create_app``, for the SSE and browser tests."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
import uvicorn
from starlette.applications import Starlette

from durably import Durably
from durably.web import create_app

from .app import make


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path, *, seconds: float = 20) -> None:
    """Return once ``url`` answers 200; fail with the server's log if it dies or never does."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the server at {url} did not come up:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"file:{tmp_path / 'web.db'}"


@pytest.fixture
async def durably(db_url: str) -> AsyncIterator[Durably]:
    """The served instance (no worker unless a test starts one) on a local file."""
    instance = make(db_url)
    try:
        yield instance
    finally:
        await instance.close()


@pytest.fixture
async def other_host(db_url: str) -> AsyncIterator[Durably]:
    """Another instance on the same database with its worker running: its events never reach the app."""
    instance = make(db_url)
    await instance.init()
    try:
        yield instance
    finally:
        await instance.close()


class Served:
    """A running server: its base URL and the app (``app.state.feed`` is its change feed)."""

    def __init__(self, url: str, app: Starlette) -> None:
        self.url = url
        self.app = app


@asynccontextmanager
async def serving(durably: Durably, **options: Any) -> AsyncIterator[Served]:
    app = create_app(durably, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    server.capture_signals = _no_signals  # type: ignore[method-assign]  # the test runner owns signals
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    try:
        with anyio.fail_after(10):
            while not server.started:
                if task.done():
                    task.result()
                await anyio.sleep(0.01)
        yield Served(f"http://127.0.0.1:{port}", app)
    finally:
        server.should_exit = True
        with anyio.CancelScope(shield=True), anyio.fail_after(10):
            await task
        sock.close()


def _no_signals() -> Any:
    from contextlib import nullcontext

    return nullcontext()


@pytest.fixture
def serve() -> Callable[..., Any]:
    """``async with serve(durably) as served:`` a uvicorn server for the test."""
    return serving


async def eventually(condition: Callable[[], bool], timeout: float = 10) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout`` seconds."""
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.05)


class SseEvent(msgspec.Struct):
    event: str
    data: Any
    id: str | None = None


async def read_events(
    response: httpx.Response,
    *,
    until: Callable[[SseEvent], bool] | None = None,
    comments: list[str] | None = None,
) -> list[SseEvent]:
    """Events of a ``text/event-stream`` response until the stream ends or ``until`` holds."""
    events: list[SseEvent] = []
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if line.startswith(":"):
            if comments is not None:
                comments.append(line)
            continue
        if line:
            name, _, value = line.partition(": ")
            fields[name] = value
            continue
        if "event" in fields:
            event = SseEvent(fields["event"], msgspec.json.decode(fields["data"]), fields.get("id"))
            events.append(event)
            if until is not None and until(event):
                break
        fields = {}
    return events
