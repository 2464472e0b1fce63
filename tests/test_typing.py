"""Types flow to user code: the programs in tests/typing/ and examples/ under mypy --strict and pyright.

Each checker runs once over every program. A passing program must have no error at
all; in a ``fail_*.py`` program every line marked ``# E: <code>`` must have exactly
that mypy error (and some pyright error), and no unmarked line may have any.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from durably import NotFoundError, create_durably, define_job

from .jobs import ImageIn, ImageOut, echo, process_image

ROOT = Path(__file__).resolve().parent.parent
TYPING = ROOT / "tests" / "typing"
EXAMPLES = ROOT / "examples" / "server"
SEARCH_PATH = [EXAMPLES, TYPING]  # the examples import their `jobs` and `lib`; programs here `images`
PROGRAMS = sorted([*TYPING.glob("*.py"), *EXAMPLES.rglob("*.py")])
FAILING = [path for path in PROGRAMS if path.name.startswith("fail_")]
PASSING = [path for path in PROGRAMS if path not in FAILING]

_MARK = re.compile(r"#\s*E:\s*(?P<codes>[a-z-]+(?:\s*,\s*[a-z-]+)*)\s*$")
_MYPY_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$")

Errors = dict[Path, Counter[tuple[int, str]]]


def expected(path: Path) -> Counter[tuple[int, str]]:
    """The ``# E: code`` marks of a program: (line, mypy error code), counted."""
    marks: Counter[tuple[int, str]] = Counter()
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if match := _MARK.search(text):
            marks.update((number, code.strip()) for code in match["codes"].split(","))
    return marks


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> Errors:
    """mypy --strict (with the project's config) over every program at once; errors by file."""
    cache = tmp_path_factory.mktemp("mypy-cache")
    env = {**os.environ, "MYPYPATH": os.pathsep.join(map(str, SEARCH_PATH))}
    proc = _run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--strict"]
        + ["--explicit-package-bases", "--cache-dir", str(cache), "--no-error-summary"]
        + ["--hide-error-context", "--no-pretty", "--show-error-codes", "--no-color-output"]
        + [str(path) for path in PROGRAMS],
        env,
    )
    assert proc.returncode in (0, 1), f"mypy crashed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    errors: Errors = {path: Counter() for path in PROGRAMS}
    for line in proc.stdout.splitlines():
        if ": note: " in line:
            continue
        match = _MYPY_LINE.match(line)
        assert match, f"unexpected mypy output: {line}"
        errors[(ROOT / match["path"]).resolve()][(int(match["line"]), match["code"])] += 1
    return errors


@pytest.fixture(scope="module")
def pyright_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, set[int]]:
    """pyright in strict mode over every program at once; the lines with errors, by file.

    The pyright wheel bundles the checker and runs it on the machine's Node.js.
    """
    config = tmp_path_factory.mktemp("pyright") / "pyrightconfig.json"
    config.write_text(
        json.dumps(
            {
                "typeCheckingMode": "strict",
                "pythonVersion": "3.11",
                "extraPaths": [str(path) for path in SEARCH_PATH],
            }
        )
    )
    proc = _run(
        [sys.executable, "-m", "pyright", "--outputjson", "--pythonpath", sys.executable]
        + ["--project", str(config)]
        + [str(path) for path in PROGRAMS]
    )
    assert proc.returncode in (0, 1), f"pyright failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    report = json.loads(proc.stdout)
    assert report["summary"]["filesAnalyzed"] == len(PROGRAMS), report["summary"]
    errors: dict[Path, set[int]] = {path: set() for path in PROGRAMS}
    for diagnostic in report["generalDiagnostics"]:
        if diagnostic["severity"] == "error":
            # pyright counts lines from 0.
            errors[Path(diagnostic["file"]).resolve()].add(diagnostic["range"]["start"]["line"] + 1)
    return errors


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_the_programs_are_found() -> None:
    assert {path.name for path in FAILING} >= {"fail_payloads.py", "fail_outputs.py", "fail_definitions.py"}
    assert {"jobs_flow.py", "basic.py"} <= {path.name for path in PASSING}
    for path in FAILING:
        assert expected(path), f"{_name(path)} marks no expected error"
    for path in PASSING:
        assert not expected(path), f"{_name(path)} marks an error but is not a fail_*.py program"


@pytest.mark.parametrize("path", PASSING, ids=_name)
def test_a_correct_program_passes_mypy_strict(path: Path, mypy_errors: Errors) -> None:
    assert not mypy_errors[path], sorted(mypy_errors[path])


@pytest.mark.parametrize("path", FAILING, ids=_name)
def test_mypy_flags_each_mistake_where_marked_and_nothing_else(path: Path, mypy_errors: Errors) -> None:
    assert sorted(mypy_errors[path].elements()) == sorted(expected(path).elements())


@pytest.mark.parametrize("path", PASSING, ids=_name)
def test_a_correct_program_passes_pyright_strict(path: Path, pyright_errors: dict[Path, set[int]]) -> None:
    assert not pyright_errors[path], sorted(pyright_errors[path])


@pytest.mark.parametrize("path", FAILING, ids=_name)
def test_pyright_flags_each_mistake_where_marked_and_nothing_else(
    path: Path, pyright_errors: dict[Path, set[int]]
) -> None:
    assert pyright_errors[path] == {line for line, _ in expected(path)}


# --- what the checkers are told holds at run time ------------------------------------------------


def test_job_of_a_definition_is_its_registered_handle_and_names_still_work(tmp_path: Path) -> None:
    durably = create_durably(f"file:{tmp_path / 'typed.db'}").register(images=process_image, echo=echo)
    assert durably.job(process_image) is durably.jobs.images
    assert durably.job(echo) is durably.jobs["echo"]
    assert durably.job("process-image") is durably.jobs.images  # the job name
    assert durably.job("images") is durably.jobs.images  # the handle name


def test_job_of_an_unregistered_definition_or_unknown_name_is_not_found(tmp_path: Path) -> None:
    durably = create_durably(f"file:{tmp_path / 'typed.db'}").register(images=process_image)
    # Same job name, but not the registered definition: its types could differ.
    twin = define_job(name="process-image", input=ImageIn, output=ImageOut, run=process_image.run)
    with pytest.raises(NotFoundError, match="'process-image' is not registered"):
        durably.job(twin)
    with pytest.raises(NotFoundError, match="echo"):
        durably.job(echo)
    with pytest.raises(NotFoundError, match="no job named 'resize'"):
        durably.job("resize")


@pytest.mark.anyio
async def test_the_typed_handle_returns_an_instance_of_the_declared_output(tmp_path: Path) -> None:
    durably = create_durably(f"file:{tmp_path / 'typed.db'}", polling_interval=0.01)
    durably.register(process_image=process_image)
    async with durably:
        result = await durably.job(process_image).trigger_and_wait(ImageIn(filename="a.jpg"), timeout=10)
    assert type(result.output) is ImageOut
    assert result.output.url.startswith("https://")
