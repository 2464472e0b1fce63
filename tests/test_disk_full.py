"""A local database on a disk that fills up while runs execute, then is freed again.

Runs as root on a 3 MB tmpfs (CI does). Under ``CI=true`` a failure to mount is a
failure; elsewhere the test is skipped with the reason.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from durably import StepContext, StorageError, create_durably, define_job
from durably._events import WorkerErrorEvent

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(120)]

RUNS = 200


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 3 MB tmpfs, unmounted at the end."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs (needs root): {done.stderr.strip() or done.returncode}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


class Filler:
    """Another program taking every byte of free space until ``free()``; counts how often it found none."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.times_full = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _fill(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while not self._stop.is_set():
                try:
                    self.bytes += os.write(fd, b"\0" * 4096)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    self.times_full += 1
                    time.sleep(0.002)  # take whatever SQLite gives back, at once
        finally:
            os.close(fd)

    def free(self) -> None:
        """Stop taking space and give it all back; safe to call twice or before ``start()``."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        self.path.unlink(missing_ok=True)


async def _pad(k: int) -> dict[str, Any]:
    await anyio.sleep(0.005)
    return {"i": k, "pad": "x" * 300}  # writes big enough to need new log space often


@define_job(name="padded", input=dict[str, Any])
async def padded(step: StepContext, payload: dict[str, Any]) -> dict[str, Any]:
    for k in range(3):
        await step.run(f"s{k}", _pad, k)
    return {"ok": True}


async def _trigger_until_refused(durably: Any, created: list[str]) -> StorageError:
    """Trigger runs until the full disk refuses one; the refused one must leave nothing behind."""
    with anyio.fail_after(20):
        while True:
            try:
                run = await durably.jobs.padded.trigger({"late": True})
            except StorageError as exc:
                return exc
            created.append(run.id)
            await anyio.sleep(0.01)


async def _wait_for_completion(durably: Any, expected: int) -> list[Any]:
    with anyio.fail_after(60):
        while True:
            runs = await durably.get_runs(limit=expected + 10)
            if len(runs) == expected and all(run.status == "completed" for run in runs):
                return list(runs)
            await anyio.sleep(0.1)


async def test_a_full_disk_is_a_transient_storage_error_and_work_resumes_once_freed(
    small_disk: Path,
) -> None:
    path = small_disk / "durably.db"
    durably = create_durably(
        f"file:{path}",
        polling_interval=0.01,
        heartbeat_interval=0.1,
        stale_threshold=1.0,
        max_concurrent_runs=4,
    ).register(padded=padded)
    errors: list[str] = []
    durably.on(
        "worker:error",
        lambda event: errors.append(event.error) if isinstance(event, WorkerErrorEvent) else None,
    )
    filler = Filler(small_disk / "filler")
    created: list[str] = []
    try:
        await durably.migrate()
        created += [run.id for run in await durably.jobs.padded.batch_trigger([{}] * RUNS)]
        durably.start()
        await anyio.sleep(0.2)  # runs are executing
        filler.start()
        refused = await _trigger_until_refused(durably, created)
        await anyio.sleep(1.5)  # the worker meets the full disk too, for longer than a lease
        filler.free()
        runs = await _wait_for_completion(durably, len(created))
        await durably.stop()
    finally:
        filler.free()
        await durably.close()
    assert filler.times_full > 0
    assert refused.transient
    assert "full" in str(refused)
    assert str(path) in str(refused)
    assert {run.id for run in runs} == set(created)  # the refused trigger wrote nothing
    full = [error for error in errors if "full" in error]
    assert full, f"the worker never met the full disk: {errors[:5]}"
    assert all(error.startswith("StorageError: ") for error in full), full[:5]
    check = sqlite3.connect(path)
    try:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        steps = check.execute("SELECT count(*) FROM durably_steps").fetchone()[0]
    finally:
        check.close()
    assert steps == 3 * len(created)
