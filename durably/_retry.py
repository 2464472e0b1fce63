"""Retry policies and step timeouts (SPEC §12): when to try again, how long to wait first.

The model is Temporal's retry policy: a number of attempts, an initial delay growing by a
backoff coefficient up to a maximum, and errors that are never retried. The waiting itself
is the engine's: a run waits as a ``pending`` run with a ``wake_at`` (database clock), a
step sleeps in place or, for longer than a lease, postpones its run the same way.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import anyio

from durably.errors import ConfigurationError, NonRetryableError

T = TypeVar("T")


def _seconds(field: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(
            f"RetryPolicy: {field} must be a number of seconds or a timedelta, got {value!r}"
        )
    if value < minimum:
        raise ConfigurationError(f"RetryPolicy: {field} must be at least {minimum:g}, got {value!r}")
    return float(value)


def _error_classes(value: object) -> tuple[type[BaseException], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(cls, type) and issubclass(cls, BaseException) for cls in value
    ):
        raise ConfigurationError(f"RetryPolicy: retry_on must be a tuple of exception classes, got {value!r}")
    return tuple(value)


@dataclass(frozen=True, init=False)
class RetryPolicy:
    """How a failed run or step is tried again: ``max_attempts`` in all (the first included).

    The n-th retry waits ``initial_delay * backoff ** (n - 1)`` seconds, at most
    ``max_delay``; with ``jitter`` each wait is drawn between half and all of that, so
    runs that failed together do not all come back at once. Only exceptions that are
    instances of ``retry_on`` are retried, and never a ``NonRetryableError``.
    """

    max_attempts: int
    initial_delay: float
    backoff: float
    max_delay: float
    jitter: bool
    retry_on: tuple[type[BaseException], ...]

    def __init__(
        self,
        max_attempts: int = 3,
        initial_delay: float | timedelta = 1.0,
        backoff: float = 2.0,
        max_delay: float | timedelta = 300.0,
        jitter: bool = True,
        retry_on: tuple[type[BaseException], ...] | type[BaseException] = (Exception,),
    ) -> None:
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy: max_attempts must be an int of at least 1, got {max_attempts!r}"
            )
        if not isinstance(jitter, bool):
            raise ConfigurationError(f"RetryPolicy: jitter must be True or False, got {jitter!r}")
        object.__setattr__(self, "max_attempts", max_attempts)
        object.__setattr__(self, "initial_delay", _seconds("initial_delay", initial_delay))
        object.__setattr__(self, "backoff", _seconds("backoff", backoff, minimum=1.0))
        object.__setattr__(self, "max_delay", _seconds("max_delay", max_delay))
        object.__setattr__(self, "jitter", jitter)
        object.__setattr__(self, "retry_on", _error_classes(retry_on))

    def retries(self, exc: BaseException) -> bool:
        """Whether ``exc`` may be retried at all (attempts left aside)."""
        return not isinstance(exc, NonRetryableError) and isinstance(exc, self.retry_on)

    def delay(self, failed_attempt: int) -> float:
        """Seconds to wait after attempt number ``failed_attempt`` (1-based) failed."""
        try:
            grown = self.initial_delay * self.backoff ** (failed_attempt - 1)
        except OverflowError:  # a very large attempt count: far past the maximum
            grown = math.inf
        base = min(self.max_delay, grown) if self.initial_delay else 0.0
        return base * random.uniform(0.5, 1.0) if self.jitter else base


def next_delay(policy: RetryPolicy | None, exc: BaseException, failed_attempt: int) -> float | None:
    """The wait before trying again after ``exc`` failed attempt ``failed_attempt``; None: fail now."""
    if policy is None or failed_attempt >= policy.max_attempts or not policy.retries(exc):
        return None
    return policy.delay(failed_attempt)


def check_policy(policy: object, where: str) -> RetryPolicy | None:
    """``retries=`` as given to ``define_job`` or ``step.run``: a RetryPolicy or None."""
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise ConfigurationError(f"{where}: retries must be a RetryPolicy or None, got {policy!r}")
    return policy


def check_timeout(timeout: object, where: str) -> float | None:
    """``timeout=`` of ``step.run``: positive seconds (or a timedelta), or None."""
    if isinstance(timeout, timedelta):
        timeout = timeout.total_seconds()
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigurationError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


async def call_with_timeout(call: Callable[[], Awaitable[T]], timeout: float | None, name: str) -> T:
    """Await a step's call; past ``timeout`` seconds it fails with ``TimeoutError``.

    An async function is cancelled. A sync one's thread cannot be stopped: it runs on
    and its late result is discarded.
    """
    if timeout is None:
        return await call()
    with anyio.move_on_after(timeout):
        return await call()
    raise TimeoutError(f"step {name!r} ran longer than its timeout of {timeout:g} s")


class StepAttempts:
    """The attempts of one step, counted on from those stored before a crash or postponement."""

    def __init__(self, name: str, stored: int, policy: RetryPolicy | None, timeout: float | None) -> None:
        self.name = name
        self.count = stored
        self._policy = policy
        self._timeout = timeout

    async def call(
        self, call: Callable[[], Awaitable[T]], back_off: Callable[[Exception, float], Awaitable[None]]
    ) -> T:
        """Call until an attempt succeeds; after a failure with attempts left, ``back_off``
        (which stores it and waits the delay given); the last error once none is left."""
        if self._policy is None and self._timeout is None:  # most steps: one plain call
            self.count += 1
            return await call()
        while True:
            self.count += 1
            try:
                return await call_with_timeout(call, self._timeout, self.name)
            except Exception as exc:
                delay = next_delay(self._policy, exc, self.count)
                if delay is None:
                    raise
                await back_off(exc, delay)
