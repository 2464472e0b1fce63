"""examples/web/app.py runs as users run it: a script in a subprocess, on file:local.db in its directory."""

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

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "web" / "app.py"


def test_the_fastapi_example_triggers_from_its_own_endpoint_and_serves_the_dashboard(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TURSO_")} | {"PORT": str(port)}
    log = tmp_path / "example.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{base}/durably/api/jobs", process, log)

        answer = httpx.post(f"{base}/reports", json={"customer": "acme"})
        assert answer.status_code == 202, answer.text
        run_id = answer.json()["run_id"]
        assert answer.json()["watch"] == f"/durably/#/runs/{run_id}"
        deadline = time.monotonic() + 20
        while (run := httpx.get(f"{base}/durably/api/runs/{run_id}").json())["status"] != "completed":
            assert run["status"] in ("pending", "leased") and time.monotonic() < deadline, run
            time.sleep(0.1)
        assert run["output"] == {"customer": "acme", "total": 774}
        assert run["labels"] == {"customer": "acme"}
        steps = httpx.get(f"{base}/durably/api/runs/{run_id}/steps").json()["steps"]
        assert [s["name"] for s in steps] == [f"month-{m}" for m in range(1, 7)] + ["email"]
        dashboard = httpx.get(f"{base}/durably/", follow_redirects=True)
        assert dashboard.status_code == 200 and "static/app.js" in dashboard.text
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(15)
    assert "Traceback" not in log.read_text().replace("KeyboardInterrupt", ""), log.read_text()
    assert (tmp_path / "local.db").is_file()
