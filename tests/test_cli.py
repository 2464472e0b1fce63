"""The ``durably`` command, run as a real process against a SQLite file and a test app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
APP = "tests.apps.cli_app:durably"


@dataclass
class Cli:
    """Runs ``python -m durably`` with the test database in ``$DURABLY_TEST_DB``."""

    url: str
    env: dict[str, str]

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "durably", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "durably", *args],
            check=False,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=30,
        )

    def ok(self, *args: str) -> str:
        """Stdout of a command that must succeed."""
        result = self(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def runs(self, *args: str) -> list[dict[str, Any]]:
        return msgspec.json.decode(self.ok("runs", "--db", self.url, "--json", *args))  # type: ignore[no-any-return]

    def trigger(self, job: str, payload: str, *args: str) -> str:
        """Trigger without waiting; the new run's id."""
        run_id, disposition = self.ok("trigger", "--app", APP, job, "--input", payload, *args).split()
        assert disposition == "created"
        return run_id


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    url = f"file:{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURSO_")}
    env["DURABLY_TEST_DB"] = url
    cli = Cli(url=url, env=env)
    cli.ok("migrate", "--db", url)
    return cli


def one_error_line(result: subprocess.CompletedProcess[str], status: int) -> str:
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("durably: error: ")
    return lines[0]


# --- migrate and trigger ----------------------------------------------------------------------


def test_migrate_is_idempotent_and_leaves_an_empty_database(cli: Cli) -> None:
    assert cli.ok("migrate", "--db", cli.url) == f"{cli.url}: schema is up to date\n"
    assert cli.runs() == []
    assert cli.ok("runs", "--db", cli.url).splitlines() == [
        "ID  JOB  STATUS  ATTEMPT  CREATED (UTC)  PROGRESS  ERROR"
    ]


def test_trigger_prints_the_run_id_and_its_disposition(cli: Cli) -> None:
    first = cli.trigger("echo", '{"a": 1}', "--idempotency-key", "k1", "--concurrency-key", "c")
    again = cli.ok("trigger", "--app", APP, "echo", "--input", '{"a": 2}', "--idempotency-key", "k1")
    assert again.split() == [first, "idempotent"]
    [run] = cli.runs()
    assert {
        k: run[k] for k in ("id", "job_name", "status", "input", "idempotency_key", "concurrency_key")
    } == {
        "id": first,
        "job_name": "echo",
        "status": "pending",
        "input": {"a": 1},
        "idempotency_key": "k1",
        "concurrency_key": "c",
    }


def test_trigger_wait_executes_the_run_and_prints_its_output_as_json(cli: Cli) -> None:
    result = cli("trigger", "--app", APP, "count", "--input", '{"n": 3}', "--wait")
    assert result.returncode == 0, result.stderr
    assert result.stdout == '{"counted":3}\n'
    bars = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert bars[-1] == "[##############################] 100% 3/3 item 3"
    assert "[##########--------------------]  33% 1/3 item 1" in bars
    [run] = cli.runs()
    assert (run["status"], run["output"]) == ("completed", {"counted": 3})


@pytest.mark.parametrize("job", ["process-image", "process_image"])
def test_trigger_finds_a_job_by_job_name_or_handle_name(cli: Cli, job: str) -> None:
    result = cli("trigger", "--app", APP, job, "--input", '{"filename": "cat.png"}', "--wait")
    assert (result.returncode, result.stdout) == (0, '{"url":"https://cdn.example/500"}\n'), result.stderr


def test_trigger_wait_exits_1_with_the_error_when_the_run_fails(cli: Cli) -> None:
    result = cli("trigger", "--app", APP, "fail", "--input", '{"message": "kaboom"}', "--wait")
    line = one_error_line(result, 1)
    [run] = cli.runs()
    assert line == f"durably: error: run {run['id']} failed: RuntimeError: kaboom"
    assert result.stdout == ""
    assert (run["status"], run["error"]) == ("failed", "RuntimeError: kaboom")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "--input", "{oops"], "--input is not valid JSON"),
        (["process-image", "--input", '{"name": "x"}'], "filename"),
        (["nope", "--input", "{}"], "no job named 'nope'"),
    ],
)
def test_a_bad_trigger_is_a_usage_error_and_writes_nothing(cli: Cli, args: list[str], message: str) -> None:
    line = one_error_line(cli("trigger", "--app", APP, *args), 2)
    assert message in line
    assert cli.runs() == []


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("tests.apps.missing:durably", "cannot import 'tests.apps.missing'"),
        ("tests.apps.cli_app:nothing", "has no attribute 'nothing'"),
        ("tests.apps.cli_app:count", "not a Durably instance"),
    ],
)
def test_a_bad_app_is_a_usage_error(cli: Cli, app: str, message: str) -> None:
    assert message in one_error_line(cli("trigger", "--app", app, "echo"), 2)


# --- reading and changing runs ----------------------------------------------------------------


def test_runs_lists_newest_first_and_filters(cli: Cli) -> None:
    cli.ok("trigger", "--app", APP, "echo", "--input", '{"n": 1}', "--wait")
    pending = cli.trigger("count", '{"n": 1}')
    table = cli.ok("runs", "--db", cli.url).splitlines()
    assert table[0].split() == ["ID", "JOB", "STATUS", "ATTEMPT", "CREATED", "(UTC)", "PROGRESS", "ERROR"]
    assert [row.split()[1:4] for row in table[1:]] == [["count", "pending", "1"], ["echo", "completed", "1"]]
    assert table[1].startswith(pending)
    assert [r["job_name"] for r in cli.runs()] == ["count", "echo"]
    assert [r["job_name"] for r in cli.runs("--status", "completed")] == ["echo"]
    assert [r["job_name"] for r in cli.runs("--status", "completed,pending")] == ["count", "echo"]
    assert [r["job_name"] for r in cli.runs("--job", "count")] == ["count"]
    assert [r["id"] for r in cli.runs("--limit", "1")] == [pending]
    assert "status must be one of" in one_error_line(cli("runs", "--db", cli.url, "--status", "done"), 2)


def test_show_prints_the_run_its_steps_and_logs(cli: Cli) -> None:
    cli.ok("trigger", "--app", APP, "count", "--input", '{"n": 2}', "--wait")
    [run] = cli.runs()
    text = cli.ok("show", "--db", cli.url, run["id"])
    assert f"id:        {run['id']}" in text
    assert "status:    completed" in text
    assert 'output:    {"counted":2}' in text
    assert "progress:  2/2 item 2" in text
    steps = text.split("steps (2):\n")[1].split("\n\n")[0].splitlines()
    assert [line.split()[:3] for line in steps] == [
        ["#", "NAME", "STATUS"],
        ["0", "item-0", "completed"],
        ["1", "item-1", "completed"],
    ]
    [log] = text.split("logs (1):\n")[1].splitlines()
    assert log.endswith(' info  counted {"n":2}')
    data = msgspec.json.decode(cli.ok("show", "--db", cli.url, run["id"], "--json"))
    assert data["run"]["id"] == run["id"]
    assert [s["name"] for s in data["steps"]] == ["item-0", "item-1"]
    assert [(e["level"], e["message"], e["data"]) for e in data["logs"]] == [("info", "counted", {"n": 2})]


def test_retry_puts_a_failed_run_back_to_pending(cli: Cli) -> None:
    cli("trigger", "--app", APP, "fail", "--input", "{}", "--wait")
    [run] = cli.runs()
    assert cli.ok("retry", "--db", cli.url, run["id"]) == f"{run['id']} pending (attempt 2)\n"
    [run] = cli.runs()
    assert (run["status"], run["attempt"]) == ("pending", 2)
    line = one_error_line(cli("retry", "--db", cli.url, run["id"]), 1)
    assert "pending" in line


def test_cancel_then_delete(cli: Cli) -> None:
    run_id = cli.trigger("echo", "{}")
    assert "pending" in one_error_line(cli("delete", "--db", cli.url, run_id), 1)
    assert cli.ok("cancel", "--db", cli.url, run_id) == f"{run_id} cancelled\n"
    assert cli.ok("cancel", "--db", cli.url, run_id) == f"{run_id} cancelled\n"
    assert [r["status"] for r in cli.runs()] == ["cancelled"]
    assert cli.ok("delete", "--db", cli.url, run_id) == f"{run_id} deleted\n"
    assert cli.runs() == []


def test_purge_deletes_ended_runs_older_than_the_age(cli: Cli) -> None:
    cli.ok("trigger", "--app", APP, "echo", "--input", "{}", "--wait")
    cli("trigger", "--app", APP, "fail", "--input", "{}", "--wait")
    pending = cli.trigger("echo", "{}")
    assert cli.ok("purge", "--db", cli.url, "--older-than", "30d") == "purged 0 runs\n"
    time.sleep(1.1)
    assert cli.ok("purge", "--db", cli.url, "--older-than", "1s") == "purged 2 runs\n"
    assert [r["id"] for r in cli.runs()] == [pending]
    assert "invalid age '30 days'" in one_error_line(
        cli("purge", "--db", cli.url, "--older-than", "30 days"), 2
    )


@pytest.mark.parametrize("command", ["show", "retry", "cancel", "delete"])
def test_an_unknown_run_id_exits_1(cli: Cli, command: str) -> None:
    line = one_error_line(cli(command, "--db", cli.url, "01NOSUCHRUN"), 1)
    assert line == "durably: error: no run with id '01NOSUCHRUN'"


def test_a_bad_database_url_is_one_line_and_exit_2(cli: Cli) -> None:
    line = one_error_line(cli("runs", "--db", "ftp://example.com/db"), 2)
    assert "unsupported storage URL 'ftp://example.com/db'" in line
    assert "Traceback" not in cli("--debug", "runs", "--db", cli.url).stderr
    debug = cli("--debug", "runs", "--db", "ftp://example.com/db")
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr


def test_the_database_comes_from_the_environment(cli: Cli) -> None:
    run_id = cli.trigger("echo", "{}")
    listed = cli("runs", "--json", env={"TURSO_DATABASE_URL": cli.url})
    assert [r["id"] for r in msgspec.json.decode(listed.stdout)] == [run_id], listed.stderr
    assert "no database" in one_error_line(cli("runs"), 2)


def test_a_usage_error_is_one_line_and_exit_2(cli: Cli) -> None:
    line = one_error_line(cli("frobnicate"), 2)
    assert "invalid choice: 'frobnicate'" in line


# --- the worker -------------------------------------------------------------------------------


def wait_until(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_the_worker_runs_pending_runs_and_stops_gracefully_on_sigterm(cli: Cli) -> None:
    quick = [cli.trigger("echo", f'{{"i": {i}}}') for i in range(3)]
    slow = cli.trigger("slow", '{"seconds": 1.5}')
    worker = cli.popen("worker", "--app", APP, "--concurrency", "2")
    try:
        wait_until(lambda: {r["id"]: r["status"] for r in cli.runs()}.get(slow) == "leased")
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, stderr
    assert "concurrency 2" in stderr
    assert "SIGTERM received" in stderr
    statuses = {r["id"]: (r["status"], r["output"]) for r in cli.runs()}
    assert statuses[slow] == ("completed", {"slept": 1.5})
    assert [statuses[run_id] for run_id in quick] == [("completed", {"i": i}) for i in range(3)]
