"""The single entry point: tests, lint, typecheck, demo, bench."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against a SQLite file and real sqld servers (fetched and cached under .cache/).

    Branch coverage of durably/ includes the worker and CLI subprocesses ([tool.coverage]
    in pyproject.toml): each process writes its own data file; pytest-cov combines those
    it finds at the end, and the combine below picks up any written after that.
    """
    session.install("-e", ".[test]")
    session.run("coverage", "erase")
    session.run("pytest", "--cov", "--cov-report=", *session.posargs)
    if list(Path().glob(".coverage.*")):
        session.run("coverage", "combine", "--append")
    if Path(".coverage").exists():  # not with --no-cov in the arguments
        session.run("coverage", "report")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format check) and mypy --strict."""
    session.install("-e", ".[test,lint]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Only the typing checks (also part of `tests`): user programs under mypy --strict and pyright."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_typing.py", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The main example on the embedded local file; no server needed."""
    session.install("-e", ".")
    session.run("python", "examples/server/basic.py")


@nox.session
def bench(session: nox.Session) -> None:
    """The benchmark table (docs/performance.md); a few minutes on 2 cores."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "benchmarks", *session.posargs)
