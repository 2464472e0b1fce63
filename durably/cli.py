"""The ``durably`` command: run a worker, trigger jobs, inspect and manage runs.

Exit status: 0 on success, 1 when a run failed or an operation was refused (not
found, conflict, database error), 2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import anyio
import msgspec
import structlog
from structlog.typing import EventDict

from durably import _cli_render as render
from durably._engine import Durably
from durably._events import RunCancelEvent, RunCompleteEvent, RunFailEvent, RunStartEvent
from durably._job import JobHandle
from durably.adapters import open_storage
from durably.errors import ConfigurationError, DurablyError, NotFoundError, ValidationError

_PROG = "durably"
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_STATUSES = ("pending", "leased", "waiting", "completed", "failed", "cancelled")


class UsageError(Exception):
    """A mistake in the command line or the app it names (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error of the command; --help shows the usage.
        self.exit(2, f"{_PROG}: error: {message} (see '{self.prog} --help')\n")


def _age(text: str) -> timedelta:
    match = _AGE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid age {text!r}: use a number with s, m, h or d, e.g. 30d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


Handler = Callable[[argparse.Namespace], Awaitable[int]]
DbHandler = Callable[[argparse.Namespace, Durably], Awaitable[int]]


class _Commands:
    """The one place subcommands are registered: name, help, shared options, handler."""

    def __init__(self, parser: _Parser) -> None:
        self._subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        self.common = _Parser(add_help=False)
        self.common.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
        )
        self.app = _Parser(add_help=False)
        self.app.add_argument(
            "--app", required=True, metavar="MODULE:ATTR", help="a Durably instance to import"
        )
        self.db = _Parser(add_help=False)
        self.db.add_argument("--db", metavar="URL", help="database URL (default: $TURSO_DATABASE_URL)")
        self.db.add_argument("--auth-token", metavar="TOKEN", help="auth token (default: $TURSO_AUTH_TOKEN)")
        self.db.add_argument(
            "--app", metavar="MODULE:ATTR", help="use this Durably instance's database instead"
        )

    def add(self, name: str, help: str, run: Handler, *parents: _Parser) -> _Parser:
        """A subcommand whose ``run(args)`` returns the exit status."""
        parser = self._subparsers.add_parser(
            name, help=help, description=help, parents=[self.common, *parents]
        )
        parser.set_defaults(run=run)
        return parser

    def add_db(self, name: str, help: str, run: DbHandler) -> _Parser:
        """A subcommand that reads or changes runs in ``--db`` (or ``--app``'s database)."""
        return self.add(name, help, partial(_on_database, run), self.db)


def _version() -> str:
    try:
        return importlib.metadata.version("durably")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: the package is not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=_PROG, description="Durable jobs on SQLite and libSQL/Turso.")
    parser.add_argument("--version", action="version", version=f"{_PROG} {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = _Commands(parser)
    _add_job_commands(commands)
    _add_run_commands(commands)
    return parser


def _add_job_commands(commands: _Commands) -> None:
    worker = commands.add("worker", "run a worker until SIGINT/SIGTERM", _worker, commands.app)
    worker.add_argument("--concurrency", type=_positive_int, metavar="N", help="runs executed at once")
    worker.add_argument("--quiet", action="store_true", help="no line for each run that ends")
    trigger = commands.add("trigger", "trigger a run of a job", _trigger, commands.app)
    trigger.add_argument("job", metavar="JOB", help="the job's name or its registered handle name")
    trigger.add_argument("input_arg", nargs="?", metavar="INPUT", help="the payload as JSON (default: {})")
    trigger.add_argument("--input", metavar="JSON", help="the payload, instead of INPUT")
    trigger.add_argument("--wait", action="store_true", help="execute it here and print its output")
    trigger.add_argument("--idempotency-key", metavar="KEY")
    trigger.add_argument("--concurrency-key", metavar="KEY")
    trigger.add_argument(
        "--delay", type=float, metavar="SECONDS", help="not claimed before this many seconds"
    )
    trigger.add_argument("--priority", type=int, default=0, metavar="N", help="higher is claimed first")
    serve = commands.add("serve", "serve the HTTP API and dashboard (durably[web])", _serve, commands.app)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
    serve.add_argument("--worker", action="store_true", help="also run a worker in this process")


def _add_run_commands(commands: _Commands) -> None:
    runs = commands.add_db("runs", "list runs, newest first", _runs)
    runs.add_argument("--status", action="append", metavar="STATUS", help=f"one of {', '.join(_STATUSES)}")
    runs.add_argument("--job", action="append", metavar="NAME", help="a job name (repeatable)")
    runs.add_argument("--limit", type=_positive_int, default=50, metavar="N")
    runs.add_argument("--json", action="store_true", help="print a JSON list of runs")
    show = commands.add_db("show", "show a run with its steps and logs", _show)
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="print the run, steps and logs as JSON")
    for name, help, run in (
        ("retry", "put a failed or cancelled run back to pending", _retry),
        ("cancel", "cancel a pending or running run", _cancel),
        ("delete", "delete an ended run with its steps and logs", _delete),
    ):
        commands.add_db(name, help, run).add_argument("run_id", metavar="RUN_ID")
    purge = commands.add_db("purge", "delete ended runs older than an age", _purge)
    purge.add_argument("--older-than", type=_age, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m")
    commands.add_db("migrate", "create or upgrade the database schema", _migrate)


def load_app(spec: str) -> Durably:
    """The ``Durably`` instance named by ``module:attribute`` (the working directory is importable)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name:
        raise UsageError(f"--app {spec!r}: expected MODULE:ATTRIBUTE, e.g. myapp.jobs:durably")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    for part in attribute.split(".") if attribute else ["durably"]:
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise UsageError(
                f"--app {spec!r}: {module_name!r} has no attribute {attribute or part!r}"
            ) from exc
    if not isinstance(target, Durably):
        raise UsageError(f"--app {spec!r} is a {type(target).__name__}, not a Durably instance")
    return target


def _open(args: argparse.Namespace) -> Durably:
    if args.db is None and args.app is not None:
        return load_app(args.app)
    url = args.db or os.environ.get("TURSO_DATABASE_URL")
    if not url:
        raise UsageError("no database: pass --db URL (or --app) or set TURSO_DATABASE_URL")
    token = args.auth_token or os.environ.get("TURSO_AUTH_TOKEN") or None
    return Durably(open_storage(url, auth_token=token))


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _say(text: str) -> None:
    sys.stderr.write(f"{_PROG}: {text}\n")
    sys.stderr.flush()


def _with_concurrency(app: Durably, concurrency: int | None) -> Durably:
    """``app`` executing ``concurrency`` runs at once (the app keeps its schedules and handlers)."""
    if concurrency is not None:
        app.max_concurrent_runs = concurrency
    return app


_EndEvent = RunCompleteEvent | RunFailEvent | RunCancelEvent


class _RunEnds:
    """Prints a line for each run that ends in this process: id, job, status, duration."""

    # Runs released on shutdown send no ending event here (a run cancelled by another
    # process does: its worker announces it); bound the map so they cannot make it grow.
    _TRACKED = 10_000

    def __init__(self, app: Durably) -> None:
        self._started: dict[str, datetime] = {}
        self._unsubscribe = [
            app.on("run:start", self._start),
            app.on("run:complete", lambda e: self._end(e, "completed")),
            app.on("run:fail", lambda e: self._end(e, "failed", e.error)),
            app.on("run:cancel", lambda e: self._end(e, "cancelled")),
            # Runs that leave this worker without ending (backing off, lease lost).
            app.on("run:retry", self._forget),
            app.on("worker:error", self._forget),
        ]

    def _start(self, event: RunStartEvent) -> None:
        self._started[event.run_id] = event.timestamp
        if len(self._started) > self._TRACKED:
            del self._started[next(iter(self._started))]

    def _forget(self, event: Any) -> None:
        if event.run_id is not None:
            self._started.pop(event.run_id, None)

    def _end(self, event: _EndEvent, status: str, error: str = "") -> None:
        started = self._started.pop(event.run_id, None)
        seconds = None if started is None else (event.timestamp - started).total_seconds()
        _out(render.run_ended(event.run_id, event.job_name, status, seconds, error))

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()


async def _worker(args: argparse.Namespace) -> int:
    app = _with_concurrency(load_app(args.app), args.concurrency)
    _configure_logging(args)
    ends = None if args.quiet else _RunEnds(app)
    try:
        await _serve_until_signalled(app)
    finally:
        if ends is not None:
            ends.close()
    _say("worker stopped")
    return 0


async def _serve_until_signalled(app: Durably) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with app:
            _say(
                f"worker {app.worker_id} started on {app.storage.url}"
                f" (jobs: {', '.join(sorted(app.jobs)) or 'none'};"
                f" concurrency {app.max_concurrent_runs}); stop with Ctrl-C"
            )
            async for signum in signals:
                _say(f"{signal.Signals(signum).name} received; stopping after the runs in flight")
                break


async def _serve(args: argparse.Namespace) -> int:
    try:
        from durably.web._serve import serve
    except ImportError as exc:
        raise UsageError(f"durably serve needs the web extra: pip install 'durably[web]' ({exc})") from exc
    app = load_app(args.app)
    _configure_logging(args)
    return await serve(app, host=args.host, port=args.port, worker=args.worker)


def _payload(args: argparse.Namespace) -> Any:
    """The trigger's input: INPUT or ``--input`` (not both), ``{}`` when neither is given."""
    if args.input_arg is not None and args.input is not None:
        raise UsageError("the input is given twice: pass it as INPUT or with --input, not both")
    text, source = (args.input, "--input") if args.input is not None else (args.input_arg, "INPUT")
    if text is None:
        return {}
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        shown = text if len(text) <= 40 else text[:39] + "…"
        problem = str(exc).removeprefix("JSON is malformed: ")
        raise UsageError(
            f"{source} {shown!r} is not valid JSON: {problem}; quote JSON for the shell: '{{\"n\": 3}}'"
        ) from exc


async def _trigger(args: argparse.Namespace) -> int:
    if args.wait:
        console = render.Console(sys.stderr)
        # From the app's import on, whatever writes to stderr (or a terminal's stdout)
        # prints above the bar, whoever configured the logging.
        with console.holding_std_streams():
            try:
                output = await _trigger_and_wait(args, console)
            finally:
                console.close()
        _out(render.as_json(output))
        return 0
    app, handle = _job_of(args)
    payload = _payload(args)
    _configure_logging(args)
    try:
        run = await handle.trigger(payload, **_trigger_keys(args))
    finally:
        await app.close()
    _out(f"{run.id} {run.disposition}")
    return 0


async def _trigger_and_wait(args: argparse.Namespace, console: render.Console) -> Any:
    """The run's output, once it completed; its log lines go through ``console``."""
    app, handle = _job_of(args)
    payload = _payload(args)
    _configure_logging(args, hide_step_logs=True)
    async with app:
        result = await handle.trigger_and_wait(
            payload, on_progress=console.progress, on_log=console.log, **_trigger_keys(args)
        )
    return result.output


def _job_of(args: argparse.Namespace) -> tuple[Durably, JobHandle[Any, Any]]:
    app = load_app(args.app)
    try:
        return app, app.job(args.job)
    except NotFoundError as exc:
        raise UsageError(f"--app {args.app}: {exc}") from exc


def _trigger_keys(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "idempotency_key": args.idempotency_key,
        "concurrency_key": args.concurrency_key,
        "delay": args.delay,
        "priority": args.priority,
    }


async def _runs(args: argparse.Namespace, app: Durably) -> int:
    statuses = [s for value in args.status or () for s in value.split(",") if s]
    runs = await app.get_runs(status=statuses or None, job_name=args.job, limit=args.limit)
    _out(render.as_json(runs) if args.json else render.runs_table(runs))
    return 0


async def _show(args: argparse.Namespace, app: Durably) -> int:
    run = await app.get_run(args.run_id)
    if run is None:
        raise NotFoundError(f"no run with id {args.run_id!r}")
    steps, logs = await app.get_steps(run.id), await app.get_logs(run.id)
    if args.json:
        _out(render.as_json({"run": run, "steps": steps, "logs": logs}))
    else:
        _out(render.run_details(run, steps, logs))
    return 0


async def _retry(args: argparse.Namespace, app: Durably) -> int:
    run = await app.retry(args.run_id)
    _out(f"{run.id} {run.status} (attempt {run.attempt})")
    return 0


async def _cancel(args: argparse.Namespace, app: Durably) -> int:
    run = await app.cancel(args.run_id)
    _out(f"{run.id} {run.status}")
    return 0


async def _delete(args: argparse.Namespace, app: Durably) -> int:
    await app.delete_run(args.run_id)
    _out(f"{args.run_id} deleted")
    return 0


async def _purge(args: argparse.Namespace, app: Durably) -> int:
    total, batch = 0, 500
    while (deleted := await app.purge_runs(args.older_than, limit=batch)) > 0:
        total += deleted
        if deleted < batch:
            break
    _out(f"purged {total} run{'' if total == 1 else 's'}")
    return 0


async def _migrate(args: argparse.Namespace, app: Durably) -> int:
    await app.migrate()
    _out(f"{app.storage.url}: schema is up to date")
    return 0


async def _on_database(run: DbHandler, args: argparse.Namespace) -> int:
    app = _open(args)
    _configure_logging(args)
    try:
        return await run(args, app)
    finally:
        await app.close()


def _exit_status(exc: BaseException) -> int:
    return 2 if isinstance(exc, (UsageError, ConfigurationError, ValidationError)) else 1


def _drop_step_logs(_logger: Any, _method: str, event: EventDict) -> EventDict:
    # step.log lines carry run_id and step_name; ``trigger --wait`` prints them via on_log.
    if "run_id" in event and "step_name" in event:
        raise structlog.DropEvent
    return event


def _configure_logging(args: argparse.Namespace, *, hide_step_logs: bool = False) -> None:
    """Log to stderr (stdout is for results), unless the app configured structlog itself.

    ``hide_step_logs``: ``trigger --wait`` prints the run's step.log lines through
    ``on_log``; structlog would print each of them a second time.
    """
    if not structlog.is_configured():
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(
                logging.DEBUG if getattr(args, "debug", False) else logging.INFO
            ),
        )
    if hide_step_logs:
        structlog.configure(processors=[_drop_step_logs, *structlog.get_config()["processors"]])


def main(argv: list[str] | None = None) -> int:
    """Run the ``durably`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        run: Handler = args.run
        return anyio.run(run, args)
    except KeyboardInterrupt:
        _say("interrupted")
        return 130
    except (DurablyError, UsageError, TimeoutError, OSError) as exc:
        if debug:
            traceback.print_exc()
        message = str(exc) or type(exc).__name__
        sys.stderr.write(f"{_PROG}: error: {' '.join(message.split())}\n")
        return _exit_status(exc)
    except Exception as exc:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (run with --debug for the traceback)"
        sys.stderr.write(f"{_PROG}: error: unexpected {type(exc).__name__}: {exc}{hint}\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
