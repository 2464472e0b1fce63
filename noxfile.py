"""The single entry point: tests, lint, typecheck, demo, bench."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite against a SQLite file and real sqld servers (fetched and cached under .cache/)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


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
