"""Print durably's benchmark table (docs/performance.md explains each figure).

    python -m benchmarks            # everything, ~3 minutes on 2 cores
    python -m benchmarks --quick    # fewer runs, for a smoke check
    python -m benchmarks --web      # live subscribers of the web app: reads/s and RSS
    python -m benchmarks --otel     # W3 with opentelemetry installed, unconfigured vs off
    python -m benchmarks --wan      # the remote adapter at 10 and 40 ms RTT (benchmarks/_wan.py)
    python -m benchmarks --idle     # an idle worker's requests and rows read per minute on sqld

Each durably figure is measured in a fresh process on a fresh database; the
floor (stdlib sqlite3 doing the same writes) is measured in the same run, and
throughputs are also printed as a fraction of it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from benchmarks._floor import floor
from benchmarks._requests import count_requests
from benchmarks._wan import run as run_wan
from tests.support.sqld import SqldServer

# Figures of the reference systems on this kind of machine (shared/ANCHORS.md).
NODE_WAL = {"W3 c=1": 550.0, "W3 c=8": 603.0, "W0 c=1": 1427.0, "trigger": 4800.0, "L p50": 2.19}
DBOS_W3 = 55.0
NODE_SQLD_W3 = 23.0


class Database:
    """Where one measurement runs: a fresh file, sqld, or a replica of a fresh sqld."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind = kind
        self.root = root
        self._count = 0

    def run(self, workload: str, conc: int, n: int) -> dict[str, float]:
        self._count += 1
        here = self.root / f"{self.kind}-{self._count}"
        args = ["--workload", workload, "--conc", str(conc), "-n", str(n)]
        if self.kind == "local":
            return _one([*args, "--url", f"file:{here}.db"])
        with SqldServer(here / "sqld") as server:
            if self.kind == "remote":
                return _one([*args, "--url", server.http_url])
            return _one([*args, "--url", f"file:{here}.replica.db", "--sync-url", server.http_url])


def _one(args: list[str]) -> dict[str, float]:
    return _run_module("benchmarks._one", args)


def _run_module(module: str, args: list[str]) -> dict[str, float]:
    command = [sys.executable, "-m", module, *args]
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"benchmark {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return msgspec.json.decode(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def median_of(trials: int, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
    results = [measure() for _ in range(trials)]
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs and one trial")
    parser.add_argument("--trials", type=int, default=5, help="median of this many trials (local)")
    parser.add_argument(
        "--web", action="store_true", help="only the live-subscribers rows (benchmarks/_web.py)"
    )
    parser.add_argument(
        "--otel", action="store_true", help="only the telemetry-cost rows (benchmarks/_otel.py)"
    )
    parser.add_argument("--wal-runs", type=int, help="runs drained for the WAL's peak size (default 100,000)")
    parser.add_argument("--wan", action="store_true", help="only the WAN table (benchmarks/_wan.py)")
    parser.add_argument("--node", type=Path, help="with --wan: an `npm ci`-ed copy of the Node original")
    parser.add_argument("--idle", action="store_true", help="only the idle-cost rows (benchmarks/_idle.py)")
    options = parser.parse_args()
    if options.idle:
        from benchmarks import _idle

        window = 5.0 if options.quick else 20.0
        root = Path(tempfile.mkdtemp(prefix="durably-bench-idle-"))
        _idle.print_rows(asyncio.run(_idle.measure(root, window)), window)
        _idle.print_local(asyncio.run(_idle.local_poll(root)))
        return
    if options.wan:
        asyncio.run(run_wan(options.node))
        return
    if options.web:
        from benchmarks import _web

        seconds = 5.0 if options.quick else 20.0
        _web.print_rows(asyncio.run(_web.measure([1, 200], seconds)), seconds)
        return
    trials = 1 if options.quick else options.trials
    if options.otel:
        from benchmarks import _otel

        n = 300 if options.quick else 1000
        root = Path(tempfile.mkdtemp(prefix="durably-bench-otel-"))
        _otel.print_rows(_otel.measure(root, max(trials, 2), n), n)
        return
    n_local = 300 if options.quick else 1000
    n_remote = 100 if options.quick else 500
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="durably-bench-"))
    rows: dict[str, dict[str, Any]] = {}

    floor_figures = median_of(trials, lambda: floor(root / f"floor-{time.monotonic_ns()}.db"))
    plan = (("local", n_local, trials), ("remote", n_remote, 1), ("replica", n_remote, 1))
    for kind, n, kind_trials in plan:
        db = Database(kind, root)
        for workload, conc in (("W3", 1), ("W3", 8), ("W0", 1), ("W0", 8)):
            result = median_of(kind_trials, lambda d=db, w=workload, c=conc, k=n: d.run(w, c, k))
            rows.setdefault(f"{workload} drain runs/s c={conc}", {})[kind] = result["drain_runs_per_s"]
            if workload == "W3" and conc == 1:
                rows.setdefault("trigger runs/s", {})[kind] = result["trigger_runs_per_s"]
        latency = median_of(kind_trials, lambda d=db: d.run("L", 1, 50))
        rows.setdefault("L p50 ms", {})[kind] = latency["p50_ms"]
        rows.setdefault("L p95 ms", {})[kind] = latency["p95_ms"]
        print(f"# {kind} done after {time.perf_counter() - started:.0f} s", file=sys.stderr)

    requests = asyncio.run(count_requests(root / "rt", n=100))
    memory_runs = 2000 if options.quick else 10_000
    memory = Database("local", root).run("MEM", 1, memory_runs)
    memory["runs"] = memory_runs
    print_table(rows, floor_figures, requests, memory)
    wal_runs = options.wal_runs or (10_000 if options.quick else 100_000)
    wal = _run_module("benchmarks._wal", ["--url", f"file:{root / 'wal.db'}", "-n", str(wal_runs)])
    print(
        f"\nWrite-ahead log (local): peak {wal['wal_peak_mb']:.1f} MB while draining {wal_runs:,} W3 runs"
        f" with process_until_idle() (database {wal['db_mb']:.1f} MB)"
    )
    parked = 10_000 if options.quick else 100_000
    timing = _run_module("benchmarks._time", ["--root", str(root / "time"), "--parked", str(parked)])
    print_time(timing, parked)
    print(f"\n({time.perf_counter() - started:.0f} s; machine: {_machine()})")


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


def print_table(
    rows: dict[str, dict[str, Any]],
    floor_figures: dict[str, float],
    requests: dict[str, float],
    memory: dict[str, float],
) -> None:
    jobs_floor = floor_figures["jobs_per_s"]
    print("| figure | local file | remote (sqld) | embedded replica | local / floor |")
    print("| --- | --- | --- | --- | --- |")
    # Throughputs first, then latency (rows were filled in measuring order).
    for name, by_kind in sorted(rows.items(), key=lambda item: ("ms" in item[0], "trigger" in item[0])):
        cells = [_fmt(by_kind.get(kind, float("nan"))) for kind in ("local", "remote", "replica")]
        throughput = "runs/s" in name
        ratio = f"{by_kind['local'] / jobs_floor:.1%}" if throughput and "W3" in name else ""
        print(f"| {name} | {' | '.join(cells)} | {ratio} |")
    print(
        f"| floor: jobs/s (without the trigger insert) | {_fmt(jobs_floor)}"
        f" ({_fmt(floor_figures['jobs_per_s_without_trigger'])}) | | | 100% |"
    )
    print("\nDatabase round trips on the remote adapter (HTTP requests counted by a proxy):")
    for name, value in requests.items():
        print(f"- {name}: {value:.2f}")
    print(
        f"\nMemory: RSS {memory['rss_before_mb']:.1f} MB after 1,000 runs,"
        f" {memory['rss_after_mb']:.1f} MB after {memory['runs']:,.0f} more"
        f" (growth {memory['rss_growth_mb']:+.1f} MB)"
    )
    local = rows["W3 drain runs/s c=1"]["local"]
    print("\nAgainst the anchors (shared/ANCHORS.md, same kind of machine):")
    print(
        f"- W3 c=1 local vs Node durably on better-sqlite3 + WAL ({NODE_WAL['W3 c=1']:.0f}): "
        f"{local / NODE_WAL['W3 c=1']:.1f}x; vs DBOS 3.4 on SQLite ({DBOS_W3:.0f}): {local / DBOS_W3:.0f}x"
    )
    print(
        f"- W0 c=1 local vs Node + WAL ({NODE_WAL['W0 c=1']:.0f}): "
        f"{rows['W0 drain runs/s c=1']['local'] / NODE_WAL['W0 c=1']:.1f}x"
    )
    print(f"- L p50 local: {rows['L p50 ms']['local']:.2f} ms (Node + WAL: {NODE_WAL['L p50']} ms)")
    remote = rows["W3 drain runs/s c=1"]["remote"]
    print(
        f"- W3 c=1 remote vs Node durably over HTTP to sqld ({NODE_SQLD_W3:.0f}):"
        f" {remote / NODE_SQLD_W3:.1f}x"
    )


def print_time(figures: dict[str, float], parked: int) -> None:
    """The costs of durable time (benchmarks/_time.py)."""
    print(
        f"\nDurable time (local): a claim takes {figures['claim_ms_parked']:.3f} ms with {parked:,} runs"
        f" delayed or waiting, {figures['claim_ms_none_parked']:.3f} ms with none"
        f" ({figures['ratio']:.0%})"
    )
    print(
        f"Round trips (remote): {figures['requests per run (plain)']:.2f} per 1-step run,"
        f" {figures['requests per run (sleeper)']:.2f} per 1-step run that sleeps once"
        " (the wait's write and the wake-up's claim)"
    )


def _machine() -> str:
    import os
    import platform
    import sqlite3

    return f"{os.cpu_count()} cores, Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}"


if __name__ == "__main__":
    main()
