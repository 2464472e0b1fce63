"""An idle worker's polling backoff (durably/_polling.py): fewer claims while nothing happens,
no later pickup of work this process knows of, and a bounded one for work made elsewhere.

Times are never asserted as limits of speed: each bound below is seconds away from what
the worker would do without the behaviour under test.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from durably import ConfigurationError, Durably, RetryPolicy, StepContext, create_durably, define_job
from durably._polling import MAX_DUE_TIMES, IdlePolling
from durably._storage._protocol import Storage

from .conftest import Database

pytestmark = pytest.mark.anyio

DUE = 2.5  # seconds until a run made to wait here becomes claimable
INTERVAL = 0.3  # idle claims without hints: +0.3, 0.9, 2.1, 4.5 s (the first after DUE: 2 s late)


class CountingClaims:
    """A real storage whose ``claim_runs`` calls are timed (monotonic seconds)."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.claims: list[float] = []
        self._claimed = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_runs(self, **options: Any) -> Any:
        self.claims.append(anyio.current_time())
        self._claimed.set()
        self._claimed = anyio.Event()
        return await self._inner.claim_runs(**options)

    def since(self, moment: float) -> int:
        return sum(claimed >= moment for claimed in self.claims)

    async def until_waiting_at_least(self, seconds: float) -> None:
        """Return right after a claim that followed an idle wait of ``seconds`` or more."""
        with anyio.fail_after(60):
            while len(self.claims) < 2 or self.claims[-1] - self.claims[-2] < seconds:
                await self._claimed.wait()


def counted(database: Database, **options: Any) -> tuple[Durably, CountingClaims]:
    storage = CountingClaims(database.open())
    options.setdefault("heartbeat_interval", 0.1)
    options.setdefault("stale_threshold", 1.0)
    return create_durably(storage, **options), storage  # type: ignore[arg-type]


@define_job(name="idle-echo", input=dict[str, Any])
async def echo(step: StepContext, payload: dict[str, Any]) -> Any:
    return payload


@define_job(name="idle-signalled", input=dict[str, Any])
async def signalled(step: StepContext, payload: dict[str, Any]) -> Any:
    return await step.wait_for_signal("go")


@define_job(name="idle-sleeper", input=dict[str, Any])
async def sleeper(step: StepContext, payload: dict[str, Any]) -> Any:
    await step.sleep("nap", DUE)
    return "rested"


@define_job(
    name="idle-retried",
    input=dict[str, Any],
    retries=RetryPolicy(max_attempts=2, initial_delay=DUE, jitter=False),
)
async def retried(step: StepContext, payload: dict[str, Any]) -> Any:
    if step.attempt == 1:
        raise RuntimeError("first attempt fails")
    return "retried"


_failed_once: set[str] = set()


def _flaky(key: str) -> str:
    if key not in _failed_once:
        _failed_once.add(key)
        raise RuntimeError("first attempt fails")
    return "done"


@define_job(name="idle-postponed", input=dict[str, Any])
async def postponed(step: StepContext, payload: dict[str, Any]) -> Any:
    # A backoff longer than the lease (1 s) releases the run to wait as a pending run.
    policy = RetryPolicy(max_attempts=2, initial_delay=DUE, jitter=False)
    return await step.run("flaky", _flaky, payload["key"], retries=policy)


async def test_an_idle_worker_backs_off_to_its_ceiling(database: Database) -> None:
    durably, storage = counted(database, polling_interval=0.01, max_polling_interval=0.32)
    async with durably.register(echo=echo):
        await anyio.sleep(3.0)
    # Without the backoff: ~300 claims. With it: 6 to reach the ceiling, then ~8 more.
    assert len(storage.claims) <= 20, len(storage.claims)
    gaps = [later - earlier for earlier, later in zip(storage.claims, storage.claims[1:], strict=False)]
    assert min(gaps[-3:]) >= 0.32  # the ceiling reached; a wait never ends early


async def test_polling_starts_over_after_work(database: Database) -> None:
    durably, storage = counted(database, polling_interval=0.05, max_polling_interval=5.0)
    async with durably.register(echo=echo):
        await storage.until_waiting_at_least(1.6)  # now waiting 3.2 s, then 5 s
        result = await durably.jobs.echo.trigger_and_wait({"n": 1}, timeout=10)
        done = anyio.current_time()
        await anyio.sleep(1.0)
    assert result.output == {"n": 1}
    # Idle claims again after 0.05, 0.15, 0.35, 0.75 s; without starting over: none.
    assert storage.since(done) >= 3, storage.claims


@pytest.mark.parametrize("kind", ["trigger", "signal"])
async def test_work_made_here_wakes_a_backed_off_worker_at_once(database: Database, kind: str) -> None:
    durably, storage = counted(database, polling_interval=0.5, max_polling_interval=30.0)
    async with durably.register(echo=echo, signalled=signalled):
        waiting = await durably.jobs.signalled.trigger({}) if kind == "signal" else None
        await storage.until_waiting_at_least(1.9)  # the worker now waits 4 s
        started = anyio.current_time()
        if waiting is None:
            run_id = (await durably.jobs.echo.trigger({})).id
        else:
            await durably.signal(waiting.id, "go", "now")
            run_id = waiting.id
        run = await durably.wait_for_run(run_id, timeout=30)
        took = anyio.current_time() - started
    assert run.status == "completed"
    assert took < 1.5, f"picked up after {took:.2f} s: the worker was not woken"


@pytest.mark.parametrize("kind", ["sleep", "retry", "postponed step", "delayed trigger"])
async def test_a_due_time_known_here_is_kept_under_a_large_ceiling(database: Database, kind: str) -> None:
    durably, _ = counted(database, polling_interval=INTERVAL, max_polling_interval=30.0)
    durably.register(sleeper=sleeper, retried=retried, postponed=postponed, echo=echo)
    async with durably:
        started = anyio.current_time()
        if kind == "sleep":
            run = await durably.jobs.sleeper.trigger({})
        elif kind == "retry":
            run = await durably.jobs.retried.trigger({})
        elif kind == "postponed step":
            run = await durably.jobs.postponed.trigger({"key": f"{database.kind}-{started}"})
        else:
            run = await durably.jobs.echo.trigger({}, delay=DUE)
        ended = await durably.wait_for_run(run.id, timeout=30)
        took = anyio.current_time() - started
    assert ended.status == "completed", ended.error
    # Without the due time, the backed-off worker would claim it at ~4.5 s.
    assert DUE - 0.1 <= took < DUE + 1.2, f"claimed {took - DUE:+.2f} s from its due time"


async def test_a_run_triggered_elsewhere_is_picked_up_within_the_ceiling(database: Database) -> None:
    durably, storage = counted(database, polling_interval=0.05, max_polling_interval=1.0)
    elsewhere = create_durably(database.open()).register(echo=echo)  # never started: no worker
    try:
        async with durably.register(echo=echo):
            await storage.until_waiting_at_least(0.95)  # backed off to the ceiling
            started = anyio.current_time()
            run = await elsewhere.jobs.echo.trigger({"from": "elsewhere"})
            ended = await durably.wait_for_run(run.id, timeout=30)
            took = anyio.current_time() - started
    finally:
        await elsewhere.close()
    assert ended.status == "completed"
    assert took < 1.0 + 1.5, f"picked up after {took:.2f} s, ceiling 1 s"


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"max_polling_interval": 0}, "positive"),
        ({"max_polling_interval": -1.0}, "positive"),
        ({"max_polling_interval": float("nan")}, "positive"),
        ({"max_polling_interval": float("inf")}, "positive"),
        ({"max_polling_interval": "2"}, "positive"),
        ({"max_polling_interval": True}, "positive"),
        ({"polling_interval": 0.5, "max_polling_interval": 0.2}, "at least polling_interval"),
    ],
)
def test_bad_ceilings_are_refused(options: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigurationError, match="max_polling_interval") as refused:
        create_durably("file:never-opened.db", **options)
    assert words in str(refused.value)


def test_the_default_ceiling_follows_a_longer_polling_interval() -> None:
    create_durably("file:never-opened.db", polling_interval=5.0)  # default 2 s would be refused
    create_durably("file:never-opened.db", polling_interval=0.5, max_polling_interval=0.5)


def test_the_due_times_kept_are_bounded_to_the_earliest() -> None:
    polling = IdlePolling(0.1, 2.0)
    for at in reversed(range(1, MAX_DUE_TIMES * 3)):  # a process with thousands of sleepers
        polling.expect(float(at))
    assert polling.earliest_due() == 1.0
    assert polling.take_due(float(MAX_DUE_TIMES))  # the earliest ones are all kept
    assert not polling.take_due(float(MAX_DUE_TIMES * 3))  # the later ones were let go
    assert polling.earliest_due() == float("inf")
