"""A FastAPI app that mounts durably's dashboard and API, and triggers a job from its own endpoint.

Run: pip install 'durably[web]' fastapi && python examples/web/app.py
Then open http://127.0.0.1:8000/durably/ and POST to /reports:

    curl -X POST localhost:8000/reports -H 'Content-Type: application/json' -d '{"customer": "acme"}'
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import msgspec
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from durably import StepContext, create_durably, define_job
from durably.web import create_app


class ReportIn(msgspec.Struct):
    customer: str
    months: int = 6
    email: bool = True


class ReportOut(msgspec.Struct):
    customer: str
    total: int


@define_job(name="monthly-report", input=ReportIn, output=ReportOut)
async def monthly_report(step: StepContext, payload: ReportIn) -> ReportOut:
    total = 0
    for month in range(payload.months):
        # Each month is a checkpoint: after a crash the report resumes where it was.
        total += await step.run(f"month-{month + 1}", fetch_month, payload.customer, month)
        step.progress(month + 1, payload.months, f"month {month + 1}")
    if payload.email:
        await step.run("email", send_email, payload.customer, total)
    step.log.info("report ready", customer=payload.customer, total=total)
    return ReportOut(customer=payload.customer, total=total)


async def fetch_month(customer: str, month: int) -> int:
    await anyio.sleep(0.3)  # stands for a slow API call
    return 100 + 10 * month + len(customer)


def send_email(customer: str, total: int) -> dict[str, str]:
    return {"to": f"billing@{customer}.example", "subject": f"Your report: {total}"}


durably = create_durably(os.environ.get("TURSO_DATABASE_URL", "file:local.db")).register(
    monthly_report=monthly_report
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Migrates the schema and runs a worker in this process for as long as the app lives.
    async with durably:
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/durably", create_app(durably))  # the dashboard at /durably/, the API at /durably/api/


class ReportRequest(BaseModel):
    customer: str


@app.post("/reports", status_code=202)
async def request_report(request: ReportRequest) -> dict[str, str]:
    """The app's own endpoint: it triggers a run and answers at once with where to watch it."""
    run = await durably.jobs.monthly_report.trigger(
        {"customer": request.customer}, labels={"customer": request.customer}
    )
    return {"run_id": run.id, "status": run.status, "watch": f"/durably/#/runs/{run.id}"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
