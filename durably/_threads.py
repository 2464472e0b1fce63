"""Runs sync step functions on worker threads with one cheap wake-up per call.

``anyio.to_thread.run_sync`` costs ~150 µs a call here, several times what a
trivial step does; a pool of parked threads fed by a ``SimpleQueue`` that answer
through ``call_soon_threadsafe`` costs about half. Threads are created on demand
(up to ``_MAX_THREADS``) and stay parked, so a busy worker never waits on a start.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

_MAX_THREADS = 64

_Work = tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]

_queue: queue.SimpleQueue[_Work] = queue.SimpleQueue()
_lock = threading.Lock()
_threads = 0
_parked = 0  # threads waiting on the queue
_unclaimed = 0  # work put on the queue and not taken yet

Answer = tuple[asyncio.Future[Any], Any]


def _settle(answers: list[Answer]) -> None:
    for future, value in answers:
        if future.done():
            continue  # the caller was cancelled and stopped waiting
        if isinstance(value, BaseException):
            future.set_exception(value)
        else:
            future.set_result(value)


def answer(loop: asyncio.AbstractEventLoop, answers: list[Answer]) -> None:
    """From any thread: resolve futures of ``loop`` with values or exceptions, in one wake-up."""
    with contextlib.suppress(RuntimeError):  # the loop closed; nobody waits
        loop.call_soon_threadsafe(_settle, answers)


def _serve() -> None:
    global _parked, _unclaimed
    while True:
        with _lock:
            _parked += 1
        fn, future, loop = _queue.get()
        with _lock:
            _parked -= 1
            _unclaimed -= 1
        try:
            value = fn()
        except BaseException as exc:  # delivered to the awaiting task, never lost here
            value = exc
        answer(loop, [(future, value)])
        del fn, future, value


def _put(work: _Work) -> None:
    """Queue ``work``; start a thread only if every parked one is already spoken for."""
    global _threads, _unclaimed
    with _lock:
        _unclaimed += 1
        start = _parked < _unclaimed and _threads < _MAX_THREADS
        if start:
            _threads += 1
    _queue.put(work)
    if start:
        threading.Thread(target=_serve, name=f"durably-step-{_threads}", daemon=True).start()


async def run_sync(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a worker thread; if the awaiting task is cancelled, the thread is abandoned."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()
    # The step's context (current step name, structlog context) goes along to the thread.
    _put((partial(contextvars.copy_context().run, fn), future, loop))
    return await future
