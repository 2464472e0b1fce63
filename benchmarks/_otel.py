"""W3 local c=1 with opentelemetry installed but not configured vs telemetry forced off.

    python -m benchmarks --otel [--trials N]

Each trial is a fresh process on a fresh file; the two modes alternate so drift on a
shared machine hits both alike. A printed figure, never a test (SPEC §14: without a
configured provider telemetry costs nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import msgspec

from benchmarks import _one
from durably import _clock, _otel
from durably._models import ClaimedRun, NewRun, Run

MODES = ("unconfigured", "off")


def measure(root: Path, trials: int, n: int) -> dict[str, dict[str, list[float]]]:
    """Drain runs/s and CPU per run, per mode, ``trials`` each, alternating (off first on odd trials)."""
    figures: dict[str, dict[str, list[float]]] = {
        figure: {mode: [] for mode in MODES}
        for figure in ("drain_runs_per_s", "cpu_us_per_run", "hooks_us_per_run")
    }
    for trial in range(trials):
        for mode in MODES if trial % 2 == 0 else MODES[::-1]:
            url = f"file:{root / f'otel-{mode}-{trial}.db'}"
            command = [sys.executable, "-m", "benchmarks._otel", "--mode", mode, "--url", url, "-n", str(n)]
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise RuntimeError(f"otel benchmark ({mode}) failed:\n{done.stderr[-3000:]}")
            result = msgspec.json.decode(done.stdout.strip().splitlines()[-1])
            expected_loaded = mode == "unconfigured"
            if result["otel_loaded"] != expected_loaded:
                raise RuntimeError(f"mode {mode}: opentelemetry imported = {result['otel_loaded']}")
            for figure, by_mode in figures.items():
                by_mode[mode].append(result[figure])
    return figures


def print_rows(figures: dict[str, dict[str, list[float]]], n: int) -> None:
    trials = len(figures["cpu_us_per_run"]["off"])
    print(f"\nTelemetry cost, W3 local c=1, {n} runs, {trials} alternated trials per mode (medians):")
    print("| figure | opentelemetry installed, not configured | forced off | difference | paired |")
    print("| --- | --- | --- | --- | --- |")
    labels = {
        "drain_runs_per_s": "drain runs/s",
        "cpu_us_per_run": "CPU µs per run",
        "hooks_us_per_run": "the hooks alone, µs per run",
    }
    for figure, label in labels.items():
        on, off = figures[figure]["unconfigured"], figures[figure]["off"]
        # Each pair ran back to back: on a shared machine their ratio is steadier than the medians.
        paired = statistics.median(a / b for a, b in zip(on, off, strict=True))
        on_median, off_median = statistics.median(on), statistics.median(off)
        cells = f"{on_median:,.0f} | {off_median:,.0f} | {on_median / off_median - 1:+.1%}"
        print(f"| {label} | {cells} | {paired - 1:+.1%} |")
    print("(budget: within 5 %; CPU time is the figure a loaded machine disturbs least)")


async def _trial(mode: str, url: str, n: int) -> dict[str, object]:
    if mode == "off":
        _otel.force_off()
    args = argparse.Namespace(url=url, sync_url=None, workload="W3", conc=1)
    durably = _one.instance(args)
    cpu = time.process_time()
    try:
        result: dict[str, object] = dict(await _one.drain(durably, n))
    finally:
        await durably.close()
    # CPU time (all threads) barely depends on what else the machine runs; wall time does.
    result["cpu_us_per_run"] = (time.process_time() - cpu) / n * 1e6
    result["otel_loaded"] = "opentelemetry.trace" in sys.modules
    result["hooks_us_per_run"] = _hooks_us_per_run()
    return result


def _hooks_us_per_run(repeat: int = 20_000) -> float:
    """What one W3 run costs in telemetry hooks alone: its trigger, its execution, three steps."""
    otel = _otel.Otel()
    created = _clock.to_datetime(_clock.now())
    assert created is not None
    claimed = ClaimedRun(
        run=Run(id="r", job_name="w3", status="leased", input={}, created_at=created),
        lease_generation=1,
        steps={},
    )
    new_runs = [
        NewRun(id="r", job_name="w3", input=b"{}", labels={}, idempotency_key=None, concurrency_key=None)
    ]
    started = time.perf_counter()
    for _ in range(repeat):
        with otel.trigger("w3", new_runs):
            pass
        trace = otel.run(claimed)
        with trace.span(lambda: None):
            for index in range(3):
                with trace.step(f"s{index}", index):
                    pass
    return (time.perf_counter() - started) / repeat * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    result = asyncio.run(_trial(args.mode, args.url, args.n))
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown noise


if __name__ == "__main__":
    main()
