"""``durably serve``: loopback by default, ``--worker`` executes runs, SIGINT stops it with exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port, wait_until_serving

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_serve_with_a_worker_executes_runs_and_stops_gracefully(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "DURABLY_WEB_TEST_DB": f"file:{tmp_path / 'serve.db'}"}
    command = [
        sys.executable,
        "-m",
        "durably",
        "serve",
        "--app",
        "tests.web.served:durably",
        "--port",
        str(port),
    ]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen([*command, "--worker"], cwd=ROOT, env=env, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/api/jobs", process, log)
        run = httpx.post(f"{base}/api/jobs/greet/trigger", json={"input": {"name": "cli"}}).json()
        deadline = time.monotonic() + 15
        while (current := httpx.get(f"{base}/api/runs/{run['id']}").json())["status"] != "completed":
            assert time.monotonic() < deadline, current
            time.sleep(0.05)
        assert current["output"] == "hello cli"
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(15)
    output = log.read_text()
    assert code == 0, output
    assert f"on http://127.0.0.1:{port}/ (with a worker)" in output
    assert "server stopped" in output and "Traceback" not in output


def test_serve_needs_an_app() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "durably", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "--app" in done.stderr
