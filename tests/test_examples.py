"""The examples run as users run them: a script in a subprocess, from another directory, on a local file."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "server"
RUN_ID = r"[0-9A-HJKMNP-TV-Z]{26}"


def run_example(name: str, *args: str, cwd: Path) -> str:
    """Run ``examples/server/<name>`` with ``cwd`` as the working directory; its stdout."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TURSO_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        env=env,
        capture_output=True,  # bytes: text mode would turn the progress line's \r into \n
        timeout=30,
        check=False,
    )
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{out}\n{err}"
    assert "Traceback" not in err, err
    assert (cwd / "local.db").is_file(), "the example should use file:local.db in its working directory"
    return out


def test_basic_prints_the_run_id_and_the_output_and_keeps_runs_in_the_file(tmp_path: Path) -> None:
    out = run_example("basic.py", cwd=tmp_path)
    assert re.search(rf"^Run {RUN_ID} completed$", out, re.MULTILINE), out
    assert "Output: ImageOut(url='https://cdn.example.com/photo.jpg')" in out
    assert "process-image runs in file:local.db: 1 (1 completed)" in out

    again = run_example("basic.py", cwd=tmp_path)
    assert "process-image runs in file:local.db: 2 (2 completed)" in again


def test_events_prints_run_step_and_log_events_in_order(tmp_path: Path) -> None:
    out = run_example("events.py", cwd=tmp_path)
    tags = [" ".join(line.split()[:2]) for line in out.splitlines()[:10]]
    assert tags == [
        "[run:start] process-image",
        "[step:start] #0",
        "[step:complete] #0",
        "[run:progress] Progress(current=1,",
        "[step:start] #1",
        "[step:complete] #1",
        "[run:progress] Progress(current=2,",
        "[step:start] #2",
        "[step:complete] #2",
        "[run:progress] Progress(current=3,",
    ], out
    assert "[log:write] info: image processed {'url': 'https://cdn.example.com/photo.jpg'" in out
    assert "[run:complete] output={'url': 'https://cdn.example.com/photo.jpg'}" in out
    assert re.search(r"^\d+ events in all: .*run:trigger", out, re.MULTILINE), out


def test_cli_shows_a_live_progress_line_per_file(tmp_path: Path) -> None:
    out = run_example("cli.py", "cat.png", "dog.png", cwd=tmp_path)
    for name in ("cat.png", "dog.png"):
        block = out.split(f"{name}:\n", 1)[1]
        line, done = block.split("\n")[:2]
        assert line == "\r  1/3 - downloaded\r  2/3 - resized\r  3/3 - uploaded", repr(line)
        assert done == f"  done: https://cdn.example.com/{name}"


def test_idempotency_returns_the_first_run_for_the_same_key(tmp_path: Path) -> None:
    out = run_example("idempotency.py", cwd=tmp_path)
    first, second = re.findall(rf"^delivery (\S+): run ({RUN_ID}) (\w+)$", out, re.MULTILINE)
    assert first[0] == second[0] and first[1] == second[1], out
    assert (first[2], second[2]) == ("created", "idempotent")
    assert f"trigger_and_wait: run {first[1]} idempotent" in out
    assert f"runs with key {first[0]}: 1" in out


def test_concurrency_key_runs_one_at_a_time_in_order(tmp_path: Path) -> None:
    out = run_example("concurrency.py", cwd=tmp_path)
    keyed = re.findall(r"^(start|done) +user-42 +(\S+)$", out, re.MULTILINE)
    assert keyed == [(what, f) for f in ("a.jpg", "b.jpg", "c.jpg") for what in ("start", "done")], out
    assert len(re.findall(r"user-7 +x\.jpg$", out, re.MULTILINE)) == 2
    assert "user-42 ran one at a time, in trigger order: True" in out


def test_retry_resumes_after_the_last_completed_step_and_cancel_stops_a_run(tmp_path: Path) -> None:
    out = run_example("retry_cancel.py", cwd=tmp_path)
    assert "attempt 1 failed: ConnectionError: accounting API unavailable" in out
    assert "steps: fetch=completed, sum=completed, push=failed" in out
    assert "retry(): status=pending attempt=2" in out
    assert "[step:skip] fetch" in out and "[step:skip] sum" in out
    assert "attempt 2 completed: output={'account': 'acme', 'total': 500}" in out
    assert "calls: fetch=1 push=2" in out
    cancelled = re.search(r"^  cancelled after (\d+) of 50 pages$", out, re.MULTILINE)
    assert cancelled is not None, out
    assert 0 < int(cancelled.group(1)) < 50


def test_retries_backs_off_times_out_retries_a_run_and_gives_up_on_a_non_retryable_error(
    tmp_path: Path,
) -> None:
    out = run_example("retries.py", cwd=tmp_path)
    assert "output={'price': 9.99, 'order': 'A-1', 'charged': True}" in out
    assert "calls: quote=2 charge=3" in out  # the timed-out quote once, the charge after two failures
    assert re.search(
        r"^  ship: attempt 1\n  \[run:retry\] attempt 2 at [\d:.]+\n  ship: attempt 2\n", out, re.M
    ), out
    assert "output=shipped reserve calls=2" in out
    assert "failed on attempt 1: NonRetryableError: order empty has no items" in out
    assert out.count("[run:fail]") == 1  # only the final failure


def test_approval_waits_for_a_signal_and_escalates_on_timeout(tmp_path: Path) -> None:
    out = run_example("approval.py", "1", cwd=tmp_path)
    assert re.search(rf"^run {RUN_ID} is waiting for signal:approval$", out, re.MULTILINE), out
    assert re.search(rf"^run {RUN_ID}: approved by grace$", out, re.MULTILINE), out
    assert re.search(rf"^run {RUN_ID}: escalated: nobody answered$", out, re.MULTILINE), out


def test_fan_out_gathers_child_outputs_on_one_slot(tmp_path: Path) -> None:
    out = run_example("fan_out.py", cwd=tmp_path)
    assert re.search(rf"^book-stats {RUN_ID}: {{'pages': 3, 'words': 14}}$", out, re.MULTILINE), out
    assert re.search(rf"^children: 3, all of parent {RUN_ID}: True$", out, re.MULTILINE), out


def test_reminder_sleeps_durably_then_reminds(tmp_path: Path) -> None:
    out = run_example("reminder.py", "0.5", cwd=tmp_path)
    assert re.search(rf"^run {RUN_ID} is waiting \(sleep\) until 20", out, re.MULTILINE), out
    assert re.search(rf"^run {RUN_ID} completed: reminded ada@example.com$", out, re.MULTILINE), out
