"""Text output of the ``durably`` command: tables, run details, the progress bar."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from durably import _codec
from durably._models import LogEntry, Progress, Run, Step

_BAR_WIDTH = 30
_CELL_WIDTH = 60


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


def progress_text(progress: Progress | None) -> str:
    if progress is None:
        return ""
    text = f"{progress.current:g}" if progress.total is None else f"{progress.current:g}/{progress.total:g}"
    return f"{text} {progress.message}" if progress.message else text


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
    for entry in logs:
        data = f" {as_json(entry.data)}" if entry.data else ""
        step = f" [{entry.step_name}]" if entry.step_name else ""
        lines.append(f"  {when(entry.created_at)} {entry.level:<5}{step} {entry.message}{data}")
    return "\n".join(lines)


class ProgressBar:
    """A live progress bar on a terminal; one line per update elsewhere (logs, pipes)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._live = stream.isatty()
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        line = self.render(progress)
        if self._live:
            self._stream.write("\r\x1b[2K" + line)
        else:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._drawn = True

    @staticmethod
    def render(progress: Progress) -> str:
        message = f" {progress.message}" if progress.message else ""
        if not progress.total:
            return f"[{progress.current:g}]{message}"
        fraction = min(max(progress.current / progress.total, 0.0), 1.0)
        filled = round(fraction * _BAR_WIDTH)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        return f"[{bar}] {fraction:4.0%} {progress.current:g}/{progress.total:g}{message}"

    def close(self) -> None:
        if self._live and self._drawn:
            self._stream.write("\n")
            self._stream.flush()
