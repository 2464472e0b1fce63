"""``durably trigger --wait`` on a real terminal: a pseudo-terminal, read byte for byte.

The bar must be redrawn in place and every log line must land on a line of its own,
above the bar; the output JSON goes to stdout. The bytes are replayed on a tiny
terminal model (carriage return, line feed, erase line) to get the screen a user sees.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from tests.test_cli import APP, ROOT, Cli, migrated_cli

COLOURS = re.compile(rb"\x1b\[[0-9;]*m")
ERASE_LINE = b"\x1b[2K"


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return migrated_cli(tmp_path)


def screen(raw: bytes) -> list[str]:
    """The lines a terminal shows after ``raw`` (no wrapping), trailing blanks dropped."""
    text = COLOURS.sub(b"", raw).replace(ERASE_LINE, b"\x00").decode()
    lines, column = [""], 0
    for char in text:
        if char == "\r":
            column = 0
        elif char == "\n":
            lines.append("")
            column = 0
        elif char == "\x00":  # erase the whole line; the cursor stays where it is
            lines[-1] = ""
        else:
            line = lines[-1].ljust(column)
            lines[-1] = line[:column] + char + line[column + 1 :]
            column += 1
    return [line.rstrip() for line in lines if line.strip()]


def run_on_terminal(
    cli: Cli, *args: str, columns: int = 120, stdout_too: bool = False, env: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    """Run ``durably ARGS`` with stderr (and stdout if ``stdout_too``) on a pseudo-terminal.

    Returns the exit status, the terminal's bytes and what went to the stdout pipe.
    """
    controller, terminal = os.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "durably", *args],
        cwd=ROOT,
        env={**cli.env, "TERM": "xterm", **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=terminal if stdout_too else subprocess.PIPE,
        stderr=terminal,
    )
    os.close(terminal)
    raw = bytearray()
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every writer of the terminal has closed it
                break
            if not chunk:
                break
            raw += chunk
        out = process.stdout.read().decode() if process.stdout is not None else ""
        status = process.wait(timeout=10)
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    return status, bytes(raw), out


@pytest.mark.parametrize("app_configures_structlog", [False, True], ids=["cli-logging", "app-logging"])
def test_log_lines_print_above_the_bar_and_the_output_goes_to_stdout(
    cli: Cli, app_configures_structlog: bool
) -> None:
    status, raw, out = run_on_terminal(
        cli,
        *("trigger", "--app", APP, "chatty", '{"n": 3, "print_to": "stderr"}', "--wait"),
        env={"CLI_APP_CONFIGURES_STRUCTLOG": "1"} if app_configures_structlog else {},
    )
    assert status == 0, raw
    assert out == '{"counted":3}\n'
    # The bar is redrawn in place for each update, and erased before each log line.
    assert raw.count(b"\r" + ERASE_LINE + b"[") == 3, raw
    assert raw.count(b"\r" + ERASE_LINE + b"info  did item") == 3, raw
    lines = screen(raw)
    assert lines[-1] == "[##############################] 100% 3/3 item 3", lines
    above = lines[:-1]
    assert [line for line in above if line.startswith("info ")] == [
        f'info  did item {i} {{"i":{i}}}' for i in (1, 2, 3)
    ], lines
    [app_log] = [line for line in above if "starting to count" in line]
    assert "item" not in app_log  # structlog's own line, not glued to a bar
    assert "a line printed by the job" in above
    assert len(above) == 5, lines  # nothing else, and no log line twice (on_log and structlog)


def test_on_a_shared_terminal_the_job_prints_above_the_bar_and_the_output_comes_last(cli: Cli) -> None:
    payload = '{"n": 2, "print_to": "stdout"}'
    status, raw, _ = run_on_terminal(
        cli, "trigger", "--app", APP, "chatty", payload, "--wait", stdout_too=True
    )
    assert status == 0, raw
    lines = screen(raw)
    assert "a line printed by the job" in lines, lines
    assert lines[-2:] == ["[##############################] 100% 2/2 item 2", '{"counted":2}']


def test_the_bar_is_cut_to_the_terminal_width(cli: Cli) -> None:
    # A bar that wrapped could not be redrawn by a carriage return.
    status, raw, _ = run_on_terminal(cli, "trigger", "--app", APP, "chatty", '{"n": 2}', "--wait", columns=40)
    assert status == 0, raw
    assert screen(raw)[-1] == "[##############################] 100% …"  # 39 columns


@pytest.mark.parametrize("stdout_too", [False, True])
def test_a_failed_run_prints_its_error_below_the_bar(cli: Cli, stdout_too: bool) -> None:
    status, raw, out = run_on_terminal(
        cli, "trigger", "--app", APP, "chatty", '{"n": 3, "fail_at": 2}', "--wait", stdout_too=stdout_too
    )
    assert status == 1, raw
    assert out == ""
    lines = screen(raw)
    assert lines[-2] == "[##########--------------------]  33% 1/3 item 1", lines
    assert re.fullmatch(r"durably: error: run \w+ failed: RuntimeError: failed at item 2", lines[-1])


def test_the_terminal_model_shows_a_line_glued_to_the_bar() -> None:
    # What these tests would see if a log line were written over the bar without erasing it.
    assert screen(b"[###] 1\r\x1b[2Kinfo  x\r\n[###] 1") == ["info  x", "[###] 1"]
    assert screen(b"[###] 1info  x\r\n[###] 2") == ["[###] 1info  x", "[###] 2"]
    assert screen(b"[#####] 1\rinfo\r\n") == ["info##] 1"]  # no erase: the bar shows through
