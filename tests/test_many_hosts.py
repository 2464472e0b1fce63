"""Many hosts as OS processes on one database: sqld (remote) and a local file.

Every host process (tests/procs/host.py) appends one line per step execution to a
shared append-only log; the log, not durably's own bookkeeping, proves what ran where.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO

import anyio
import pytest
from anyio import Path as AsyncPath
from anyio import to_thread

from durably import Durably, Run, create_durably
from durably.errors import StorageError

from .procs.host import STEPS, Keyed, Work, keyed, three_steps
from .support.sqld import SqldServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SCRIPT = Path(__file__).parent / "procs" / "host.py"
STALE = 1.5
HEARTBEAT = 0.3
POLLING = 0.05


@dataclass
class Target:
    kind: str
    url: str
    server: SqldServer | None


def _target(kind: str, tmp_path: Path) -> Iterator[Target]:
    if kind == "local":
        yield Target(kind, f"file:{tmp_path / 'jobs.db'}", None)
        return
    with SqldServer(tmp_path / "sqld") as server:
        yield Target(kind, server.http_url, server)


@pytest.fixture(params=["local", "remote"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A fresh database: a SQLite file, or a sqld server of its own."""
    yield from _target(request.param, tmp_path)


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[Target]:
    yield from _target("remote", tmp_path)


# --- host processes ------------------------------------------------------------------------


class Host:
    """One host process; its stdout and stderr are kept in files for failure messages."""

    def __init__(self, name: str, process: subprocess.Popen[bytes], output_path: Path) -> None:
        self.name = name
        self.process = process
        self._output_path = output_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self, tail: int = 3000) -> str:
        try:
            return self._output_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def signal(self, signum: signal.Signals) -> None:
        self.process.send_signal(signum)

    async def finish(self, timeout: float = 15) -> None:
        code = await to_thread.run_sync(partial(self.process.wait, timeout))
        assert code == 0, f"host {self.name} exited with {code}:\n{self.output()}"


def _popen(command: list[str], output: IO[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


class Cluster:
    """Host processes sharing one database, one log, one ready file, one go and one stop file."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.url = url
        self.dir = tmp_path
        self.log = tmp_path / "steps.log"
        self.ready = tmp_path / "ready"
        self.go_file = tmp_path / "go"
        self.stop_file = tmp_path / "stop"
        self.hosts: list[Host] = []
        self.log.touch()

    async def spawn(self, name: str, *, concurrency: int = 1, wait_for_go: bool = False) -> Host:
        command = [
            sys.executable,
            str(SCRIPT),
            self.url,
            str(self.log),
            "--id",
            name,
            "--stop-file",
            str(self.stop_file),
            "--ready-file",
            str(self.ready),
            "--stale",
            str(STALE),
            "--heartbeat",
            str(HEARTBEAT),
            "--polling",
            str(POLLING),
            "--concurrency",
            str(concurrency),
        ]
        if wait_for_go:
            command += ["--go-file", str(self.go_file)]
        output_path = self.dir / f"{name}.out"
        with output_path.open("w") as output:
            process = await to_thread.run_sync(_popen, command, output)
        host = Host(name, process, output_path)
        self.hosts.append(host)
        return host

    async def wait_ready(self, count: int, timeout: float = 20) -> None:
        ready = AsyncPath(self.ready)
        with anyio.move_on_after(timeout) as scope:
            while not (await ready.exists() and len((await ready.read_text()).splitlines()) >= count):
                self.check_alive()
                await anyio.sleep(0.02)
        if scope.cancelled_caught:
            pytest.fail(f"{count} hosts were not ready within {timeout} s\n{self.outputs()}")

    async def go(self) -> None:
        await AsyncPath(self.go_file).touch()

    async def stop(self) -> None:
        """Ask every host to stop (the stop file) and require a clean exit."""
        await AsyncPath(self.stop_file).touch()
        for host in self.hosts:
            await host.finish()

    def check_alive(self) -> None:
        for host in self.hosts:
            code = host.process.poll()
            if code is not None:
                pytest.fail(f"host {host.name} exited early with {code}:\n{host.output()}")

    def outputs(self) -> str:
        return "\n".join(f"--- {host.name} (pid {host.pid}):\n{host.output()}" for host in self.hosts)

    async def lines(self) -> list[list[str]]:
        return [line.split() for line in (await AsyncPath(self.log).read_text()).splitlines()]

    async def kill_all(self) -> None:
        for host in self.hosts:
            if host.process.poll() is None:
                host.process.kill()  # SIGKILL also ends a SIGSTOPped process
        with anyio.CancelScope(shield=True):
            for host in self.hosts:
                await to_thread.run_sync(host.process.wait)


@asynccontextmanager
async def _cluster(tmp_path: Path, url: str) -> AsyncIterator[Cluster]:
    cluster = Cluster(tmp_path, url)
    try:
        yield cluster
    finally:
        await cluster.kill_all()


@asynccontextmanager
async def _client(url: str) -> AsyncIterator[Durably]:
    """The test's own durably instance: it triggers and reads, and never works."""
    durably = create_durably(url, polling_interval=POLLING).register(three_steps=three_steps, keyed=keyed)
    try:
        await durably.migrate()
        yield durably
    finally:
        await durably.close()


async def _wait_until_terminal(
    durably: Durably, cluster: Cluster, count: int, timeout: float, *, tolerate_outage: bool = False
) -> list[Run]:
    """Poll until no run is pending or leased; return all runs (oldest first)."""
    with anyio.move_on_after(timeout) as scope:
        while True:
            try:
                unfinished = await durably.get_runs(status=["pending", "leased"], limit=count)
            except StorageError:
                if not tolerate_outage:
                    raise
                await anyio.sleep(0.1)
                continue
            if not unfinished:
                break
            cluster.check_alive()
            await anyio.sleep(0.1)
    if scope.cancelled_caught:
        left = await durably.get_runs(status=["pending", "leased"], limit=count)
        pytest.fail(f"{len(left)} runs still unfinished after {timeout} s\n{cluster.outputs()}")
    runs = await durably.get_runs(limit=count + 1)
    assert len(runs) == count
    return runs[::-1]


def _step_executions(lines: list[list[str]]) -> collections.Counter[tuple[str, str]]:
    """(run_id, step) -> how many times the step function ran, from three-step log lines."""
    return collections.Counter((run_id, step) for run_id, step, _host, _pid in lines)


def _assert_completed(runs: list[Run]) -> None:
    failed = [(run.id, run.status, run.error) for run in runs if run.status != "completed"]
    assert not failed, f"{len(failed)} runs did not complete: {failed[:5]}"


# --- 1. every run completes, every step exactly once ---------------------------------------


@pytest.mark.timeout(120)
async def test_four_host_processes_complete_every_run_and_execute_each_step_once(
    target: Target, tmp_path: Path
) -> None:
    runs_wanted, processes = 200, 4
    async with _cluster(tmp_path, target.url) as cluster, _client(target.url) as durably:
        for i in range(processes):
            await cluster.spawn(f"h{i}", wait_for_go=True)
        await cluster.wait_ready(processes)  # every host has started up; none works yet
        triggered = await durably.jobs.three_steps.batch_trigger([Work()] * runs_wanted)
        started = time.monotonic()
        await cluster.go()
        runs = await _wait_until_terminal(durably, cluster, runs_wanted, timeout=60)
        drained = time.monotonic() - started
        await cluster.stop()
        lines = await cluster.lines()

    assert [run.id for run in runs] == [run.id for run in triggered]
    _assert_completed(runs)
    executions = _step_executions(lines)
    duplicates = {key: n for key, n in executions.items() if n != 1}
    expected = {(run.id, step) for run in runs for step in STEPS}
    per_host = collections.Counter(host for _, _, host, _ in lines)
    print(
        f"\n[many hosts / {target.kind}] runs={len(runs)} processes={processes}"
        f" hosts_that_worked={len(per_host)} steps_per_host={dict(sorted(per_host.items()))}"
        f" log_lines={len(lines)} duplicates={len(duplicates)} drain={drained:.1f}s"
        f" ({len(runs) / drained:.0f} runs/s)"
    )
    assert not duplicates, f"steps executed more than once: {list(duplicates.items())[:10]}"
    assert set(executions) == expected
    assert len(lines) == 3 * runs_wanted
    # What each run stored agrees with the log: the host that logged a step returned its result.
    executed_by = {(run_id, step): host for run_id, step, host, _ in lines}
    for run in runs:
        assert run.output["steps"] == [executed_by[run.id, step] for step in STEPS], run
    assert len(per_host) > 1, f"only {set(per_host)} did any work"


# --- 2. concurrency keys across processes --------------------------------------------------


@pytest.mark.timeout(90)
async def test_a_concurrency_key_holds_across_four_host_processes(remote: Target, tmp_path: Path) -> None:
    keys, per_key = 3, 6
    async with _cluster(tmp_path, remote.url) as cluster, _client(remote.url) as durably:
        for i in range(4):
            await cluster.spawn(f"h{i}", concurrency=2, wait_for_go=True)
        await cluster.wait_ready(4)
        triggered: dict[str, list[str]] = {f"key-{k}": [] for k in range(keys)}
        for i in range(keys * per_key):
            key = f"key-{i % keys}"
            run = await durably.jobs.keyed.trigger(Keyed(i=i, work=0.1), concurrency_key=key)
            triggered[key].append(run.id)
        await cluster.go()
        runs = await _wait_until_terminal(durably, cluster, keys * per_key, timeout=45)
        await cluster.stop()
        lines = await cluster.lines()

    _assert_completed(runs)
    assert all(len(line) == 5 and line[0] in ("start", "end") for line in lines), lines
    hosts_per_key: dict[str, set[str]] = {}
    for key, run_ids in triggered.items():
        entries = [line for line in lines if line[1] in run_ids]
        # Never two runs of one key at once: each start is followed by the end of that run ...
        assert [kind for kind, *_ in entries] == ["start", "end"] * len(run_ids), (key, entries)
        for (_, started, host_a, pid_a, _), (_, ended, host_b, pid_b, _) in zip(
            entries[::2], entries[1::2], strict=True
        ):
            assert (started, host_a, pid_a) == (ended, host_b, pid_b)
        # ... by the clock too: the next run starts after the previous one ended ...
        stamps = [int(line[4]) for line in entries]
        assert stamps == sorted(stamps), (key, entries)
        # ... and the runs went in trigger order.
        assert [line[1] for line in entries[::2]] == run_ids
        hosts_per_key[key] = {line[2] for line in entries}
    # Runs of different keys did run at once (the key is not a global lock).
    overlapping = _max_overlap(lines)
    print(f"\n[concurrency keys] hosts per key={hosts_per_key} max runs at once={overlapping}")
    assert len(set().union(*hosts_per_key.values())) > 1, "one host did all the work: nothing was shared"
    assert overlapping > 1


def _max_overlap(lines: list[list[str]]) -> int:
    running = peak = 0
    for kind, *_ in lines:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


# --- 3. a stale owner writes nothing -------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("resumed", ["after-the-run-completed", "while-the-new-owner-holds-the-lease"])
async def test_a_stopped_owner_past_its_lease_writes_nothing_after_another_host_took_over(
    target: Target, tmp_path: Path, resumed: str
) -> None:
    """A is stopped inside step 1 past its lease; B takes over; A is continued.

    Resumed after B completed the run, A meets a terminal run; resumed while B holds
    the lease (B pauses in step 2), the run is ``leased`` again and only the lease
    generation tells A's writes from B's.
    """
    while_held = resumed == "while-the-new-owner-holds-the-lease"
    pauses = {"A s1": 2.0, "B s2": 2.0} if while_held else {"A s1": 2.0}
    async with _cluster(tmp_path, target.url) as cluster, _client(target.url) as durably:
        run = await durably.jobs.three_steps.trigger(Work(pauses=pauses))
        a = await cluster.spawn("A")
        await _wait_for_line(cluster, [run.id, "s1", "A"])
        a.signal(signal.SIGSTOP)  # A is inside step 1, holding the lease
        stopped_at = time.time()
        leased = await durably.get_run(run.id)
        assert leased is not None
        assert leased.status == "leased"

        b = await cluster.spawn("B")
        if while_held:
            await _wait_for_line(cluster, [run.id, "s2", "B"])  # B stored step 1 and holds the lease
            during = await durably.get_run(run.id)
            assert during is not None
            assert during.status == "leased"
            a.signal(signal.SIGCONT)  # A's step 1 returns now; its writes must be refused
        done = await durably.wait_for_run(run.id, timeout=20)
        assert done.status == "completed", (done, cluster.outputs())
        assert done.completed_at is not None
        # B took over only once A's lease had expired (A renewed it until it was stopped;
        # the margin allows for a late heartbeat on a loaded machine).
        assert done.completed_at.timestamp() >= stopped_at + STALE - HEARTBEAT - 0.5
        steps_at_completion = await durably.get_steps(run.id)
        if not while_held:
            a.signal(signal.SIGCONT)  # A's step 1 returns now; its writes must be refused
        await anyio.sleep(3 * HEARTBEAT + 1.0)
        assert a.process.poll() is None, f"A died after SIGCONT:\n{a.output()}"
        final = await durably.get_run(run.id)
        steps = await durably.get_steps(run.id)
        await cluster.stop()  # A carries on as a healthy host and exits cleanly
        lines = await cluster.lines()

    assert final is not None
    assert final.status == "completed"
    assert final.output == {"steps": ["B", "B", "B"], "finished_by": "B"}
    assert final.completed_at == done.completed_at
    assert [(s.name, s.status, s.output) for s in steps] == [
        (name, "completed", {"host": "B", "pid": b.pid}) for name in STEPS
    ]
    stored_at_completion = [(s.name, s.completed_at) for s in steps_at_completion]
    assert [(s.name, s.completed_at) for s in steps] == stored_at_completion
    # The log: A started step 1 (before it was stopped) and nothing more; B ran all three.
    assert [(step, host) for run_id, step, host, _ in lines if run_id == run.id] == [
        ("s1", "A"),
        ("s1", "B"),
        ("s2", "B"),
        ("s3", "B"),
    ]


async def _wait_for_line(cluster: Cluster, prefix: list[str], timeout: float = 15) -> None:
    with anyio.move_on_after(timeout) as scope:
        while not any(line[: len(prefix)] == prefix for line in await cluster.lines()):
            cluster.check_alive()
            await anyio.sleep(0.02)
    if scope.cancelled_caught:
        pytest.fail(f"no log line {' '.join(prefix)} within {timeout} s\n{cluster.outputs()}")


# --- 4. sqld killed and restarted mid-workload ---------------------------------------------


def _errors_reported(host: Host) -> int:
    """How many storage or worker errors the host logged (structlog prints them to stdout)."""
    lines = host.output(tail=10**7).splitlines()
    return sum(1 for line in lines if "storage error" in line or "worker error" in line)


def _kill_and_restart(server: SqldServer, down_for: float) -> None:
    if down_for == 0:
        server.restart(graceful=False)
        return
    server.kill()
    time.sleep(down_for)
    server.start()  # the same data directory and the same port


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "down_for",
    [0.0, 1.2, 3.0],
    ids=["restarted-at-once", "down-for-most-of-a-lease", "down-for-twice-a-lease"],
)
async def test_every_run_completes_when_sqld_is_killed_and_restarted_mid_workload(
    remote: Target, tmp_path: Path, down_for: float
) -> None:
    server = remote.server
    assert server is not None
    runs_wanted, processes, concurrency = 100, 4, 2
    async with _cluster(tmp_path, remote.url) as cluster, _client(remote.url) as durably:
        for i in range(processes):
            await cluster.spawn(f"h{i}", concurrency=concurrency, wait_for_go=True)
        await cluster.wait_ready(processes)
        await durably.jobs.three_steps.batch_trigger([Work(sleep=0.03)] * runs_wanted)
        await cluster.go()
        with anyio.move_on_after(30) as scope:
            while len(await durably.get_runs(status="completed", limit=runs_wanted)) < runs_wanted // 4:
                cluster.check_alive()
                await anyio.sleep(0.05)
        assert not scope.cancelled_caught, f"the workload did not get going\n{cluster.outputs()}"
        completed_before = len(await durably.get_runs(status="completed", limit=runs_wanted))
        lines_before = len(await cluster.lines())
        await to_thread.run_sync(_kill_and_restart, server, down_for)
        restarted = time.monotonic()
        runs = await _wait_until_terminal(durably, cluster, runs_wanted, timeout=60, tolerate_outage=True)
        recovered = time.monotonic() - restarted
        await cluster.stop()
        lines = await cluster.lines()
        errors_reported = sum(_errors_reported(host) for host in cluster.hosts)

    executions = _step_executions(lines)
    twice = sorted(key for key, n in executions.items() if n == 2)
    more = {key: n for key, n in executions.items() if n > 2}
    per_host = collections.Counter(host for _, _, host, _ in lines)
    print(
        f"\n[sqld SIGKILL, down {down_for} s] runs={len(runs)} processes={processes}x{concurrency}"
        f" completed_before_kill={completed_before} log_lines_before_kill={lines_before}"
        f" executed_twice={len(twice)} more_than_twice={len(more)}"
        f" steps_per_host={dict(sorted(per_host.items()))} drained {recovered:.1f}s after the restart"
        f" outage_errors_reported={errors_reported}"
    )
    assert completed_before < runs_wanted, "the workload ended before the kill: it hit nothing"
    if down_for > 0:
        # An instant restart can be hidden entirely by the one re-send after a dropped
        # connection; an outage that lasts is noticed and reported by some host.
        assert errors_reported > 0, "no host noticed the outage: it did not hit the workload"
    _assert_completed(runs)
    assert set(executions) == {(run.id, step) for run in runs for step in STEPS}
    assert not more, f"steps executed more than twice: {more}"
    # Only a step in flight when sqld died may run again: at most one per slot.
    assert len(twice) <= processes * concurrency, twice
