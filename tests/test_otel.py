"""OpenTelemetry (SPEC §14) in one process: linked spans, attributes, step spans, skipped
steps as events, metrics; and nothing at all without a configured provider."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from durably import Durably, create_durably

from .conftest import Database
from .procs.otel_jobs import two_steps
from .support.otel import Recorded, configured

pytestmark = pytest.mark.anyio


def _instance(tmp_path: Path) -> Durably:
    return create_durably(f"file:{tmp_path / 'db'}", polling_interval=0.01).register(two_steps=two_steps)


def _by_name(recorded: Recorded) -> dict[str, list[Any]]:
    spans: dict[str, list[Any]] = {}
    for span in recorded.spans():
        spans.setdefault(span.name, []).append(span)
    return spans


async def test_a_run_span_links_to_its_trigger_span_and_parents_its_steps(database: Database) -> None:
    """Every adapter stores the trigger's context with the run and hands it back on the claim."""
    with configured() as recorded:
        durably = create_durably(database.open(), polling_interval=0.01).register(two_steps=two_steps)
        try:
            run = await durably.jobs.two_steps.trigger({})
            assert await durably.process_until_idle() == 1
        finally:
            await durably.close()
    spans = _by_name(recorded)
    [trigger] = spans["durably.trigger"]
    [execution] = spans["durably.run"]
    steps = spans["durably.step"]
    assert trigger.kind == SpanKind.PRODUCER
    assert trigger.attributes == {"durably.job": "two-steps", "durably.run_id": run.id}
    assert execution.kind == SpanKind.CONSUMER
    [link] = execution.links
    assert link.context.trace_id == trigger.context.trace_id
    assert link.context.span_id == trigger.context.span_id
    assert execution.parent is None  # its own trace: executions may come days later, or twice
    assert dict(execution.attributes or {}) == {
        "durably.run_id": run.id,
        "durably.job": "two-steps",
        "durably.attempt": 1,
        "durably.outcome": "completed",
    }
    assert [s.attributes["durably.step"] for s in steps] == ["one", "two"]
    for index, step in enumerate(steps):
        assert step.kind == SpanKind.INTERNAL
        assert step.parent is not None and step.parent.span_id == execution.context.span_id
        assert step.attributes["durably.step_index"] == index
        assert step.attributes["durably.outcome"] == "completed"
        assert step.attributes["durably.run_id"] == run.id


async def test_a_failed_step_and_run_are_errors_and_replayed_steps_are_events(tmp_path: Path) -> None:
    with configured() as recorded:
        durably = _instance(tmp_path)
        try:
            run = await durably.jobs.two_steps.trigger({"fail_once": str(tmp_path / "failed")})
            await durably.process_until_idle()
            await durably.retry(run.id)
            await durably.process_until_idle()
        finally:
            await durably.close()
    first, second = _by_name(recorded)["durably.run"]
    assert first.attributes["durably.outcome"] == "failed"
    assert first.status.status_code == StatusCode.ERROR
    assert "second failed" in (first.status.description or "")
    failed_step = [s for s in recorded.spans("durably.step") if s.attributes["durably.outcome"] == "failed"]
    [step] = failed_step
    assert step.attributes["durably.step"] == "two"
    assert step.status.status_code == StatusCode.ERROR
    assert [e.name for e in step.events] == ["exception"]
    # The retry replays step "one" (an event on the run span) and executes "two" (a span).
    assert second.attributes["durably.attempt"] == 2
    assert second.attributes["durably.outcome"] == "completed"
    [skipped] = second.events
    assert skipped.name == "durably.step.skipped"
    assert dict(skipped.attributes or {}) == {"durably.step": "one", "durably.step_index": 0}
    second_steps = [s for s in recorded.spans("durably.step") if s.parent.span_id == second.context.span_id]
    assert [s.attributes["durably.step"] for s in second_steps] == ["two"]
    # Both executions link to the one trigger.
    [trigger] = recorded.spans("durably.trigger")
    assert first.links[0].context.span_id == second.links[0].context.span_id == trigger.context.span_id


async def test_metrics_count_ended_runs_and_time_runs_steps_and_claims(tmp_path: Path) -> None:
    with configured() as recorded:
        durably = _instance(tmp_path)
        try:
            await durably.jobs.two_steps.trigger({})
            await durably.jobs.two_steps.trigger({"fail_once": str(tmp_path / "failed")})
            await durably.process_until_idle()
        finally:
            await durably.close()
        ended = {p.attributes["durably.status"]: p.value for p in recorded.points("durably.runs.ended")}
        assert ended == {"completed": 1, "failed": 1}
        runs = {p.attributes["durably.outcome"]: p.count for p in recorded.points("durably.run.duration")}
        assert runs == {"completed": 1, "failed": 1}
        steps = {p.attributes["durably.outcome"]: p.count for p in recorded.points("durably.step.duration")}
        assert steps == {"completed": 3, "failed": 1}
        [lag] = recorded.points("durably.claim.lag")
        assert lag.count == 2
        assert 0 <= lag.min <= lag.max < 60  # seconds on the database clock, not nanoseconds


async def test_without_a_provider_nothing_is_recorded_or_stored(tmp_path: Path) -> None:
    """The SDK is installed here but not configured: no trace context is stored; once a provider
    is configured, the same instance traces (it checks at each trigger and execution)."""
    path = tmp_path / "db"
    durably = create_durably(f"file:{path}", polling_interval=0.01).register(two_steps=two_steps)
    try:
        plain = await durably.jobs.two_steps.trigger({})
        await durably.process_until_idle()
        with configured() as recorded:
            traced = await durably.jobs.two_steps.trigger({})
            await durably.process_until_idle()
    finally:
        await durably.close()
    with sqlite3.connect(path) as connection:
        stored = dict(connection.execute("SELECT id, trace_context FROM durably_runs").fetchall())
    assert stored[plain.id] is None
    assert '"traceparent"' in stored[traced.id]
    assert [s.attributes["durably.run_id"] for s in recorded.spans("durably.run")] == [traced.id]


NO_EXTRA = """
import sqlite3, sys
sys.modules["opentelemetry"] = None  # as if durably[otel] were not installed: imports fail
import anyio
from durably import create_durably
from tests.procs.otel_jobs import two_steps

async def main(path):
    durably = create_durably(f"file:{path}").register(two_steps=two_steps)
    run = await durably.jobs.two_steps.trigger({})
    await durably.process_until_idle()
    done = await durably.get_run(run.id)
    await durably.close()
    assert done.status == "completed", done
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT trace_context FROM durably_runs").fetchall() == [(None,)]

anyio.run(main, sys.argv[1])
"""


def test_without_the_extra_runs_execute_untraced(tmp_path: Path) -> None:
    root = Path(__file__).parent.parent
    command = [sys.executable, "-c", NO_EXTRA, str(tmp_path / "db")]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_import_durably_imports_no_opentelemetry_module() -> None:
    check = (
        "import sys, durably; "
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry')); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", check], check=True, timeout=60)


@pytest.mark.parametrize("stored", ["{oops", '{"traceparent": 5}', '{"traceparent": "00-zz-zz-01"}'])
async def test_an_unreadable_stored_context_gives_a_run_span_without_a_link(
    tmp_path: Path, stored: str
) -> None:
    path = tmp_path / "db"
    durably = create_durably(f"file:{path}", polling_interval=0.01).register(two_steps=two_steps)
    try:
        run = await durably.jobs.two_steps.trigger({})
        with sqlite3.connect(path) as connection:
            connection.execute("UPDATE durably_runs SET trace_context = ?", (stored,))
        with configured() as recorded:
            await durably.process_until_idle()
    finally:
        await durably.close()
    [execution] = recorded.spans("durably.run")
    assert execution.links == ()
    assert execution.attributes["durably.run_id"] == run.id
    assert execution.attributes["durably.outcome"] == "completed"
