"""Text output of the ``durably`` command: tables, run details, log lines, the progress bar."""

from __future__ import annotations

import io
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TextIO, cast

from durably import _codec
from durably._models import LogEntry, Progress, Run, Step

_BAR_WIDTH = 30
_CELL_WIDTH = 60
_ERASE_LINE = "\r\x1b[2K"  # back to column 0, clear the whole line


def when(moment: datetime | None) -> str:
    """A UTC timestamp to the second, or ``-``."""
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def as_json(value: Any) -> str:
    return _codec.encode(value).decode()


def _cell(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _CELL_WIDTH else text[: _CELL_WIDTH - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def number(value: int | float) -> str:
    """A progress number as it was given: ``3`` for an int, ``2.5`` for a float."""
    return str(value) if isinstance(value, int) else f"{value:.10g}"


def progress_text(progress: Progress | None) -> str:
    if progress is None:
        return ""
    text = number(progress.current)
    if progress.total is not None:
        text += f"/{number(progress.total)}"
    return f"{text} {progress.message}" if progress.message else text


def log_line(entry: LogEntry) -> str:
    """One log line of a run: level, step, message and data."""
    data = f" {as_json(entry.data)}" if entry.data else ""
    step = f" [{entry.step_name}]" if entry.step_name else ""
    return f"{entry.level:<5}{step} {entry.message}{data}"


def run_ended(run_id: str, job_name: str, status: str, seconds: float | None, error: str | None) -> str:
    """What ``durably worker`` prints when a run ends."""
    duration = "-" if seconds is None else f"{seconds:.2f}s"
    return " ".join([run_id, job_name, status, duration, *([" ".join(error.split())] if error else [])])


def runs_table(runs: Sequence[Run]) -> str:
    rows = [
        [
            run.id,
            run.job_name,
            run.status,
            str(run.attempt),
            when(run.created_at),
            _cell(progress_text(run.progress)),
            _cell(run.error or ""),
        ]
        for run in runs
    ]
    return table(["ID", "JOB", "STATUS", "ATTEMPT", "CREATED (UTC)", "PROGRESS", "ERROR"], rows)


def run_details(run: Run, steps: Sequence[Step], logs: Sequence[LogEntry]) -> str:
    """What ``durably show`` prints: the run's fields, its steps and its log lines."""
    fields: list[tuple[str, str]] = [
        ("id", run.id),
        ("job", run.job_name),
        ("status", run.status),
        ("attempt", str(run.attempt)),
        ("created", when(run.created_at)),
        ("started", when(run.started_at)),
        ("completed", when(run.completed_at)),
        ("input", as_json(run.input)),
    ]
    if run.status == "completed":
        fields.append(("output", as_json(run.output)))
    optional = {
        "error": run.error,
        "progress": progress_text(run.progress),
        "labels": as_json(run.labels) if run.labels else None,
        "idempotency key": run.idempotency_key,
        "concurrency key": run.concurrency_key,
        "waiting for": run.waiting_for,
        "wakes": when(run.wake_at) if run.wake_at else None,
        "priority": str(run.priority) if run.priority else None,
        "parent": run.parent_run_id,
    }
    fields += [(key, value) for key, value in optional.items() if value]
    width = max(len(key) for key, _ in fields) + 1
    lines = [f"{key + ':':<{width}} {value}" for key, value in fields]
    step_rows = [
        [str(s.index), s.name, s.status, when(s.completed_at), _cell(s.error or as_json(s.output))]
        for s in steps
    ]
    lines += ["", f"steps ({len(steps)}):"]
    if step_rows:
        lines += [
            "  " + line for line in table(["#", "NAME", "STATUS", "ENDED", "RESULT"], step_rows).split("\n")
        ]
    lines += ["", f"logs ({len(logs)}):"]
    lines += [f"  {when(entry.created_at)} {log_line(entry)}" for entry in logs]
    return "\n".join(lines)


def bar(progress: Progress) -> str:
    """A progress bar on one line; a count alone when there is no total."""
    message = f" {' '.join(progress.message.split())}" if progress.message else ""
    if not progress.total:
        return f"[{number(progress.current)}]{message}"
    fraction = min(max(progress.current / progress.total, 0.0), 1.0)
    filled = round(fraction * _BAR_WIDTH)
    drawn = "#" * filled + "-" * (_BAR_WIDTH - filled)
    return f"[{drawn}] {fraction:4.0%} {number(progress.current)}/{number(progress.total)}{message}"


class Console:
    """Log lines and one live progress bar sharing a stream, never sharing a line.

    On a terminal the bar is redrawn in place (carriage return, erase line) and a log
    line is printed above it: erase the bar, write the line, draw the bar again. On a
    pipe or a file every update is a plain line of its own.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._bar = ""
        # structlog may write from a sync step's thread while the loop draws the bar.
        self._lock = threading.Lock()

    def progress(self, progress: Progress) -> None:
        text = bar(progress)
        with self._lock:
            if self._live:
                self._bar = self._fit(text)
                self._stream.write(_ERASE_LINE + self._bar)
            else:
                self._stream.write(text + "\n")
            self._stream.flush()

    def line(self, text: str, stream: TextIO | None = None) -> None:
        """Print ``text`` above the bar, on ``stream`` (default: the bar's own)."""
        target = stream or self._stream
        with self._lock:
            if self._bar:
                self._stream.write(_ERASE_LINE)
                self._stream.flush()
            target.write(text + "\n")
            target.flush()
            if self._bar:
                self._stream.write(self._bar)
                self._stream.flush()

    def log(self, entry: LogEntry) -> None:
        self.line(log_line(entry))

    @contextmanager
    def holding_std_streams(self) -> Iterator[None]:
        """While the bar is live, what is written to ``sys.stderr`` (and to ``sys.stdout``
        when it is a terminal too) is printed above the bar, line by line."""
        if not self._live:
            yield
            return
        saved = sys.stdout, sys.stderr
        if sys.stdout.isatty():
            sys.stdout = cast(TextIO, _ConsoleFile(self, sys.stdout))
        sys.stderr = cast(TextIO, _ConsoleFile(self, sys.stderr))
        try:
            yield
        finally:
            for file in (sys.stdout, sys.stderr):
                if isinstance(file, _ConsoleFile):
                    file.flush_partial()
            sys.stdout, sys.stderr = saved

    def close(self) -> None:
        """Leave the last bar on screen and move below it, so what follows starts a line."""
        with self._lock:
            if self._bar:
                self._stream.write("\n")
                self._stream.flush()
                self._bar = ""

    def _fit(self, text: str) -> str:
        # A bar wider than the terminal wraps, and a carriage return would then redraw
        # only its last row: cut it to the width.
        try:
            width = os.get_terminal_size(self._stream.fileno()).columns
        except (OSError, ValueError):
            return text
        return text if len(text) < width else text[: max(width - 2, 1)] + "…"


class _ConsoleFile(io.TextIOBase):
    """A text file whose complete lines go to ``Console.line`` on ``target``."""

    def __init__(self, console: Console, target: TextIO) -> None:
        super().__init__()
        self._console = console
        self._target = target
        self._partial = ""
        self._lock = threading.Lock()  # print() from several threads

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
        for line in lines:
            self._console.line(line, self._target)
        return len(text)

    def flush_partial(self) -> None:
        """Print a last line that did not end with a newline."""
        with self._lock:
            partial, self._partial = self._partial, ""
        if partial:
            self._console.line(partial, self._target)

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._target.encoding
