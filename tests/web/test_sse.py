"""Server-Sent Events over a real uvicorn: one run's stream, resume, every run's stream, many subscribers."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest

from durably import Durably
from durably.web import _sse

from .conftest import SseEvent, eventually, read_events

pytestmark = pytest.mark.anyio
JSON = {"Content-Type": "application/json"}


def _rss() -> int:
    """Resident memory of this process now (Linux), in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _kinds(events: list[SseEvent]) -> list[str]:
    return [event.event for event in events]


async def test_a_run_streams_status_steps_progress_and_logs_and_ends_after_it_ends(
    durably: Durably, serve: Callable[..., Any]
) -> None:
    await durably.init()  # this process executes the run: its events are pushed at once
    async with serve(durably) as served, httpx.AsyncClient(base_url=served.url) as http:
        run = (await http.post("/api/jobs/count/trigger", json={"input": {"steps": 3, "pause": 0.1}})).json()
        async with http.stream("GET", f"/api/runs/{run['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = await read_events(response)  # returns only because the stream ends

    statuses = [e.data["status"] for e in events if e.event == "status"]
    assert statuses[0] in ("pending", "leased") and statuses[-1] == "completed", statuses
    assert events[-1].event == "status" and events[-1].data["output"] == 3
    assert [e.data["name"] for e in events if e.event == "step"] == ["tick-0", "tick-1", "tick-2"]
    assert [e.data["message"] for e in events if e.event == "log"] == [
        "tick 1 of 3",
        "tick 2 of 3",
        "tick 3 of 3",
    ]
    progress = [e.data["current"] for e in events if e.event == "progress"]
    assert progress == sorted(progress) and progress[-1] == 3, progress
    assert all(e.id is not None for e in events)
    assert events[-1].id == "3.3"


async def test_last_event_id_resumes_with_only_what_was_missed(
    durably: Durably, serve: Callable[..., Any]
) -> None:
    run = await durably.jobs.count.trigger({"steps": 4, "pause": 0})
    await durably.process_until_idle()
    async with serve(durably) as served, httpx.AsyncClient(base_url=served.url) as http:
        url = f"/api/runs/{run.id}/events"
        async with http.stream("GET", url, headers={"Last-Event-ID": "2.3"}) as response:
            resumed = await read_events(response)
        async with http.stream("GET", url, headers={"Last-Event-ID": "garbage"}) as response:
            everything = await read_events(response)
    assert [
        (e.event, e.data.get("name") or e.data.get("message")) for e in resumed if e.event in ("step", "log")
    ] == [
        ("step", "tick-2"),
        ("step", "tick-3"),
        ("log", "tick 4 of 4"),
    ]
    assert _kinds(resumed)[-2:] == ["progress", "status"]
    assert _kinds(everything).count("step") == 4 and _kinds(everything).count("log") == 4


async def test_runs_of_another_host_stream_live_through_the_storage_poll(
    durably: Durably, other_host: Durably, serve: Callable[..., Any]
) -> None:
    # ``durably`` serves and executes nothing; ``other_host`` (its own bus) does the work.
    async with (
        serve(durably) as served,
        httpx.AsyncClient(base_url=served.url) as http,
        http.stream("GET", "/api/events?job=count") as everything,
    ):
        await other_host.jobs.greet.trigger({"name": "not shown"})
        run = await other_host.jobs.count.trigger({"steps": 3, "pause": 0.3})
        async with http.stream("GET", f"/api/runs/{run.id}/events") as one:
            with anyio.fail_after(15):
                events = await read_events(one)
        with anyio.fail_after(5):
            seen = await read_events(
                everything, until=lambda e: e.event == "status" and e.data["status"] == "completed"
            )
    assert events[-1].data["status"] == "completed"
    assert _kinds(events).count("step") == 3 and _kinds(events).count("log") == 3
    assert {e.data["job_name"] for e in seen if e.event == "status"} == {"count"}
    assert {e.data["id"] for e in seen if e.event == "status"} == {run.id}


async def test_heartbeats_keep_an_idle_stream_open(
    durably: Durably, serve: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_sse, "HEARTBEAT", 0.1)
    run = await durably.jobs.greet.trigger({"name": "idle"})
    comments: list[str] = []
    async with (
        serve(durably) as served,
        httpx.AsyncClient(base_url=served.url) as http,
        http.stream("GET", f"/api/runs/{run.id}/events") as response,
    ):
        with anyio.move_on_after(1):
            await read_events(response, comments=comments)
    assert comments.count(": heartbeat") >= 3, comments


async def test_many_subscribers_share_one_poll_and_are_cleaned_up_when_they_leave(
    durably: Durably, other_host: Durably, serve: Callable[..., Any]
) -> None:
    subscribers = 200
    async with serve(durably) as served:
        feed = served.app.state.feed
        limits = httpx.Limits(max_connections=subscribers + 10)
        async with httpx.AsyncClient(base_url=served.url, limits=limits, timeout=30) as http:
            got: list[str] = []

            async def subscriber(ready: anyio.Event) -> None:
                async with http.stream("GET", "/api/events") as response:
                    ready.set()
                    [event] = await read_events(response, until=lambda e: e.event == "status")
                    got.append(event.data["id"])

            async with anyio.create_task_group() as group:
                for _ in range(subscribers):
                    ready = anyio.Event()
                    group.start_soon(subscriber, ready)
                    await ready.wait()
                await eventually(lambda: feed.subscribers == subscribers)
                rss = _rss()
                reads_before = feed.reads
                await anyio.sleep(3)
                idle_reads = feed.reads - reads_before
                run = await other_host.jobs.greet.trigger({"name": "everyone"})
                await eventually(lambda: len(got) == subscribers)
            grown = _rss() - rss
        # One read a second for the whole process, not one per subscriber.
        assert 1 <= idle_reads <= 4, idle_reads
        assert got == [run.id] * subscribers
        assert grown < 20 * 2**20, grown
        await eventually(lambda: feed.subscribers == 0)
        reads = feed.reads
        await anyio.sleep(1.5)
        assert feed.reads == reads  # nobody listens: the poll stopped
