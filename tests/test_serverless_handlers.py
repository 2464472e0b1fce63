"""examples/serverless/handler.py: two handlers invoked at once, in two OS processes, against
one sqld; every run completes exactly once, through waits and deadlines."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from durably import create_durably

from .support.sqld import SqldServer

HANDLER = Path(__file__).resolve().parent.parent / "examples" / "serverless" / "handler.py"
RUNS = 12


def _invoke(url: str, budget: float) -> subprocess.Popen[str]:
    env = {**os.environ, "DURABLY_DB": url}
    return subprocess.Popen(
        [sys.executable, str(HANDLER), str(budget)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _trigger(url: str) -> list[str]:
    sys.path.insert(0, str(HANDLER.parent))
    try:
        import handler  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(HANDLER.parent))
    durably = create_durably(url).register(digest=handler.digest)
    try:
        await durably.migrate()
        runs = await durably.jobs.digest.batch_trigger(
            [{"to": f"user{i}", "cool_down": 0.3} for i in range(RUNS)]
        )
        return [run.id for run in runs]
    finally:
        await durably.close()


async def _statuses(url: str) -> dict[str, str]:
    durably = create_durably(url)
    try:
        return {run.id: run.status for run in await durably.get_runs(job_name="digest", limit=100)}
    finally:
        await durably.close()


def test_two_handlers_at_once_complete_every_run_exactly_once(tmp_path: Path) -> None:
    with SqldServer(tmp_path / "sqld") as server:
        url = server.http_url
        run_ids = asyncio.run(_trigger(url))
        completed: list[str] = []
        for _ in range(20):  # rounds of two concurrent invocations, as a platform's cron would
            summaries = []
            for proc in [_invoke(url, 1.0), _invoke(url, 1.0)]:
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                summaries.append(json.loads(out))
            completed += [run_id for summary in summaries for run_id in summary["completed"]]
            wakes = [s["next_wake_at"] for s in summaries if s["next_wake_at"] is not None]
            if set(completed) >= set(run_ids):
                break
            assert wakes, summaries  # something is still due: the platform is told when
            assert min(datetime.fromisoformat(w) for w in wakes) < datetime(2100, 1, 1, tzinfo=UTC)
        assert sorted(completed) == sorted(run_ids)  # each run completed once, by one handler
        statuses = asyncio.run(_statuses(url))
        assert all(statuses[run_id] == "completed" for run_id in run_ids), statuses


pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")
