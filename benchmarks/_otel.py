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
from pathlib import Path

import msgspec

from benchmarks import _one
from durably import _otel

MODES = ("unconfigured", "off")


def measure(root: Path, trials: int, n: int) -> dict[str, list[float]]:
    """Drain runs/s per mode, ``trials`` each, alternating (off first on odd trials)."""
    figures: dict[str, list[float]] = {mode: [] for mode in MODES}
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
            figures[mode].append(result["drain_runs_per_s"])
    return figures


def print_rows(figures: dict[str, list[float]], n: int) -> None:
    on = statistics.median(figures["unconfigured"])
    off = statistics.median(figures["off"])
    print(f"\nTelemetry cost, W3 local c=1, {n} runs, median of {len(figures['off'])} alternated trials:")
    print("| mode | drain runs/s (median) | trials |")
    print("| --- | --- | --- |")
    for mode, median in (("opentelemetry installed, not configured", on), ("telemetry forced off", off)):
        key = "off" if "off" in mode else "unconfigured"
        print(f"| {mode} | {median:,.0f} | {', '.join(f'{v:,.0f}' for v in figures[key])} |")
    # Each pair ran back to back: on a shared machine their ratio is steadier than the medians.
    paired = statistics.median(a / b for a, b in zip(figures["unconfigured"], figures["off"], strict=True))
    print(f"| difference of the medians | {on / off - 1:+.1%} | (budget: within 5 %) |")
    print(f"| median of the paired ratios | {paired - 1:+.1%} | |")


async def _trial(mode: str, url: str, n: int) -> dict[str, object]:
    if mode == "off":
        _otel.force_off()
    args = argparse.Namespace(url=url, sync_url=None, workload="W3", conc=1)
    durably = _one.instance(args)
    try:
        result: dict[str, object] = dict(await _one.drain(durably, n))
    finally:
        await durably.close()
    result["otel_loaded"] = "opentelemetry.trace" in sys.modules
    return result


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
