"""The JSON endpoints of SPEC §13 over one ``Durably`` instance."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from durably._models import Run
from durably._storage._protocol import RunFilter
from durably.errors import ConflictError, DurablyError, NotFoundError, StorageError, ValidationError
from durably.web._changes import ChangeFeed
from durably.web._sse import all_events, run_events

if TYPE_CHECKING:
    from durably._engine import Durably

_encoder = msgspec.json.Encoder()
_STATUSES = ("pending", "leased", "waiting", "completed", "failed", "cancelled")
MAX_LIMIT = 500

STATUS_CODES: dict[type[DurablyError], int] = {
    ValidationError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    StorageError: 503,
}


class BadRequest(DurablyError):
    """A request durably cannot read (not JSON, a wrong content type …): 400."""


class TriggerBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /api/jobs/{job}/trigger``: only the trigger options that exist today."""

    input: Any
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    labels: dict[str, str] | None = None
    delay: float | None = None
    run_at: datetime | None = None
    priority: int = 0


def json_response(data: Any, status_code: int = 200) -> Response:
    return Response(_encoder.encode(data), status_code=status_code, media_type="application/json")


def error_response(status_code: int, kind: str, message: str) -> Response:
    return json_response({"error": {"type": kind, "message": message}}, status_code)


def _input_schema(input_type: Any) -> Any:
    try:
        return msgspec.json.schema(input_type)
    except (TypeError, ValueError):  # a type msgspec cannot describe: accept any JSON
        return {}


def _query_filter(request: Request) -> RunFilter:
    """``?status=&job=&label=key:value&limit=&cursor=`` (status and job may repeat or use commas)."""
    params = request.query_params
    statuses = tuple(s for value in params.getlist("status") for s in value.split(",") if s)
    for status in statuses:
        if status not in _STATUSES:
            raise ValidationError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
    jobs = tuple(j for value in params.getlist("job") for j in value.split(",") if j)
    labels: dict[str, str] = {}
    for label in params.getlist("label"):
        key, sep, value = label.partition(":")
        if not sep or not key:
            raise ValidationError(f"label must be key:value, got {label!r}")
        if labels.get(key, value) != value:
            raise ValidationError(f"label {key!r} is given twice with different values")
        labels[key] = value
    raw_limit = params.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ValidationError(f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw_limit!r}")
    return RunFilter(
        statuses=statuses,
        job_names=jobs,
        labels=labels,
        limit=int(raw_limit),
        before_id=params.get("cursor") or None,
    )


def _matcher(run_filter: RunFilter) -> Callable[[Run], bool]:
    def matches(run: Run) -> bool:
        return (
            (not run_filter.statuses or run.status in run_filter.statuses)
            and (not run_filter.job_names or run.job_name in run_filter.job_names)
            and all(run.labels.get(k) == v for k, v in run_filter.labels.items())
        )

    return matches


async def _body(request: Request, type_: type[Any]) -> Any:
    data = await request.body()
    try:
        return msgspec.json.decode(data or b"null", type=type_)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"request body: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValidationError("request body is nested too deep") from exc


def _stream(body: Any) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


class Api:
    """The endpoints, bound to one instance and its change feed (no global state)."""

    def __init__(self, durably: Durably, feed: ChangeFeed) -> None:
        self.durably = durably
        self.feed = feed
        self._migrated = False

    async def _ready(self) -> None:
        if not self._migrated:
            await self.durably.migrate()
            self._migrated = True

    def routes(self) -> list[Route]:
        return [
            Route("/api/jobs", self.jobs),
            Route("/api/jobs/{job}/trigger", self.trigger, methods=["POST"]),
            Route("/api/runs", self.runs),
            Route("/api/runs/{id}", self.run, methods=["GET"]),
            Route("/api/runs/{id}", self.delete, methods=["DELETE"]),
            Route("/api/runs/{id}/steps", self.steps),
            Route("/api/runs/{id}/logs", self.logs),
            Route("/api/runs/{id}/retry", self.retry, methods=["POST"]),
            Route("/api/runs/{id}/retrigger", self.retrigger, methods=["POST"]),
            Route("/api/runs/{id}/cancel", self.cancel, methods=["POST"]),
            Route("/api/runs/{id}/signals/{name}", self.signal, methods=["POST"]),
            Route("/api/runs/{id}/events", self.run_events),
            Route("/api/events", self.events),
        ]

    async def jobs(self, request: Request) -> Response:
        jobs = []
        for key in self.durably.jobs:
            handle = self.durably.jobs[key]
            schema = _input_schema(handle.definition.input_type)
            jobs.append({"name": handle.name, "handle": key, "input_schema": schema})
        return json_response({"jobs": sorted(jobs, key=lambda job: str(job["name"]))})

    async def trigger(self, request: Request) -> Response:
        handle = self.durably.job(request.path_params["job"])
        body: TriggerBody = await _body(request, TriggerBody)
        await self._ready()
        run = await handle.trigger(
            body.input,
            idempotency_key=body.idempotency_key,
            concurrency_key=body.concurrency_key,
            labels=body.labels,
            delay=body.delay,
            run_at=body.run_at,
            priority=body.priority,
        )
        return json_response(run, 201 if run.disposition == "created" else 200)

    async def runs(self, request: Request) -> Response:
        run_filter = _query_filter(request)
        await self._ready()
        page = await self.durably.storage.get_runs(
            msgspec.structs.replace(run_filter, limit=run_filter.limit + 1)
        )
        more = len(page) > run_filter.limit
        runs = page[: run_filter.limit]
        return json_response({"runs": runs, "next_cursor": runs[-1].id if more else None})

    async def _run(self, request: Request) -> Run:
        await self._ready()
        run_id = request.path_params["id"]
        run = await self.durably.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return run

    async def run(self, request: Request) -> Response:
        return json_response(await self._run(request))

    async def steps(self, request: Request) -> Response:
        await self._ready()
        return json_response({"steps": await self.durably.get_steps(request.path_params["id"])})

    async def logs(self, request: Request) -> Response:
        await self._ready()
        return json_response({"logs": await self.durably.get_logs(request.path_params["id"])})

    async def retry(self, request: Request) -> Response:
        await self._ready()
        return json_response(await self.durably.retry(request.path_params["id"]))

    async def retrigger(self, request: Request) -> Response:
        await self._ready()
        return json_response(await self.durably.retrigger(request.path_params["id"]), 201)

    async def cancel(self, request: Request) -> Response:
        await self._ready()
        return json_response(await self.durably.cancel(request.path_params["id"]))

    async def signal(self, request: Request) -> Response:
        """The body is the signal's payload (any JSON)."""
        payload = await _body(request, Any)
        await self._ready()
        run_id, name = request.path_params["id"], request.path_params["name"]
        await self.durably.signal(run_id, name, payload)
        return json_response({"signalled": run_id, "name": name}, 202)

    async def delete(self, request: Request) -> Response:
        await self._ready()
        await self.durably.delete_run(request.path_params["id"])
        return json_response({"deleted": request.path_params["id"]})

    async def run_events(self, request: Request) -> Response:
        run = await self._run(request)
        last = request.headers.get("last-event-id")
        return _stream(run_events(self.durably, self.feed, run.id, last))

    async def events(self, request: Request) -> Response:
        matches = _matcher(_query_filter(request))
        await self._ready()
        return _stream(all_events(self.feed, matches))
