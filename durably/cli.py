"""The ``durably`` command: run a worker, trigger jobs, inspect and manage runs.

Exit status: 0 on success, 1 when a run failed or an operation was refused (not
found, conflict, database error), 2 for usage and configuration errors.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import anyio
import msgspec
import structlog

from durably import _cli_render as render
from durably._engine import Durably
from durably.adapters import open_storage
from durably.errors import ConfigurationError, DurablyError, NotFoundError, ValidationError

_PROG = "durably"
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_STATUSES = ("pending", "leased", "completed", "failed", "cancelled")


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


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors"
    )
    app = _Parser(add_help=False)
    app.add_argument("--app", required=True, metavar="MODULE:ATTR", help="a Durably instance to import")
    db = _Parser(add_help=False)
    db.add_argument("--db", metavar="URL", help="database URL (default: $TURSO_DATABASE_URL)")
    db.add_argument("--auth-token", metavar="TOKEN", help="auth token (default: $TURSO_AUTH_TOKEN)")
    db.add_argument("--app", metavar="MODULE:ATTR", help="use this Durably instance's database instead")

    parser = _Parser(prog=_PROG, description="Durable jobs on SQLite and libSQL/Turso.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, *parents: _Parser) -> _Parser:
        inherited: list[_Parser] = [common, *parents]
        return commands.add_parser(name, help=help, description=help, parents=inherited)

    worker = command("worker", "run a worker until SIGINT/SIGTERM", app)
    worker.add_argument("--concurrency", type=_positive_int, metavar="N", help="runs executed at once")
    trigger = command("trigger", "trigger a run of a job", app)
    trigger.add_argument("job", metavar="JOB", help="the job's name or its registered handle name")
    trigger.add_argument("--input", default="{}", metavar="JSON", help="the payload (default: {})")
    trigger.add_argument("--wait", action="store_true", help="execute it here and print its output")
    trigger.add_argument("--idempotency-key", metavar="KEY")
    trigger.add_argument("--concurrency-key", metavar="KEY")
    runs = command("runs", "list runs, newest first", db)
    runs.add_argument("--status", action="append", metavar="STATUS", help=f"one of {', '.join(_STATUSES)}")
    runs.add_argument("--job", action="append", metavar="NAME", help="a job name (repeatable)")
    runs.add_argument("--limit", type=_positive_int, default=50, metavar="N")
    runs.add_argument("--json", action="store_true", help="print a JSON list of runs")
    show = command("show", "show a run with its steps and logs", db)
    show.add_argument("run_id", metavar="RUN_ID")
    show.add_argument("--json", action="store_true", help="print the run, steps and logs as JSON")
    for name, help in (
        ("retry", "put a failed or cancelled run back to pending"),
        ("cancel", "cancel a pending or running run"),
        ("delete", "delete an ended run with its steps and logs"),
    ):
        command(name, help, db).add_argument("run_id", metavar="RUN_ID")
    purge = command("purge", "delete ended runs older than an age", db)
    purge.add_argument("--older-than", type=_age, required=True, metavar="AGE", help="e.g. 30d, 12h, 90m")
    command("migrate", "create or upgrade the database schema", db)
    return parser


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


async def _worker(args: argparse.Namespace) -> int:
    app = _with_concurrency(load_app(args.app), args.concurrency)
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
    _say("worker stopped")
    return 0


async def _trigger(args: argparse.Namespace) -> int:
    app = load_app(args.app)
    try:
        handle = app.job(args.job)
    except NotFoundError as exc:
        raise UsageError(f"--app {args.app}: {exc}") from exc
    try:
        payload = msgspec.json.decode(args.input)
    except msgspec.DecodeError as exc:
        raise UsageError(f"--input is not valid JSON: {exc}") from exc
    keys = {"idempotency_key": args.idempotency_key, "concurrency_key": args.concurrency_key}
    if not args.wait:
        try:
            run = await handle.trigger(payload, **keys)
        finally:
            await app.close()
        _out(f"{run.id} {run.disposition}")
        return 0
    bar = render.ProgressBar(sys.stderr)
    try:
        async with app:
            result = await handle.trigger_and_wait(payload, on_progress=bar, **keys)
    finally:
        bar.close()
    _out(render.as_json(result.output))
    return 0


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


_DB_COMMANDS: dict[str, Callable[[argparse.Namespace, Durably], Awaitable[int]]] = {
    "runs": _runs,
    "show": _show,
    "retry": _retry,
    "cancel": _cancel,
    "delete": _delete,
    "purge": _purge,
    "migrate": _migrate,
}


async def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "worker":
        return await _worker(args)
    if args.command == "trigger":
        return await _trigger(args)
    app = _open(args)
    try:
        return await _DB_COMMANDS[args.command](args, app)
    finally:
        await app.close()


def _exit_status(exc: BaseException) -> int:
    return 2 if isinstance(exc, (UsageError, ConfigurationError, ValidationError)) else 1


def _configure_logging(level: int) -> None:
    # stdout is for results (``trigger --wait`` prints JSON there), so log to stderr.
    if not structlog.is_configured():
        structlog.configure(
            logger_factory=structlog.PrintLoggerFactory(sys.stderr),
            wrapper_class=structlog.make_filtering_bound_logger(level),
        )


def main(argv: list[str] | None = None) -> int:
    """Run the ``durably`` command with ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    _configure_logging(logging.DEBUG if debug else logging.INFO)
    try:
        return anyio.run(_dispatch, args)
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
