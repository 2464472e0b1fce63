"""The remote adapter at real latency: sqld behind a proxy adding 10 ms and 40 ms RTT.

    python -m benchmarks --wan [--node DIR]    # DIR: an `npm ci`-ed copy of the Node original

Per RTT: the effective round trip (``SELECT 1`` through the proxy), L p50/p95, W3 drain at
c=1/8/32 with requests and sqld transactions per run counted at the proxy
(tests/support/latency.py says how), the round-trip model limit (c=1 W3 = 4 round trips
per run, so at most 1 / (4 x RTT) runs/s; sync only: pipelined, a run's outcome write
overlaps the next run) and, at 10 ms, 4 worker processes x c=8 against 1 process x c=32
with the CPU seconds of every process involved. L and the drains are measured with sync
and with pipelined checkpoints.

    python -m benchmarks._wan --checkpoints [RTT_MS ...]   # only those rows, both modes
    python -m benchmarks._wan --cell RTT_MS --conc N [--mode M] [--fleet P] [--trials T]

``--cell`` measures one drain cell T times, each on a fresh sqld: one process (n as in
the table) or, with ``--fleet P``, P worker processes x c=N draining ``FLEET_RUNS``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from benchmarks._one import completions, latency, make_job
from durably import create_durably
from tests.support.sqld import SqldServer

RTTS_MS = (10, 40)
# Runs per drain cell: each cell takes well under ~20 s at its latency.
DRAIN_RUNS = {(10, 1): 200, (10, 8): 1000, (10, 32): 2000, (40, 1): 60, (40, 8): 400, (40, 32): 1000}
FLEET_RUNS = 2000
CHECKPOINTS = ("sync", "pipelined")
FLEET_TIMEOUT = 90.0  # a fleet that has not drained by then reports how far it got
_TICKS = os.sysconf("SC_CLK_TCK")


class Proxy:
    """tests/support/latency.py in a child process, in front of one sqld."""

    def __init__(self, target_port: int, rtt_ms: float) -> None:
        command = [sys.executable, "-m", "tests.support.latency", str(target_port), str(rtt_ms)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        port, control = self.process.stdout.readline().split()
        self.url = f"http://127.0.0.1:{port}"
        self.control = f"http://127.0.0.1:{control}"

    async def counts(self, *, reset: bool = False) -> dict[str, float]:
        path = "/reset" if reset else "/count"
        async with aiohttp.ClientSession() as session, session.get(self.control + path) as answer:
            return {key: float(value) for key, value in (await answer.json()).items()}

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


@contextmanager
def behind_proxy(root: Path, rtt_ms: float) -> Iterator[tuple[SqldServer, Proxy]]:
    """A fresh sqld with a latency proxy in front of it."""
    with SqldServer(root / f"sqld-{time.monotonic_ns()}", die_with_parent=True) as server:
        assert server.port is not None
        proxy = Proxy(server.port, rtt_ms)
        try:
            yield server, proxy
        finally:
            proxy.close()


async def sql(url: str, statement: str) -> list[list[Any]]:
    """Rows of one statement, as raw Hrana cells, sent without durably."""
    body = {"requests": [{"type": "execute", "stmt": {"sql": statement}}, {"type": "close"}]}
    async with aiohttp.ClientSession() as session, session.post(url + "/v2/pipeline", json=body) as answer:
        result = await answer.json()
    return result["results"][0]["response"]["result"]["rows"]  # type: ignore[no-any-return]


async def effective_rtt(url: str, samples: int = 20) -> float:
    """Median seconds of ``SELECT 1`` on one kept-alive connection: the round trip a request pays."""
    body = {"requests": [{"type": "execute", "stmt": {"sql": "SELECT 1"}}, {"type": "close"}]}
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(samples + 2):
            started = time.perf_counter()
            async with session.post(url + "/v2/pipeline", json=body) as answer:
                await answer.read()
            times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


async def drain(proxy: Proxy, conc: int, n: int, checkpoints: str = "sync") -> dict[str, float]:
    """Trigger ``n`` W3 runs (one batch request), then time one worker draining them."""
    durably = create_durably(proxy.url, polling_interval=0.001, max_concurrent_runs=conc)
    durably.register(job=make_job(3, checkpoints))
    try:
        await durably.migrate()
        for first in range(0, n, 500):
            await durably.jobs.job.batch_trigger([{"i": i} for i in range(first, min(n, first + 500))])
        done = completions(durably, n)
        await proxy.counts(reset=True)
        started = time.perf_counter()
        durably.start()
        await done.wait()
        seconds = time.perf_counter() - started
        counts = await proxy.counts()
        await durably.stop()
    finally:
        await durably.close()
    return {
        "runs_per_s": n / seconds,
        "requests_per_run": counts["requests"] / n,
        "transactions_per_run": counts.get("transactions", 0.0) / n,
    }


async def latency_cell(proxy: Proxy, checkpoints: str = "sync") -> dict[str, float]:
    durably = create_durably(proxy.url, polling_interval=0.001).register(job=make_job(3, checkpoints))
    try:
        await durably.migrate()
        return await latency(durably, 50)
    finally:
        await durably.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    return (sum(ticks) - idle) / _TICKS, sum(ticks) / _TICKS


async def fleet(
    root: Path, processes: int, conc: int, n: int, *, rtt_ms: int = 10, checkpoints: str = "sync"
) -> dict[str, float]:
    """``processes`` worker processes x ``conc`` draining ``n`` runs triggered at once."""
    with behind_proxy(root, rtt_ms) as (server, proxy):
        setup = create_durably(server.http_url).register(job=make_job(3, checkpoints))
        await setup.migrate()
        command = [sys.executable, "-m", "benchmarks._wan", "--host", proxy.url, "--conc", str(conc)]
        command += ["--mode", checkpoints]
        hosts = [_spawn(command) for _ in range(processes)]
        try:
            for host in hosts:
                assert host.stdout is not None and host.stdout.readline().strip() == "ready"
            pids = [h.pid for h in hosts] + [proxy.process.pid, server.pid or 0]
            cpu_before = [cpu_seconds(pid) for pid in pids]
            busy_before = machine_busy()
            started = time.perf_counter()
            await setup.jobs.job.batch_trigger([{"i": i} for i in range(n)])
            completed = await _until_completed(server.http_url, n, FLEET_TIMEOUT)
            seconds = time.perf_counter() - started
            cpu = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
            busy_after = machine_busy()
        finally:
            for host in hosts:
                assert host.stdin is not None
                host.stdin.close()
            for host in hosts:
                host.wait(30)
            await setup.close()
    machine = busy_after[0] - busy_before[0]
    return {
        "runs_per_s": completed / seconds,
        "completed": completed,
        "seconds": seconds,
        "cpu_workers_s": sum(cpu[:processes]),
        "cpu_proxy_s": cpu[processes],
        "cpu_sqld_s": cpu[processes + 1],
        "machine_busy_fraction": machine / (busy_after[1] - busy_before[1]),
    }


def _spawn(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


async def _until_completed(url: str, n: int, timeout: float) -> int:
    """Runs completed once all ``n`` are, or after ``timeout`` seconds.

    Polls sqld directly (not through the proxy, whose counts stay the workers' own).
    """
    deadline = time.perf_counter() + timeout
    while True:
        rows = await sql(url, "SELECT count(*) FROM durably_runs WHERE status = 'completed'")
        completed = int(rows[0][0]["value"])
        if completed >= n or time.perf_counter() > deadline:
            return completed
        await asyncio.sleep(0.05)


async def host(url: str, conc: int, checkpoints: str) -> None:
    """A worker process for ``fleet``: works ``url`` until its stdin closes."""
    # No idle backoff: the runs are triggered elsewhere, and the drain, not pickup, is timed.
    durably = create_durably(
        url, polling_interval=0.001, max_polling_interval=0.001, max_concurrent_runs=conc
    )
    durably.register(job=make_job(3, checkpoints))
    async with durably:
        print("ready", flush=True)
        os.dup2(2, 1)  # later output (logs) to stderr: no one reads this pipe any more
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


def node_cell(node: Path, proxy: Proxy, args: list[str]) -> dict[str, Any]:
    """One measurement of the Node original through ``proxy`` (its RUN.md)."""
    command = ["node", "bench.mjs", "--backend", "libsql-http", "--url", proxy.url]
    command += ["--count-url", proxy.control, "--out", "/tmp/nd-bench/wan.jsonl", *args]
    done = subprocess.run(command, cwd=node, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        return {"error": done.stderr[-500:] or done.stdout[-500:]}
    return msgspec.json.decode(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def measure_rtt(root: Path, rtt_ms: int, node: Path | None) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with behind_proxy(root, rtt_ms) as (_, proxy):
        figures["rtt_eff_ms"] = await effective_rtt(proxy.url) * 1000
    for mode in CHECKPOINTS:
        with behind_proxy(root, rtt_ms) as (_, proxy):
            figures[f"{mode} L"] = await latency_cell(proxy, mode)
        print(f"# {rtt_ms} ms {mode} L: {figures[f'{mode} L']}", file=sys.stderr)
        for conc in (1, 8, 32):
            with behind_proxy(root, rtt_ms) as (_, proxy):
                cell = await drain(proxy, conc, DRAIN_RUNS[(rtt_ms, conc)], mode)
            figures[f"{mode} c={conc}"] = cell
            print(f"# {rtt_ms} ms {mode} c={conc}: {cell}", file=sys.stderr)
    if node is not None:
        small = 50 if rtt_ms == 10 else 20
        for conc in (1, 8, 32):
            with behind_proxy(root, rtt_ms) as (_, proxy):
                args = ["--workload", "W3", "--conc", str(conc), "--n", str(small)]
                figures[f"node c={conc}"] = node_cell(node, proxy, args)
        with behind_proxy(root, rtt_ms) as (_, proxy):
            args = ["--workload", "L", "--lat-n", str(small), "--lat-warmup", "2"]
            figures["node L"] = node_cell(node, proxy, args)
    return figures


def print_table(by_rtt: dict[int, dict[str, Any]], fleets: dict[str, dict[str, float]]) -> None:
    print("| RTT (effective) | figure | durably | Node original |")
    print("| --- | --- | --- | --- |")
    for rtt_ms, f in by_rtt.items():
        for mode in CHECKPOINTS:
            _print_rows(rtt_ms, f, mode)
    if fleets:
        one, many = fleets["1 x c=32"], fleets["4 x c=8"]
        print(f"\nMany hosts at 10 ms, {FLEET_RUNS} runs (CPU seconds during the drain):")
        for name, f in fleets.items():
            print(
                f"- {name}: {f['runs_per_s']:.0f} runs/s ({f['completed']:.0f} runs in {f['seconds']:.1f} s);"
                f" CPU workers"
                f" {f['cpu_workers_s']:.1f} s, proxy {f['cpu_proxy_s']:.1f} s, sqld {f['cpu_sqld_s']:.1f} s;"
                f" machine {f['machine_busy_fraction']:.0%} busy"
            )
        print(f"- ratio 4 x c=8 / 1 x c=32: {many['runs_per_s'] / one['runs_per_s']:.2f}")


def _print_rows(rtt_ms: int, f: dict[str, Any], mode: str) -> None:
    """The L, drain and model rows of one RTT and one checkpoints mode (Node beside sync)."""
    eff, where = f["rtt_eff_ms"], f"{rtt_ms} ms ({f['rtt_eff_ms']:.1f})"
    label = "" if mode == "sync" else ", pipelined"
    node = f.get("node L", {}) if mode == "sync" else {}
    node_l = f"{node['p50_ms']:.0f} / {node['p95_ms']:.0f} ms" if "p50_ms" in node else _node_error(node)
    latency = f[f"{mode} L"]
    print(
        f"| {where} | L p50 / p95{label} | {latency['p50_ms']:.0f} / {latency['p95_ms']:.0f} ms | {node_l} |"
    )
    for conc in (1, 8, 32):
        cell = f[f"{mode} c={conc}"]
        node = f.get(f"node c={conc}", {}) if mode == "sync" else {}
        node_text = _node_error(node)
        if "drain_runs_per_s" in node:
            node_text = f"{node['drain_runs_per_s']:.1f} runs/s, {node['req_per_run_drain']:.1f} req/run"
        print(
            f"| {where} | W3 drain c={conc} (n={DRAIN_RUNS[(rtt_ms, conc)]}){label}"
            f" | {cell['runs_per_s']:.1f} runs/s, {cell['requests_per_run']:.2f} req/run,"
            f" {cell['transactions_per_run']:.2f} txn/run | {node_text} |"
        )
    if mode == "sync":
        limit = 1 / (4 * eff / 1000)
        print(
            f"| {where} | model limit c=1 = 1 / (4 x {eff:.1f} ms) | {limit:.1f} runs/s;"
            f" reached {f['sync c=1']['runs_per_s'] / limit:.0%} | |"
        )


def _node_error(node: dict[str, Any]) -> str:
    return f"failed: {node['error'][-120:]!r}" if "error" in node else "not run"


async def run(node: Path | None) -> None:
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="durably-wan-"))
    by_rtt = {rtt: await measure_rtt(root, rtt, node) for rtt in RTTS_MS}
    fleets = {
        "1 x c=32": await fleet(root, 1, 32, FLEET_RUNS),
        "4 x c=8": await fleet(root, 4, 8, FLEET_RUNS),
    }
    print_table(by_rtt, fleets)
    print(f"\n({time.perf_counter() - started:.0f} s; {os.cpu_count()} cores)")


async def checkpoint_rows(rtts: list[int]) -> None:
    """Only the L and drain rows, sync and pipelined, at ``rtts``: no fleet, no Node."""
    root = Path(tempfile.mkdtemp(prefix="durably-wan-"))
    print_table({rtt: await measure_rtt(root, rtt, None) for rtt in rtts}, {})


async def cells(options: argparse.Namespace) -> None:
    """``options.trials`` measurements of one drain cell, each on a fresh sqld."""
    root = Path(tempfile.mkdtemp(prefix="durably-wan-"))
    rtt, conc, mode = options.cell, options.conc, options.mode
    for trial in range(1, options.trials + 1):
        if options.fleet:
            cell = await fleet(root, options.fleet, conc, FLEET_RUNS, rtt_ms=rtt, checkpoints=mode)
        else:
            with behind_proxy(root, rtt) as (_, proxy):
                cell = await drain(proxy, conc, DRAIN_RUNS[(rtt, conc)], mode)
        shown = " ".join(f"{key}={value:.3g}" for key, value in cell.items())
        print(f"{rtt} ms {options.fleet or 1} x c={conc} {mode} trial {trial}: {shown}", flush=True)


def _options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._wan", description=__doc__.split("\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoints", nargs="*", type=int, metavar="RTT_MS", help="L, drain rows")
    what.add_argument("--cell", type=int, choices=RTTS_MS, metavar="RTT_MS", help="one drain cell")
    what.add_argument("--host", metavar="URL", help="(internal) one worker process of a fleet")
    parser.add_argument("--conc", type=int, default=8, help="max_concurrent_runs per process (default 8)")
    parser.add_argument("--mode", choices=CHECKPOINTS, default="sync", help="checkpoints (default sync)")
    parser.add_argument("--fleet", type=int, default=0, metavar="P", help="P worker processes (--cell)")
    parser.add_argument("--trials", type=int, default=1, help="measurements of the cell (default 1)")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _options()
    if arguments.checkpoints is not None:
        asyncio.run(checkpoint_rows(arguments.checkpoints or list(RTTS_MS)))
    elif arguments.cell is not None:
        asyncio.run(cells(arguments))
    else:
        asyncio.run(host(arguments.host, arguments.conc, arguments.mode))
