"""What the side-effect logs and the database say happened, and the checks every fault test makes.

The logs written by tests/procs/effects.py, not durably's bookkeeping, prove what ran:
``LOG.begin`` has one line per step execution that started, ``LOG`` one line per step
execution that returned (its side effect), ``LOG.events`` one per ``run:complete`` and
``worker:error``. The database's stored steps name the execution whose result was kept.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from durably import Durably, Run

# The database clock (julianday) has millisecond resolution, so a stored ``completed_at``
# may read up to 1 ms earlier than the instant it was written.
CLOCK_RESOLUTION_NS = 2_000_000


@dataclass(frozen=True)
class Effect:
    """One step execution that returned: its side-effect line."""

    run_id: str
    step: str
    attempt: int
    pid: int
    started_ns: int
    ended_ns: int


@dataclass
class Ledger:
    """Counts for one fault test; ``summary()`` is its one-line report, ``record()`` its JSON row."""

    runs: int = 0
    runs_lost: list[str] = field(default_factory=list)
    completed_twice: list[str] = field(default_factory=list)
    completion_unreported: int = 0
    stored_steps_rerun: list[tuple[str, str, int]] = field(default_factory=list)
    stored_without_effect: list[tuple[str, str]] = field(default_factory=list)
    at_least_once_reruns: int = 0
    reexecutions: int = 0
    worker_errors: collections.Counter[str] = field(default_factory=collections.Counter)
    errors_by_host: collections.Counter[str] = field(default_factory=collections.Counter)
    steps_per_host: collections.Counter[str] = field(default_factory=collections.Counter)
    waits: collections.Counter[str] = field(default_factory=collections.Counter)  # run:wait per run

    def check(self, *, rerun_bound: int) -> None:
        """What must survive any fault: every run, once; no stored step re-run; bounded re-runs."""
        assert not self.runs_lost, f"{len(self.runs_lost)} runs lost: {self.runs_lost[:5]}"
        assert not self.completed_twice, f"runs completed twice: {self.completed_twice[:5]}"
        assert not self.stored_without_effect, (
            f"stored results no execution returned: {self.stored_without_effect[:5]}"
        )
        assert not self.stored_steps_rerun, (
            f"stored steps ran again (run, step, pid): {self.stored_steps_rerun[:5]}"
        )
        assert self.at_least_once_reruns <= rerun_bound, (self.at_least_once_reruns, rerun_bound)
        assert self.reexecutions <= rerun_bound, (self.reexecutions, rerun_bound)

    def record(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "runs_lost": len(self.runs_lost),
            "completed_twice": len(self.completed_twice),
            "completion_unreported": self.completion_unreported,
            "stored_steps_rerun": len(self.stored_steps_rerun),
            "at_least_once_reruns": self.at_least_once_reruns,
            "reexecutions": self.reexecutions,
            "worker_errors": dict(self.worker_errors),
            "steps_per_host": dict(sorted(self.steps_per_host.items())),
        }


def _lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def read_effects(log: Path) -> list[Effect]:
    return [
        Effect(run_id, step, int(attempt), int(pid), int(started), int(ended))
        for run_id, step, attempt, pid, started, ended in _lines(log)
    ]


def to_ns(moment: datetime | None) -> int:
    """A stored database timestamp in Unix nanoseconds, like the side-effect lines."""
    assert moment is not None, "a completed run or step without its completed_at"
    return int(moment.timestamp() * 1_000_000_000)


async def tally(durably: Durably, runs: list[Run], log: Path) -> Ledger:
    """Read the logs and the database after the drain and count what survived."""
    ledger = Ledger(runs=len(runs))
    effects = read_effects(log)
    by_step: dict[tuple[str, str], list[Effect]] = collections.defaultdict(list)
    for effect in effects:
        by_step[effect.run_id, effect.step].append(effect)
    begins = collections.Counter((line[0], line[1]) for line in _lines(Path(f"{log}.begin")))
    ledger.reexecutions = sum(n - 1 for n in begins.values())
    ledger.at_least_once_reruns = sum(len(found) - 1 for found in by_step.values())
    for run in runs:
        stored = await durably.get_run(run.id)
        if stored is None or stored.status != "completed":
            ledger.runs_lost.append(run.id)
            continue
        for step in await durably.get_steps(run.id):
            _check_step(ledger, run.id, step, by_step[run.id, step.name])
    _count_events(ledger, Path(f"{log}.events"), {run.id for run in runs})
    return ledger


def _check_step(ledger: Ledger, run_id: str, step: Any, executions: list[Effect]) -> None:
    """The stored result came from a real execution; no other one wrote after it was stored."""
    output = step.output
    if not isinstance(output, dict):  # a sleep's deadline, not a side effect
        return
    ledger.steps_per_host[output["host"]] += 1
    kept = (output["pid"], output["started_ns"])
    if not any((e.pid, e.started_ns) == kept for e in executions):
        ledger.stored_without_effect.append((run_id, step.name))
    stored_ns = to_ns(step.completed_at) + CLOCK_RESOLUTION_NS
    for e in executions:
        if (e.pid, e.started_ns) != kept and e.ended_ns > stored_ns:
            ledger.stored_steps_rerun.append((run_id, step.name, e.pid))


def _count_events(ledger: Ledger, events: Path, run_ids: set[str]) -> None:
    completions: collections.Counter[str] = collections.Counter()
    for kind, run_id, host, _pid, detail in _lines(events):
        if kind == "run:complete":
            completions[run_id] += 1
        elif kind == "run:wait":
            ledger.waits[run_id] += 1
        else:
            ledger.worker_errors[detail] += 1
            ledger.errors_by_host[host] += 1
    ledger.completed_twice = sorted(run_id for run_id, n in completions.items() if n > 1)
    ledger.completion_unreported = len(run_ids - set(completions))
