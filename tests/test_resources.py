"""Nothing a durably process keeps grows without bound (SPEC §15): connections, threads,
file descriptors and memory stay flat when one instance is reused and when it drains runs."""

from __future__ import annotations

import gc
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from durably import ConfigurationError, StepContext, create_durably, define_job, open_storage

from .conftest import Database

pytestmark = pytest.mark.anyio


@define_job(name="three-steps", input=dict[str, Any])
async def three_steps(step: StepContext, payload: dict[str, Any]) -> dict[str, Any]:
    for k in range(3):
        await step.run(f"s{k}", lambda k=k: {"i": k})
    step.log.info("done", n=payload["n"])
    return {"ok": True}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_one_instance_reused_many_times_keeps_fds_and_threads_flat(database: Database) -> None:
    durably = create_durably(database.open(), polling_interval=0.01).register(job=three_steps)

    async def cycle(n: int) -> None:
        async with durably:
            await durably.jobs.job.trigger_and_wait({"n": n}, timeout=10)

    for n in range(5):  # warm-up: step threads, connections, imports
        await cycle(n)
    fds, threads = _open_fds(), threading.active_count()
    for n in range(60):
        await cycle(n)
    gc.collect()
    assert _open_fds() <= fds + 2, "file descriptors grew while one instance was reused"
    assert threading.active_count() <= threads + 2, "threads grew while one instance was reused"


async def test_draining_many_runs_keeps_memory_flat(tmp_path: Path) -> None:
    durably = create_durably(f"file:{tmp_path / 'drain.db'}", max_concurrent_runs=8).register(job=three_steps)
    try:
        await durably.jobs.job.batch_trigger([{"n": n} for n in range(500)])
        await durably.process_until_idle()  # warm-up
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(4):
            await durably.jobs.job.batch_trigger([{"n": n} for n in range(500)])
            assert await durably.process_until_idle() == 500
        gc.collect()
        grown = len(gc.get_objects()) - before
    finally:
        await durably.close()
    # 2,000 runs went through: anything kept per run (a dict, an event, a task) would
    # leave at least 2,000 objects behind.
    assert grown < 1_000, f"{grown} more objects alive after draining 2,000 runs"


async def test_synchronous_full_is_set_on_every_connection_of_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / "full.db"
    store = open_storage(f"file:{path}", synchronous="full")
    await store.migrate()
    try:
        driver: Any = store._driver  # type: ignore[attr-defined]
        for conn in (driver._no_wait._conn, driver._connect()):
            assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("file:x.db", {"synchronous": "extra"}),
        ("http://127.0.0.1:8080", {"synchronous": "full"}),
        ("file:x.db", {"synchronous": "full", "sync_url": "http://127.0.0.1:8080"}),
    ],
)
def test_synchronous_is_refused_where_it_cannot_apply(url: str, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError, match="synchronous"):
        open_storage(url, **options)
