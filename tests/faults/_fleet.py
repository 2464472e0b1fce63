"""Worker processes with side-effect accounting (tests/procs/effects.py), built on the many-hosts Cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO

import anyio
import pytest
from anyio import to_thread

from durably import Durably, create_durably
from durably.errors import StorageError

from ..procs.effects import effects
from ..support.proxy import TcpProxy
from ..support.sqld import SqldServer
from ..test_many_hosts import Cluster, Host

ROOT = Path(__file__).parents[2]
STALE = 1.0
HEARTBEAT = 0.2
POLLING = 0.05


def _start(command: list[str], output: IO[str]) -> subprocess.Popen[bytes]:
    # From the repository root, so ``python -m tests.procs.effects`` resolves.
    return subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT
    )


class Fleet(Cluster):
    """Host processes running ``effects``; a killed host leaves the fleet and is counted."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        super().__init__(tmp_path, url)
        self.kills = 0
        self.concurrency = 1

    async def spawn(
        self, name: str, *, concurrency: int = 1, wait_for_go: bool = False, url: str | None = None
    ) -> Host:
        """One host, on ``url`` (its own proxy, say) or the fleet's."""
        command = [
            *(sys.executable, "-m", "tests.procs.effects", url or self.url, str(self.log)),
            *("--id", name, "--stop-file", str(self.stop_file), "--ready-file", str(self.ready)),
            *("--stale", str(STALE), "--heartbeat", str(HEARTBEAT), "--polling", str(POLLING)),
            *("--concurrency", str(concurrency)),
        ]
        if wait_for_go:
            command += ["--go-file", str(self.go_file)]
        output_path = self.dir / f"{name}.out"
        with output_path.open("w") as output:
            process = await to_thread.run_sync(_start, command, output)
        host = Host(name, process, output_path)
        self.hosts.append(host)
        return host

    async def kill(self, host: Host) -> None:
        """SIGKILL: no cleanup, no last write; the host's runs wait for their leases to expire."""
        host.signal(signal.SIGKILL)
        code = await to_thread.run_sync(host.process.wait, 10)
        assert code == -signal.SIGKILL, f"host {host.name} exited with {code} before the kill"
        self.hosts.remove(host)
        self.kills += 1

    async def unfinished(self, durably: Durably, limit: int) -> int:
        """Runs still pending or leased; -1 while the database does not answer."""
        try:
            return len(await durably.get_runs(status=["pending", "leased"], limit=limit))
        except StorageError:
            return -1

    async def until(self, done: Callable[[], Awaitable[bool]], what: str, timeout: float) -> None:
        """Poll ``done`` until it is true; every host must stay alive meanwhile."""
        with anyio.move_on_after(timeout) as scope:
            while not await done():
                self.check_alive()
                await anyio.sleep(0.05)
        if scope.cancelled_caught:
            pytest.fail(f"{what}: not within {timeout} s\n{self.outputs()}")

    async def drain(self, durably: Durably, count: int, timeout: float = 60) -> None:
        """Until no run is pending or leased (a database that does not answer is not drained)."""

        async def drained() -> bool:
            return await self.unfinished(durably, count) == 0

        await self.until(drained, "every run finished", timeout)

    async def begun(self, host: str | None = None) -> list[list[str]]:
        """The step executions begun so far (by ``host``, or by any)."""
        begin = anyio.Path(f"{self.log}.begin")
        lines = (
            [line.split() for line in (await begin.read_text()).splitlines()] if await begin.exists() else []
        )
        return [line for line in lines if host is None or line[3] == host]

    async def started(self, count: int, host: str | None = None, timeout: float = 20) -> None:
        """Until ``count`` step executions have begun (by ``host``, or by any): work is going."""

        async def enough() -> bool:
            return len(await self.begun(host)) >= count

        await self.until(enough, f"{count} steps begun", timeout)


def proxy_to(sqld: SqldServer) -> TcpProxy:
    """A started loopback proxy in front of ``sqld``, for faults on the workers' side only."""
    assert sqld.port is not None, "sqld is not running"
    return TcpProxy("127.0.0.1", sqld.port).start()


@asynccontextmanager
async def fleet(tmp_path: Path, url: str) -> AsyncIterator[Fleet]:
    """A fleet whose hosts are all SIGKILLed on the way out, whatever happened."""
    hosts = Fleet(tmp_path, url)
    try:
        yield hosts
    finally:
        await hosts.kill_all()


@asynccontextmanager
async def client(url: str) -> AsyncIterator[Durably]:
    """The test's own durably instance: it triggers and reads, and never works."""
    durably = create_durably(url, polling_interval=POLLING).register(effects=effects)
    try:
        await durably.migrate()
        yield durably
    finally:
        await durably.close()
