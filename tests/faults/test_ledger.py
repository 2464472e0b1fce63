"""The accounting itself: it passes a clean run and catches each violation the fault tests look for."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from durably import create_durably

from ..procs.effects import Effects, configure, effects
from ..procs.host import append_line
from ._ledger import tally

pytestmark = [pytest.mark.anyio, pytest.mark.faults]


async def test_the_ledger_flags_a_stored_step_run_again_and_unbounded_reruns(tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    configure("T", str(log))
    durably = create_durably(f"file:{tmp_path / 'jobs.db'}").register(effects=effects)
    try:
        run = await durably.jobs.effects.trigger(Effects(steps=2, work=0))
        assert await durably.process_until_idle() == 1
        clean = await tally(durably, [run], log)
        clean.check(rerun_bound=0)
        assert (clean.runs_lost, clean.at_least_once_reruns, clean.reexecutions) == ([], 0, 0)

        # Another execution of s0 that ended before s0 was stored: an at-least-once re-run.
        s0 = (await durably.get_steps(run.id))[0]
        assert s0.completed_at is not None
        before = int(s0.completed_at.timestamp() * 1e9) - 50_000_000
        append_line(str(log), f"{run.id} s0 1 1 {before} {before + 1}")
        rerun = await tally(durably, [run], log)
        assert rerun.at_least_once_reruns == 1
        assert not rerun.stored_steps_rerun
        rerun.check(rerun_bound=1)
        with pytest.raises(AssertionError):
            rerun.check(rerun_bound=0)

        # One that wrote its side effect after s0 was stored: a stored step ran again.
        append_line(str(log), f"{run.id} s0 1 2 {time.time_ns()} {time.time_ns()}")
        again = await tally(durably, [run], log)
        assert again.stored_steps_rerun == [(run.id, "s0", 2)]
        with pytest.raises(AssertionError, match="stored steps ran again"):
            again.check(rerun_bound=10)
    finally:
        configure("test", "/dev/null")
        await durably.close()
