"""Live subscribers of the web app: storage reads per second and the server's RSS.

    python -m benchmarks --web                      # 1 then 200 subscribers, 20 s each
    python -m benchmarks._web --subscribers 200 --seconds 20

The server process serves ``create_app`` on uvicorn over a local file and executes
nothing; a second durably instance in it (its own event bus, so its events never
reach the app) triggers and executes a run every 0.1 s, as another host would. The
subscribers are ``GET /api/events`` streams held by a child process, so their memory
is not the server's. Every change reaches the app through its storage poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import uvicorn

from benchmarks._one import rss_mb
from durably import StepContext, create_durably, define_job
from durably.web import create_app


@define_job(name="tick", input=dict[str, Any])
async def tick(step: StepContext, payload: dict[str, Any]) -> int:
    for i in range(3):
        await step.run(f"s{i}", lambda i=i: i)
        step.progress(i + 1, 3)
    return 3


async def _subscribe(url: str, count: int, seconds: float) -> None:
    """Child process: hold ``count`` streams open for ``seconds``; print the events received."""
    received = [0] * count
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(limits=limits, timeout=None) as http:

        async def one(index: int, ready: anyio.Event) -> None:
            async with http.stream("GET", f"{url}/api/events") as response:
                ready.set()
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        received[index] += 1

        with anyio.move_on_after(seconds + 30):
            async with anyio.create_task_group() as group:
                for index in range(count):
                    ready = anyio.Event()
                    group.start_soon(one, index, ready)
                    await ready.wait()
                print("connected", flush=True)
                await anyio.sleep(seconds)
                group.cancel_scope.cancel()
    print(json.dumps({"min_events": min(received), "max_events": max(received)}), flush=True)


async def _phase(url: str, feed: Any, subscribers: int, seconds: float) -> dict[str, float]:
    command = [sys.executable, "-m", "benchmarks._web", "--subscribe", url, str(subscribers), str(seconds)]
    child = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE)
    assert child.stdout is not None
    with anyio.fail_after(60):
        assert (await child.stdout.readline()).strip() == b"connected"
        while True:
            if feed.subscribers >= subscribers:
                break
            await anyio.sleep(0.05)
    rss_before, reads_before, started = rss_mb(), feed.reads, time.perf_counter()
    with anyio.fail_after(seconds + 60):
        out, _ = await child.communicate()
    elapsed = time.perf_counter() - started
    result = json.loads(out.decode().strip().splitlines()[-1])
    return {
        "subscribers": subscribers,
        "reads_per_s": (feed.reads - reads_before) / elapsed,
        "rss_before_mb": rss_before,
        "rss_after_mb": rss_mb(),
        "min_events_per_subscriber": result["min_events"],
    }


async def measure(subscriber_counts: list[int], seconds: float) -> list[dict[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="durably-web-bench-"))
    db = f"file:{root / 'web.db'}"
    served = create_durably(db)
    other = create_durably(db, polling_interval=0.02).register(tick=tick)
    await served.migrate()
    app = create_app(served)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=1)
    )
    serving = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    results = []
    try:
        async with other, anyio.create_task_group() as group:

            async def trigger_forever() -> None:
                while True:
                    await other.jobs.tick.trigger({})
                    await anyio.sleep(0.1)

            group.start_soon(trigger_forever)
            for count in subscriber_counts:
                results.append(await _phase(url, app.state.feed, count, seconds))
            group.cancel_scope.cancel()
    finally:
        server.should_exit = True
        await serving
        await served.close()
    return results


def print_rows(results: list[dict[str, float]], seconds: float) -> None:
    print(
        "\nLive subscribers (GET /api/events; a run triggered and executed elsewhere every 0.1 s;"
        f" {seconds:.0f} s per row):"
    )
    print("| subscribers | storage reads/s | server RSS MB before → after | events per subscriber (min) |")
    print("| --- | --- | --- | --- |")
    for row in results:
        rss = f"{row['rss_before_mb']:.1f} → {row['rss_after_mb']:.1f}"
        events = row["min_events_per_subscriber"]
        print(f"| {row['subscribers']:.0f} | {row['reads_per_s']:.2f} | {rss} | {events:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--subscribers", type=int, action="append", help="repeatable (default: 1 and 200)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--subscribe", nargs=3, metavar=("URL", "N", "SECONDS"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.subscribe:
        url, count, seconds = options.subscribe
        asyncio.run(_subscribe(url, int(count), float(seconds)))
        return
    results = asyncio.run(measure(options.subscribers or [1, 200], options.seconds))
    print_rows(results, options.seconds)


if __name__ == "__main__":
    main()
