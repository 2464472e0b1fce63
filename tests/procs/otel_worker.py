"""A worker host with OpenTelemetry configured, for tests/test_otel_processes.py.

``otel_worker.py DB_URL SPANS_FILE`` executes every claimable run, writes each finished
span as one JSON line to SPANS_FILE, and exits 0.
"""

from __future__ import annotations

import sys
from typing import IO

import anyio
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from durably import create_durably
from tests.procs.otel_jobs import two_steps


async def main(url: str, out: IO[str]) -> None:
    provider = TracerProvider()
    exporter = ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    durably = create_durably(url, polling_interval=0.05).register(two_steps=two_steps)
    try:
        await durably.process_until_idle()
    finally:
        await durably.close()
        provider.shutdown()


if __name__ == "__main__":
    with open(sys.argv[2], "w") as spans:
        anyio.run(main, sys.argv[1], spans)
