"""OpenTelemetry (SPEC §14) across OS processes: a run triggered here and executed by another
process gets a run span there that links to this process's trigger span."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from anyio import to_thread

from durably import create_durably

from .procs.otel_jobs import two_steps
from .support.otel import configured

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).parent.parent


def _work(url: str, spans_file: Path) -> None:
    command = [sys.executable, "-m", "tests.procs.otel_worker", url, str(spans_file)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


async def test_the_worker_process_run_span_links_to_the_trigger_span_here(tmp_path: Path) -> None:
    url = f"file:{tmp_path / 'jobs.db'}"
    with configured() as recorded:
        durably = create_durably(url).register(two_steps=two_steps)
        try:
            run = await durably.jobs.two_steps.trigger({})
        finally:
            await durably.close()
        [trigger] = recorded.spans("durably.trigger")
    spans_file = tmp_path / "spans.jsonl"
    await to_thread.run_sync(_work, url, spans_file)

    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    [execution] = [s for s in spans if s["name"] == "durably.run"]
    assert execution["kind"] == "SpanKind.CONSUMER"
    assert execution["attributes"]["durably.run_id"] == run.id
    assert execution["attributes"]["durably.outcome"] == "completed"
    [link] = execution["links"]
    assert link["context"]["trace_id"] == f"0x{trigger.context.trace_id:032x}"
    assert link["context"]["span_id"] == f"0x{trigger.context.span_id:016x}"
    steps = [s for s in spans if s["name"] == "durably.step"]
    assert [s["parent_id"] for s in steps] == [execution["context"]["span_id"]] * 2
