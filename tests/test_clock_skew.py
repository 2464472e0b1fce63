"""Leases follow the database's clock (SPEC §8), on every adapter.

Two worker processes whose local clocks disagree by 20 minutes (one is 10 minutes
behind, the other 10 minutes ahead, through ``durably._clock.set_offset``) share one
database. A live lease held by one is never taken by the other, however far ahead
the other's clock is; once the holder is killed, its lease is reclaimed about one
``stale_threshold`` later: not minutes early, not minutes late.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import IO

import anyio
import pytest
from anyio import Path as AsyncPath
from anyio import to_thread

from durably import Durably

from .conftest import Database
from .procs.skewed_worker import hold

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "procs" / "skewed_worker.py"
SKEW = 600.0  # ten minutes
STALE = 1.0
HEARTBEAT = 0.2
POLLING = 0.05  # the workers' polling interval (tests/procs/skewed_worker.py)


class Worker:
    """A skewed worker process; its events land in a log file shared by both workers."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], stderr_path: Path, go: Path) -> None:
        self.name = name
        self.process = process
        self._stderr_path = stderr_path
        self._go = go

    def output(self) -> str:
        return self._stderr_path.read_text()

    def go(self) -> None:
        self._go.touch()

    async def wait(self, timeout: float) -> int:
        return await to_thread.run_sync(partial(self.process.wait, timeout))


def _popen(command: list[str], stderr: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)


@asynccontextmanager
async def _worker(
    database: Database, tmp_path: Path, name: str, offset: float, log: Path, stop: Path
) -> AsyncIterator[Worker]:
    stderr_path = tmp_path / f"{name}.stderr"
    go = tmp_path / f"go-{name}"
    command = [
        sys.executable,
        str(SCRIPT),
        database.url,
        "--offset",
        str(offset),
        "--name",
        name,
        "--log",
        str(log),
        "--go-file",
        str(go),
        "--stop-file",
        str(stop),
        "--stale",
        str(STALE),
        "--heartbeat",
        str(HEARTBEAT),
    ]
    if database.kind == "replica":
        command += ["--replica", str(tmp_path / f"replica-{name}.db")]
    with stderr_path.open("w") as stderr:
        process = await to_thread.run_sync(_popen, command, stderr)
        try:
            yield Worker(name, process, stderr_path, go)
        finally:
            if process.poll() is None:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await to_thread.run_sync(process.wait)


async def _lines(log: Path) -> list[list[str]]:
    file = AsyncPath(log)
    if not await file.exists():
        return []
    return [line.split() for line in (await file.read_text()).splitlines()]


async def _wait_for_line(log: Path, *words: str, timeout: float, workers: tuple[Worker, ...] = ()) -> None:
    """Wait until a line of ``log`` starts with ``words``; fail with the workers' stderr if not."""
    try:
        with anyio.fail_after(timeout):
            while True:
                if any(line[: len(words)] == list(words) for line in await _lines(log)):
                    return
                await anyio.sleep(0.01)
    except TimeoutError:
        stderr = "\n".join(f"--- {w.name} stderr:\n{w.output()[-3000:]}" for w in workers)
        seen = "\n".join(" ".join(line) for line in await _lines(log))
        pytest.fail(f"no line {' '.join(words)!r} in {log} within {timeout} s:\n{seen}\n{stderr}")


@pytest.mark.parametrize(
    ("holder_offset", "other_offset"),
    [(-SKEW, SKEW), (SKEW, -SKEW)],
    ids=["holder-behind-other-ahead", "holder-ahead-other-behind"],
)
async def test_skewed_clocks_neither_steal_a_live_lease_nor_delay_reclaiming_an_expired_one(
    database: Database,
    make_durably: Callable[..., Durably],
    tmp_path: Path,
    holder_offset: float,
    other_offset: float,
) -> None:
    log = tmp_path / "events.log"
    stop = tmp_path / "stop"
    releases = tmp_path / "release"
    releases.mkdir()
    observer = make_durably().register(hold=hold)  # triggers and reads; never starts a worker
    await observer.migrate()

    async with (
        _worker(database, tmp_path, "A", holder_offset, log, stop) as a,
        _worker(database, tmp_path, "B", other_offset, log, stop) as b,
    ):
        workers = (a, b)
        await _wait_for_line(log, "ready", "A", timeout=30, workers=workers)
        await _wait_for_line(log, "ready", "B", timeout=30, workers=workers)
        skews = {line[1]: float(line[2]) for line in await _lines(log) if line[0] == "ready"}
        assert skews == {"A": holder_offset, "B": other_offset}  # the clocks really disagree

        # A (alone) claims two runs whose first step holds until released.
        kept = await observer.jobs.hold.trigger({"release_dir": str(releases), "i": 0})
        orphaned = await observer.jobs.hold.trigger({"release_dir": str(releases), "i": 1})
        a.go()
        await _wait_for_line(log, "start", kept.id, "A", timeout=15, workers=workers)
        await _wait_for_line(log, "start", orphaned.id, "A", timeout=15, workers=workers)

        # (a) B polls for two lease lengths while A renews its live leases: B takes nothing.
        b.go()
        await _wait_for_line(log, "polling", "B", timeout=15, workers=workers)
        await anyio.sleep(2 * STALE)
        starts = [line for line in await _lines(log) if line[0] == "start"]
        assert starts == [["start", kept.id, "A"], ["start", orphaned.id, "A"]], (
            f"a live lease was taken over: {starts}"
        )
        for run_id in (kept.id, orphaned.id):
            run = await observer.get_run(run_id)
            assert run is not None
            assert run.status == "leased"

        # The released run is completed by A, its holder.
        (releases / kept.id).touch()
        await _wait_for_line(log, "complete", kept.id, "A", timeout=15, workers=workers)

        # (b) A dies holding the other run: B reclaims it once the lease has expired.
        a.process.kill()
        killed_at = time.monotonic()
        assert await a.wait(10) != 0
        await _wait_for_line(log, "start", orphaned.id, "B", timeout=STALE + 15, workers=workers)
        reclaimed_after = time.monotonic() - killed_at
        # A renewed its lease at most one heartbeat before it died, so the lease ran for
        # about STALE - HEARTBEAT to STALE more seconds; B then claims within a poll.
        assert reclaimed_after >= 0.3, f"reclaimed {reclaimed_after:.2f} s after the kill: too early"
        assert reclaimed_after <= STALE + POLLING + 4.0, (
            f"reclaimed {reclaimed_after:.2f} s after the kill: too late"
        )

        (releases / orphaned.id).touch()
        await _wait_for_line(log, "complete", orphaned.id, "B", timeout=15, workers=workers)
        stop.touch()
        assert await b.wait(15) == 0, b.output()

    for run_id in (kept.id, orphaned.id):
        done = await observer.wait_for_run(run_id, timeout=10)
        assert done.status == "completed", done.error
    assert (await observer.get_run(kept.id)).output == 0  # type: ignore[union-attr]
    assert (await observer.get_run(orphaned.id)).output == 1  # type: ignore[union-attr]
    lines = await _lines(log)
    assert [line for line in lines if line[0] == "start"] == [
        ["start", kept.id, "A"],
        ["start", orphaned.id, "A"],
        ["start", orphaned.id, "B"],
    ]
    assert [line for line in lines if line[0] == "complete"] == [
        ["complete", kept.id, "A"],
        ["complete", orphaned.id, "B"],
    ]
