"""The HTTP API of SPEC §13 in-process, through httpx's ASGITransport, on a local file."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.requests import HTTPConnection

from durably import ConfigurationError, Durably
from durably.web import create_app

from .app import make

pytestmark = pytest.mark.anyio
JSON = {"Content-Type": "application/json"}


def client_for(app: Any, base: str = "http://test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base)


@pytest.fixture
async def client(durably: Durably) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(create_app(durably)) as http:
        yield http


async def _trigger(client: httpx.AsyncClient, job: str = "greet", **body: Any) -> dict[str, Any]:
    body.setdefault("input", {"name": "ada"})
    response = await client.post(f"/api/jobs/{job}/trigger", json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == kind, error
    return str(error["message"])


async def test_jobs_come_with_the_json_schema_of_their_input(client: httpx.AsyncClient) -> None:
    jobs = (await client.get("/api/jobs")).json()["jobs"]
    assert [(job["name"], job["handle"]) for job in jobs] == [
        ("approve", "approve"),
        ("count", "count"),
        ("greet", "greet"),
    ]
    schema = jobs[2]["input_schema"]
    greet_in = schema["$defs"]["GreetIn"]
    assert greet_in["required"] == ["name"]
    assert greet_in["properties"]["times"] == {"type": "integer", "default": 1}


async def test_trigger_creates_then_returns_the_idempotent_run(
    client: httpx.AsyncClient, durably: Durably
) -> None:
    body = {"input": {"name": "ada"}, "idempotency_key": "k1", "labels": {"team": "a"}}
    first = await client.post("/api/jobs/greet/trigger", json=body)
    assert first.status_code == 201
    run = first.json()
    assert (run["status"], run["disposition"], run["labels"]) == ("pending", "created", {"team": "a"})
    again = await client.post("/api/jobs/greet/trigger", json=body)
    assert again.status_code == 200
    assert (again.json()["id"], again.json()["disposition"]) == (run["id"], "idempotent")
    assert len(await durably.get_runs()) == 1


@pytest.mark.parametrize(
    ("body", "status", "kind", "says"),
    [
        ({"input": {"name": "ada"}, "dealy": 5}, 422, "ValidationError", "dealy"),
        (
            {"input": {"name": "a"}, "delay": 5, "run_at": "2030-01-01T00:00:00Z"},
            422,
            "ValidationError",
            "delay",
        ),
        ({"input": {"name": "a"}, "run_at": "2030-01-01T00:00:00"}, 422, "ValidationError", "run_at"),
        ({"input": {"name": "a"}, "delay": -1}, 422, "ValidationError", "delay"),
        ({"input": {"name": "a"}, "priority": 1.5}, 422, "ValidationError", "priority"),
        ({"idempotency_key": "x"}, 422, "ValidationError", "input"),
        ({"input": {"name": 3}}, 422, "ValidationError", "name"),
        ({"input": {"name": "a"}, "labels": {"k": 1}}, 422, "ValidationError", "labels"),
        ({"input": {"name": "a"}, "idempotency_key": ""}, 422, "ValidationError", "idempotency_key"),
        ([1, 2], 422, "ValidationError", "object"),
    ],
)
async def test_a_refused_trigger_names_what_was_wrong_and_writes_nothing(
    client: httpx.AsyncClient, durably: Durably, body: Any, status: int, kind: str, says: str
) -> None:
    message = _error(await client.post("/api/jobs/greet/trigger", json=body), status, kind)
    assert says in message
    assert await durably.get_runs() == []


async def test_trigger_takes_delay_run_at_and_priority(client: httpx.AsyncClient) -> None:
    delayed = await _trigger(client, delay=60, priority=3)
    assert (delayed["priority"], delayed["status"]) == (3, "pending")
    assert delayed["wake_at"] is not None
    at = await _trigger(client, run_at="2030-01-01T00:00:00Z")
    assert at["wake_at"].startswith("2030-01-01T00:00:00")


async def test_signals_are_delivered_through_the_api(client: httpx.AsyncClient, durably: Durably) -> None:
    run = await _trigger(client)
    sent = await client.post(f"/api/runs/{run['id']}/signals/approve", json={"ok": True})
    assert sent.status_code == 202, sent.text
    _error(await client.post("/api/runs/X/signals/approve", json=1), 404, "NotFoundError")
    await durably.process_until_idle()  # greet completes (it waits for no signal)
    _error(await client.post(f"/api/runs/{run['id']}/signals/approve", json=1), 409, "ConflictError")
    _error(await client.post(f"/api/runs/{run['id']}/signals/approve", content=b"1"), 400, "BadRequest")


async def test_state_changes_must_be_json(client: httpx.AsyncClient, durably: Durably) -> None:
    form = await client.post("/api/jobs/greet/trigger", data={"input": "x"})
    assert "Content-Type: application/json" in _error(form, 400, "BadRequest")
    plain = await client.post("/api/jobs/greet/trigger", content=b'{"input": {"name": "a"}}')
    _error(plain, 400, "BadRequest")
    broken = await client.post("/api/jobs/greet/trigger", content=b"{nope", headers=JSON)
    assert "not valid JSON" in _error(broken, 400, "BadRequest")
    run = await _trigger(client)
    assert (await client.request("DELETE", f"/api/runs/{run['id']}")).status_code == 400
    assert [r.id for r in await durably.get_runs()] == [run["id"]]


async def test_unknown_jobs_and_runs_are_404(client: httpx.AsyncClient) -> None:
    assert "nope" in _error(
        await client.post("/api/jobs/nope/trigger", json={"input": {}}), 404, "NotFoundError"
    )
    for path in ("/api/runs/X", "/api/runs/X/steps", "/api/runs/X/logs", "/api/runs/X/events"):
        _error(await client.get(path), 404, "NotFoundError")
    for action in ("retry", "retrigger", "cancel"):
        _error(await client.post(f"/api/runs/X/{action}", json={}), 404, "NotFoundError")
    _error(await client.request("DELETE", "/api/runs/X", headers=JSON), 404, "NotFoundError")
    _error(await client.get("/api/nothing-here"), 404, "NotFoundError")


async def test_runs_filter_and_page_newest_first(client: httpx.AsyncClient, durably: Durably) -> None:
    made = [await _trigger(client, labels={"n": str(i % 2)}) for i in range(5)]
    made.append(await _trigger(client, "count", input={"steps": 1, "pause": 0}))
    await client.post(f"/api/runs/{made[0]['id']}/cancel", json={})
    newest = [run["id"] for run in reversed(made)]

    seen, cursor = [], None
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/api/runs", params=params)).json()
        seen += [run["id"] for run in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == newest

    async def ids(query: str) -> list[str]:
        response = await client.get(f"/api/runs?{query}")
        assert response.status_code == 200, response.text
        return [run["id"] for run in response.json()["runs"]]

    assert await ids("job=count") == [made[5]["id"]]
    assert await ids("status=cancelled") == [made[0]["id"]]
    assert await ids("status=pending,cancelled&job=greet&label=n:0") == [
        made[4]["id"],
        made[2]["id"],
        made[0]["id"],
    ]
    assert await ids("label=n:1&label=other:x") == []


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=501",
        "limit=x",
        "limit=-1",
        "status=running",
        "label=nocolon",
        "label=:v",
        "label=a:1&label=a:2",
    ],
)
async def test_bad_run_queries_are_422(client: httpx.AsyncClient, query: str) -> None:
    _error(await client.get(f"/api/runs?{query}"), 422, "ValidationError")
    _error(await client.get(f"/api/events?{query}"), 422, "ValidationError")


async def test_a_run_with_its_steps_and_logs_and_the_run_api(
    client: httpx.AsyncClient, durably: Durably
) -> None:
    run = await _trigger(client, input={"name": "bo", "times": 2})
    assert await durably.process_until_idle() == 1
    done = (await client.get(f"/api/runs/{run['id']}")).json()
    assert (done["status"], done["output"]) == ("completed", "hello bohello bo")
    steps = (await client.get(f"/api/runs/{run['id']}/steps")).json()["steps"]
    assert [(s["name"], s["status"], s["output"]) for s in steps] == [
        ("compose", "completed", "hello bohello bo")
    ]
    logs = (await client.get(f"/api/runs/{run['id']}/logs")).json()["logs"]
    assert [(log["message"], log["data"]) for log in logs] == [("composed", {"length": 16})]

    assert "completed" in _error(
        await client.post(f"/api/runs/{run['id']}/cancel", json={}), 409, "ConflictError"
    )
    _error(await client.post(f"/api/runs/{run['id']}/retry", json={}), 409, "ConflictError")
    again = await client.post(f"/api/runs/{run['id']}/retrigger", json={})
    assert again.status_code == 201
    assert (again.json()["input"], again.json()["status"]) == (
        {"name": "bo", "times": 2, "shout": False},
        "pending",
    )
    _error(
        await client.request("DELETE", f"/api/runs/{again.json()['id']}", headers=JSON), 409, "ConflictError"
    )
    cancelled = await client.post(f"/api/runs/{again.json()['id']}/cancel", json={})
    assert cancelled.json()["status"] == "cancelled"
    retried = await client.post(f"/api/runs/{again.json()['id']}/retry", json={})
    assert (retried.json()["status"], retried.json()["attempt"]) == ("pending", 2)
    deleted = await client.request("DELETE", f"/api/runs/{run['id']}", headers=JSON)
    assert deleted.json() == {"deleted": run["id"]}
    assert await durably.get_run(run["id"]) is None


async def test_auth_denies_with_401_sync_or_async(durably: Durably) -> None:
    def sync_auth(connection: HTTPConnection) -> bool:
        return connection.headers.get("authorization") == "Bearer good"

    async def async_auth(connection: HTTPConnection) -> bool:
        return sync_auth(connection)

    for auth in (sync_auth, async_auth):
        async with client_for(create_app(durably, auth=auth)) as http:
            for path in ("/api/jobs", "/api/runs", "/", "/static/app.js"):
                _error(await http.get(path), 401, "Unauthorized")
            _error(
                await http.post("/api/jobs/greet/trigger", json={"input": {"name": "a"}}), 401, "Unauthorized"
            )
            good = {"Authorization": "Bearer good"}
            assert (await http.get("/api/jobs", headers=good)).status_code == 200
    assert await durably.get_runs() == []


async def test_two_apps_mounted_side_by_side_keep_to_their_own_instance(tmp_path: Path) -> None:
    first, second = make(f"file:{tmp_path / 'a.db'}"), make(f"file:{tmp_path / 'b.db'}")
    api = FastAPI()
    api.mount("/a", create_app(first))
    api.mount("/b", create_app(second, dashboard=False))
    try:
        async with client_for(api) as http:
            response = await http.post("/a/api/jobs/greet/trigger", json={"input": {"name": "x"}})
            assert response.status_code == 201
            assert len((await http.get("/a/api/runs")).json()["runs"]) == 1
            assert (await http.get("/b/api/runs")).json()["runs"] == []
            page = await http.get("/a/")
            assert page.status_code == 200 and "<title>durably</title>" in page.text
            assert (await http.get("/b/")).status_code == 404
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/api/runs?cursor=" + "z" * 5000, None),
        ("GET", "/api/runs?limit=99999999999999999999999", None),
        ("GET", "/api/runs/%00", None),
        ("POST", "/api/jobs/greet/trigger", b'{"input": {"name": "a", "times": 99999999999999999999999}}'),
        ("POST", "/api/jobs/greet/trigger", b'{"input": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
        ("POST", "/api/jobs/count/trigger", b'{"input": {"x": NaN}}'),
        ("POST", "/api/jobs/count/trigger", b'{"input": {"x": 1e999}}'),
        ("POST", "/api/jobs/count/trigger", b'{"input": {"x": "\\ud800"}}'),
        ("POST", "/api/jobs/%FF/trigger", b"{}"),
        ("POST", "/api/runs/X/retry", b"not json at all"),
        ("PUT", "/api/runs", b"{}"),
    ],
)
async def test_bad_input_never_gives_a_500(
    client: httpx.AsyncClient, method: str, path: str, body: bytes | None
) -> None:
    response = await client.request(method, path, content=body, headers=JSON)
    assert response.status_code < 500, response.text
    assert response.status_code in (200, 201) or "error" in response.json()


async def test_the_dashboard_is_served_from_package_data(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/app.js"' in page.text and "http" not in page.text.split("<body>")[0]
    script = await client.get("/static/app.js")
    assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert "EventSource" in script.text
    assert (await client.get("/static/app.css")).headers["content-type"].startswith("text/css")


async def test_create_app_refuses_what_is_not_a_durably_instance_or_an_auth_callable(
    durably: Durably,
) -> None:
    with pytest.raises(ConfigurationError, match="Durably instance"):
        create_app("file:x.db")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="auth"):
        create_app(durably, auth="secret")  # type: ignore[arg-type]
