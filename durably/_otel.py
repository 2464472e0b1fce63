"""OpenTelemetry (SPEC §14): linked spans and metrics when configured, nothing otherwise.

Like Celery's instrumentation: a producer span on trigger whose context is stored with the
run (the "message"), a consumer span per execution linked to it, a child span per executed
step. ``opentelemetry`` is imported at the first trigger or execution, never by
``import durably``; without it, or while neither a tracer nor a meter provider is
configured, every hook is a shared no-op.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import msgspec

from durably import _codec

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span

    from durably._models import ClaimedRun, Finished, NewRun

__all__ = ["Otel", "RunTrace", "force_off"]


_NULL: AbstractContextManager[None] = nullcontext()
_ENDING_STATUSES = frozenset({"completed", "failed", "cancelled"})
_forced_off = False


def force_off(off: bool = True) -> None:
    """Never look for OpenTelemetry in instances created from now on (the benchmark's baseline)."""
    global _forced_off
    _forced_off = off


class RunTrace:
    """One execution's telemetry. This base records nothing: it is what runs get without OTel."""

    def span(self, stop_reason: Callable[[], str | None]) -> AbstractContextManager[None]:
        """The ``durably.run`` span around the execution; ``stop_reason`` names an early end."""
        return _NULL

    def step(self, name: str, index: int) -> AbstractContextManager[None]:
        """The ``durably.step`` span around one executed step."""
        return _NULL

    def skipped(self, name: str, index: int) -> None:
        """A replayed step: an event on the run span, not a span."""

    def noting(self, finished: Finished) -> Finished:
        """``finished`` (the engine's end-of-run callback), also telling this trace the outcome."""
        return finished


_NO_RUN_TRACE = RunTrace()


class Otel:
    """The telemetry of one ``Durably`` instance.

    Whether a provider is configured is checked at each trigger and execution (two global
    reads), so one configured after the instance was made is picked up.
    """

    def __init__(self) -> None:
        self._looked = _forced_off  # forced off: never import opentelemetry
        self._api: _Api | None = None

    def _live(self) -> _Api | None:
        if not self._looked:
            self._looked = True
            try:
                self._api = _Api()
            except ImportError:  # the durably[otel] extra is not installed
                self._api = None
        api = self._api
        return api if api is not None and api.configured() else None

    def trigger(self, job_name: str, new_runs: Sequence[NewRun]) -> AbstractContextManager[None]:
        """The ``durably.trigger`` span around writing ``new_runs``; stores its context on each."""
        api = self._live()
        return _NULL if api is None else api.trigger(job_name, new_runs)

    def run(self, claimed: ClaimedRun) -> RunTrace:
        """The telemetry of a run just claimed (its claim lag is recorded now)."""
        api = self._live()
        return _NO_RUN_TRACE if api is None else _LiveRunTrace(api, claimed)


class _Api:
    """The opentelemetry API, imported on first use, and durably's tracer and instruments."""

    def __init__(self) -> None:
        from opentelemetry import metrics, propagate, trace
        from opentelemetry.context import Context

        self.trace = trace
        # No parent for run spans: each execution starts its own trace, linked to its trigger
        # (docs/telemetry.md says why).
        self.root = Context()
        self._metrics = metrics
        self._propagate = propagate
        self._providers: tuple[object, object] | None = None
        self._configured = False

    def configured(self) -> bool:
        """Whether a real tracer or meter provider is set; instruments follow a provider change."""
        providers = (self.trace.get_tracer_provider(), self._metrics.get_meter_provider())
        if providers != self._providers:
            self._providers = providers
            # The API's own providers (the default proxies, the no-ops) record nothing.
            self._configured = any(
                not type(provider).__module__.startswith(("opentelemetry.trace", "opentelemetry.metrics"))
                for provider in providers
            )
            if self._configured:
                self._make_instruments()
        return self._configured

    def _make_instruments(self) -> None:
        self.tracer = self.trace.get_tracer("durably")
        meter = self._metrics.get_meter("durably")
        self.runs_ended = meter.create_counter(
            "durably.runs.ended", unit="{run}", description="Runs that ended, by status"
        )
        self.run_duration = meter.create_histogram(
            "durably.run.duration", unit="s", description="One execution of a run, by outcome"
        )
        self.step_duration = meter.create_histogram(
            "durably.step.duration", unit="s", description="One executed step, by outcome"
        )
        self.claim_lag = meter.create_histogram(
            "durably.claim.lag", unit="s", description="From a run being due to its first claim"
        )

    @contextmanager
    def trigger(self, job_name: str, new_runs: Sequence[NewRun]) -> Iterator[None]:
        # One span per trigger call: the runs are written in one atomic statement batch, so
        # the call is the producer's single operation; each run stores its context.
        attributes: dict[str, Any] = {"durably.job": job_name}
        if len(new_runs) == 1:
            attributes["durably.run_id"] = new_runs[0].id
        else:
            attributes["messaging.batch.message_count"] = len(new_runs)
        kind = self.trace.SpanKind.PRODUCER
        with self.tracer.start_as_current_span("durably.trigger", kind=kind, attributes=attributes):
            carrier: dict[str, str] = {}
            self._propagate.inject(carrier)
            stored = _codec.encode(carrier).decode() if carrier else None
            for new_run in new_runs:
                new_run.trace_context = stored
            yield

    def links(self, stored: str | None) -> list[Link]:
        """A link to the trigger span whose context a run stored (none if absent or unreadable)."""
        if stored is None:
            return []
        try:
            carrier: dict[str, str] = _codec.decode_as(stored, dict[str, str])
        except msgspec.DecodeError:
            return []
        span_context = self.trace.get_current_span(self._propagate.extract(carrier)).get_span_context()
        return [self.trace.Link(span_context)] if span_context.is_valid else []

    def set_error(self, span: Span, description: str | None) -> None:
        span.set_status(self.trace.Status(self.trace.StatusCode.ERROR, description))


class _LiveRunTrace(RunTrace):
    def __init__(self, api: _Api, claimed: ClaimedRun) -> None:
        run = claimed.run
        self._api = api
        self._job = {"durably.job": run.job_name}
        self._attributes: dict[str, str | int] = {
            "durably.run_id": run.id,
            "durably.job": run.job_name,
            "durably.attempt": run.attempt,
        }
        self._links = api.links(claimed.trace_context)
        self._context: Context | None = None
        self._span: Span | None = None
        self._status: str | None = None
        self._error: str | None = None
        # The first claim only: then both times are the database's (started_at is set by
        # that claim) and the due time is the run's own, not an earlier lease's expiry.
        if claimed.lease_generation == 1 and run.started_at is not None:
            due = run.wake_at or run.created_at
            api.claim_lag.record(max(0.0, (run.started_at - due).total_seconds()), self._job)

    @contextmanager
    def span(self, stop_reason: Callable[[], str | None]) -> Iterator[None]:
        api = self._api
        started = time.perf_counter()
        with api.tracer.start_as_current_span(
            "durably.run",
            context=api.root,
            kind=api.trace.SpanKind.CONSUMER,
            links=self._links,
            attributes=self._attributes,
        ) as span:
            self._span = span
            self._context = api.trace.set_span_in_context(span)
            try:
                yield
            finally:
                outcome = self._status or stop_reason() or "interrupted"
                span.set_attribute("durably.outcome", outcome)
                if outcome == "failed":
                    api.set_error(span, self._error)
                if outcome in _ENDING_STATUSES:
                    api.runs_ended.add(1, {**self._job, "durably.status": outcome})
                api.run_duration.record(
                    time.perf_counter() - started, {**self._job, "durably.outcome": outcome}
                )

    @contextmanager
    def step(self, name: str, index: int) -> Iterator[None]:
        api = self._api
        attributes: dict[str, str | int] = {
            **self._attributes,
            "durably.step": name,
            "durably.step_index": index,
        }
        started = time.perf_counter()
        outcome = "interrupted"  # unless it returns or raises: cancelled, lease lost, shutdown
        with api.tracer.start_as_current_span(
            "durably.step", context=self._context, attributes=attributes
        ) as span:
            try:
                yield
                outcome = "completed"
            except Exception:
                outcome = "failed"  # the span records the exception and sets ERROR
                raise
            finally:
                span.set_attribute("durably.outcome", outcome)
                api.step_duration.record(
                    time.perf_counter() - started, {**self._job, "durably.outcome": outcome}
                )

    def skipped(self, name: str, index: int) -> None:
        if self._span is not None:
            self._span.add_event("durably.step.skipped", {"durably.step": name, "durably.step_index": index})

    def noting(self, finished: Finished) -> Finished:
        def note(run_id: str, status: str, output: bytes | None, error: str | None) -> None:
            self._status, self._error = status, error
            finished(run_id, status, output, error)

        return note
