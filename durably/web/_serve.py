"""``durably serve``: the API and dashboard on uvicorn, optionally with a worker."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from durably.web import create_app

if TYPE_CHECKING:
    from durably._engine import Durably

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Server(uvicorn.Server):
    """A uvicorn server that stops on SIGINT/SIGTERM without re-raising them afterwards.

    uvicorn raises a captured signal again once it has shut down, which would kill the
    process before durably stops its worker; ``durably serve`` exits 0 instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


async def serve(durably: Durably, *, host: str = "127.0.0.1", port: int = 8000, worker: bool = False) -> int:
    """Serve ``create_app(durably)`` until SIGINT/SIGTERM; with ``worker``, execute runs too."""
    config = uvicorn.Config(
        create_app(durably),
        host=host,
        port=port,
        lifespan="off",
        log_level="warning",
        # Live streams never end by themselves: give them a moment, then close them.
        timeout_graceful_shutdown=2,
    )
    await durably.migrate()
    try:
        if worker:
            durably.start()
        sys.stderr.write(
            f"durably: serving {durably.storage.url} on http://{host}:{port}/"
            f" ({'with' if worker else 'without'} a worker); stop with Ctrl-C\n"
        )
        sys.stderr.flush()
        await _Server(config).serve()
    finally:
        await durably.close()
    sys.stderr.write("durably: server stopped\n")
    return 0
