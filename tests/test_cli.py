"""The ``durably`` command, run as a real process against a SQLite file and a test app."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from durably import Progress
from durably import _cli_render as render

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


def migrated_cli(tmp_path: Path) -> Cli:
    """A ``Cli`` on a fresh, migrated SQLite file in ``tmp_path``."""
    url = f"file:{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURSO_")}
    env["DURABLY_TEST_DB"] = url
    cli = Cli(url=url, env=env)
    cli.ok("migrate", "--db", url)
    return cli


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return migrated_cli(tmp_path)


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


def test_version_prints_the_installed_package_version(cli: Cli) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert cli.ok("--version") == f"durably {pyproject['project']['version']}\n"


def test_the_input_is_a_positional_argument_or_input_and_defaults_to_an_empty_object(cli: Cli) -> None:
    positional = cli.ok("trigger", "--app", APP, "echo", '{"via": "argument"}').split()[0]
    option = cli.trigger("echo", '{"via": "option"}')
    neither = cli.ok("trigger", "--app", APP, "echo").split()[0]
    inputs = {r["id"]: r["input"] for r in cli.runs()}
    assert [inputs[positional], inputs[option], inputs[neither]] == [
        {"via": "argument"},
        {"via": "option"},
        {},
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


def test_trigger_wait_on_a_pipe_prints_plain_lines_in_order(cli: Cli) -> None:
    result = cli("trigger", "--app", APP, "chatty", '{"n": 2}', "--wait")
    assert (result.returncode, result.stdout) == (0, '{"counted":2}\n'), result.stderr
    assert "\r" not in result.stderr
    assert "\x1b" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "starting to count" not in line]
    assert lines == [
        "[###############---------------]  50% 1/2 item 1",
        'info  did item 1 {"i":1}',
        "[##############################] 100% 2/2 item 2",
        'info  did item 2 {"i":2}',
    ]


def test_progress_numbers_keep_their_type_in_the_database_and_on_screen(cli: Cli) -> None:
    cli.ok("trigger", "--app", APP, "count", '{"n": 3}', "--wait")
    [run] = cli.runs()
    assert run["progress"] == {"current": 3, "total": 3, "message": "item 3"}
    assert [type(run["progress"][k]) for k in ("current", "total")] == [int, int]
    assert "  3/3 item 3" in cli.ok("runs", "--db", cli.url)
    big = Progress(1_500_000, 3_000_000)
    assert render.progress_text(big) == "1500000/3000000"  # not 1.5e+06/3e+06
    assert render.bar(big).endswith(" 50% 1500000/3000000")
    assert render.progress_text(Progress(0.25, 1.0)) == "0.25/1"


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


def test_trigger_delay_and_priority(cli: Cli) -> None:
    run_id = cli.trigger("echo", "{}", "--delay", "3600", "--priority", "7")
    [run] = cli.runs()
    assert (run["status"], run["priority"]) == ("pending", 7)
    assert run["wake_at"] is not None
    text = cli.ok("show", "--db", cli.url, run_id)
    assert "priority:  7" in text and "wakes:" in text
    assert cli.runs("--status", "waiting") == []  # a known status


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["echo", "--input", "{oops"], "--input '{oops' is not valid JSON: "),
        (["echo", "{a: 1}"], "INPUT '{a: 1}' is not valid JSON: object keys must be strings (byte 1)"),
        (["echo", "{}", "--input", "{}"], "the input is given twice: pass it as INPUT or with --input"),
        (["process-image", "--input", '{"name": "x"}'], "filename"),
        (["nope", "--input", "{}"], "no job named 'nope'"),
        (["echo", "{}", "--delay", "-1"], "delay must be between 0"),
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
    failing = cli.trigger("fail", '{"message": "bad\\nnews"}')
    slow = cli.trigger("slow", '{"seconds": 1.5}')
    stdout, stderr, returncode = run_worker_until(
        cli, lambda: {r["id"]: r["status"] for r in cli.runs()}.get(slow) == "leased", "--concurrency", "2"
    )
    assert returncode == 0, stderr
    assert "concurrency 2" in stderr
    assert "SIGTERM received" in stderr
    statuses = {r["id"]: (r["status"], r["output"]) for r in cli.runs()}
    assert statuses[slow] == ("completed", {"slept": 1.5})
    assert [statuses[run_id] for run_id in quick] == [("completed", {"i": i}) for i in range(3)]
    # One line per run that ended: id, job, status, duration (and the error of a failed run).
    ended = {line.split()[0]: line for line in stdout.splitlines()}
    assert len(ended) == len(stdout.splitlines()) == 5, stdout
    for run_id in quick:
        assert re.fullmatch(rf"{run_id} echo completed \d+\.\d\ds", ended[run_id])
    assert re.fullmatch(rf"{failing} fail failed \d+\.\d\ds RuntimeError: bad news", ended[failing])
    seconds = float(ended[slow].split()[3].removesuffix("s"))
    assert ended[slow].startswith(f"{slow} slow completed ") and 1.5 <= seconds < 10


def test_the_worker_prints_a_line_for_a_run_another_process_cancelled(cli: Cli) -> None:
    slow = cli.trigger("slow", '{"seconds": 30}')
    worker = cli.popen("worker", "--app", APP)
    printed: list[str] = []
    try:
        assert worker.stdout is not None
        reader = threading.Thread(target=lambda: printed.extend(worker.stdout), daemon=True)  # type: ignore[arg-type]
        reader.start()
        wait_until(lambda: {r["id"]: r["status"] for r in cli.runs()}[slow] == "leased")
        cli.ok("cancel", "--db", cli.url, slow)  # this process, not the worker's
        wait_until(lambda: bool(printed))
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, stderr
    assert len(printed) == 1 and re.fullmatch(rf"{slow} slow cancelled \d+\.\d\ds\n", printed[0]), printed


def test_a_quiet_worker_prints_no_line_per_run(cli: Cli) -> None:
    run_id = cli.trigger("echo", "{}")
    stdout, stderr, returncode = run_worker_until(
        cli, lambda: [r["status"] for r in cli.runs()] == ["completed"], "--quiet"
    )
    assert (returncode, stdout) == (0, ""), stderr
    assert f"{run_id} echo" not in stderr


def run_worker_until(cli: Cli, condition: Any, *args: str) -> tuple[str, str, int]:
    """Start ``durably worker``, SIGTERM it once ``condition()`` holds; its stdout, stderr, status."""
    worker = cli.popen("worker", "--app", APP, *args)
    try:
        wait_until(condition)
        worker.send_signal(signal.SIGTERM)
        stdout, stderr = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    return stdout, stderr, worker.returncode
