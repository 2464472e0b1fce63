"""The dashboard in headless Chromium, served by ``durably serve`` in its own OS process.

Three processes share one database file: the server (no worker), a worker process,
and this test, which triggers runs. Whatever the browser shows live therefore came
through the server's storage poll. Screenshots go to test-artifacts/ (gitignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from playwright.async_api import Browser, Page, async_playwright

from durably import Durably

from .app import make
from .conftest import free_port, wait_until_serving

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("DURABLY_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


class Stack:
    """The server and worker processes on one database."""

    def __init__(self, url: str, db: str, log_dir: Path) -> None:
        self.url = url
        self.db = db
        self.log_dir = log_dir


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen[bytes], *, terminate: bool = True) -> None:
    if not terminate:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(15)  # it stops by itself
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("dashboard")
    db = f"file:{root / 'dash.db'}"
    port = free_port()
    env = {**os.environ, "DURABLY_WEB_TEST_DB": db}
    serve_cmd = [
        sys.executable,
        "-m",
        "durably",
        "serve",
        "--app",
        "tests.web.served:durably",
        "--port",
        str(port),
    ]
    server = _start(serve_cmd, root / "server.log", env)
    worker = _start(
        [sys.executable, str(Path(__file__).parent / "app.py"), db, str(root / "stop")],
        root / "worker.log",
        env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(f"{url}/api/jobs", server, root / "server.log")
        yield Stack(url, db, root)
    finally:
        (root / "stop").touch()
        _stop(worker, terminate=False)
        _stop(server)
    assert server.returncode == 0, (root / "server.log").read_text()  # SIGTERM: a graceful exit
    assert worker.returncode == 0, (root / "worker.log").read_text()


@pytest.fixture
def chromium() -> str:
    """Debian's chromium (Playwright cannot download browsers here); under CI=true it must exist."""
    if not Path(CHROMIUM).exists():
        message = f"no chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def trigger_host(stack: Stack) -> AsyncIterator[Durably]:
    """This test process: it triggers and reads runs, and executes none."""
    instance = make(stack.db)
    try:
        yield instance
    finally:
        await instance.close()


class Opened:
    def __init__(self, page: Page, requests: list[str]) -> None:
        self.page = page
        self.requests = requests


async def _open(
    browser: Browser, stack: Stack, hash_: str = "#/", width: int = 1280, live: bool = True
) -> Opened:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    requests: list[str] = []

    async def record(route: Any) -> None:
        requests.append(route.request.url)
        if route.request.url.startswith(stack.url + "/"):
            await route.continue_()
        else:
            await route.abort()

    await page.route("**/*", record)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"{stack.url}/{hash_}")
    await page.wait_for_selector("#live.on" if live else "main h1", timeout=10_000)
    assert errors == []
    return Opened(page, requests)


async def _shot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def test_the_page_loads_everything_from_its_own_origin(browser: Browser, stack: Stack) -> None:
    opened = await _open(browser, stack)
    await opened.page.wait_for_selector("table.runs")
    assert opened.requests, "no request was recorded"
    outside = [url for url in opened.requests if not url.startswith(stack.url + "/")]
    assert outside == []
    assert {url.rsplit("/", 1)[-1].split("?")[0] for url in opened.requests} >= {
        "",
        "app.js",
        "app.css",
        "jobs",
    }
    await _shot(opened.page, "runs-empty")


async def test_a_run_of_another_process_appears_and_completes_live(
    browser: Browser, stack: Stack, trigger_host: Durably
) -> None:
    opened = await _open(browser, stack)
    page = opened.page
    run = await trigger_host.jobs.count.trigger({"steps": 8, "pause": 0.6}, labels={"source": "test"})
    row = f'tr[data-run="{run.id}"]'
    await page.wait_for_selector(row, timeout=10_000)
    seen: list[float] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = await page.get_attribute(row, "data-status")
        value = await page.evaluate(f"document.querySelector('{row} progress')?.value ?? null")
        if value is not None and (not seen or seen[-1] != value):
            seen.append(value)
        if status == "completed":
            break
        await page.wait_for_timeout(100)
    assert status == "completed"
    assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] == 8, seen
    assert "source=test" in await page.inner_text(row)
    await _shot(page, "runs-live")

    await page.click(f"{row} a")
    await page.wait_for_selector('tr[data-step="tick-7"]')
    assert await page.inner_text("pre[aria-label=Output]") == "8"
    assert (await page.inner_text("ol.logs")).count("tick") == 8
    await _shot(page, "run-completed")


async def test_cancel_stops_a_run_in_the_worker_process_and_delete_removes_it(
    browser: Browser, stack: Stack, trigger_host: Durably
) -> None:
    run = await trigger_host.jobs.count.trigger({"steps": 60, "pause": 0.3})
    opened = await _open(browser, stack, f"#/runs/{run.id}")
    page = opened.page
    await page.wait_for_selector('h1 .status[data-status="leased"]', timeout=10_000)
    await page.wait_for_selector('tr[data-step="tick-0"]', timeout=10_000)
    await page.get_by_role("button", name="Cancel").click()
    await page.wait_for_selector('h1 .status[data-status="cancelled"]', timeout=10_000)
    done = await trigger_host.wait_for_run(run.id, timeout=5)
    assert done.status == "cancelled"
    steps = len(await trigger_host.get_steps(run.id))
    await anyio.sleep(1)  # the worker has stopped: no step is stored after the cancel
    assert len(await trigger_host.get_steps(run.id)) == steps < 60
    page.once("dialog", lambda dialog: dialog.accept())  # "Delete run …?"
    await page.get_by_role("button", name="Delete").click()
    await page.wait_for_selector("table.runs")
    assert await trigger_host.get_run(run.id) is None
    assert await page.locator(f'tr[data-run="{run.id}"]').count() == 0


async def test_the_signal_button_wakes_a_waiting_run(
    browser: Browser, stack: Stack, trigger_host: Durably
) -> None:
    run = await trigger_host.jobs.approve.trigger({})
    opened = await _open(browser, stack, f"#/runs/{run.id}")
    page = opened.page
    await page.wait_for_selector('h1 .status[data-status="waiting"]', timeout=10_000)
    assert "signal:approval" in await page.inner_text("dl.meta")
    answers = iter(["approval", '{"ok": true}'])  # the name (offered), then the payload
    page.on("dialog", lambda dialog: dialog.accept(next(answers)))
    await page.get_by_role("button", name="Signal").click()
    await page.wait_for_selector('h1 .status[data-status="completed"]', timeout=10_000)
    assert await page.inner_text("pre[aria-label=Output]") == '{\n  "ok": true\n}'
    done = await trigger_host.get_run(run.id)
    assert done is not None and done.output == {"ok": True}


async def test_the_trigger_form_is_built_from_the_input_schema(
    browser: Browser, stack: Stack, trigger_host: Durably
) -> None:
    opened = await _open(browser, stack, "#/trigger/greet", live=False)
    page = opened.page
    await page.get_by_label("name").fill("form")
    await page.get_by_label("times").fill("2")
    await page.get_by_label("shout").check()
    await page.get_by_label("Labels").fill("via:form, team:web")
    await _shot(page, "trigger-form")
    await page.get_by_role("button", name="Trigger greet").click()
    await page.wait_for_selector('h1 .status[data-status="completed"]', timeout=15_000)
    assert await page.inner_text("pre[aria-label=Output]") == '"HELLO FORMHELLO FORM"'
    run_id = await page.inner_text("dd.id")
    run = await trigger_host.get_run(run_id)
    assert run is not None
    assert (run.input, run.labels) == (
        {"name": "form", "times": 2, "shout": True},
        {"via": "form", "team": "web"},
    )

    await page.goto(f"{stack.url}/#/trigger/greet")
    await page.get_by_role("button", name="Trigger greet").click()  # name is required
    assert await page.evaluate("document.querySelector('#field-name').validity.valueMissing")


async def test_readable_at_390px_and_usable_from_the_keyboard(
    browser: Browser, stack: Stack, trigger_host: Durably
) -> None:
    await trigger_host.jobs.greet.trigger({"name": "narrow"}, labels={"size": "390"})
    opened = await _open(browser, stack, width=390)
    page = opened.page
    await page.wait_for_selector("table.runs tbody tr")
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow}px of horizontal scrolling at 390 px"
    await _shot(page, "runs-390")
    unlabelled = await page.evaluate(
        """[...document.querySelectorAll('input, select, textarea, button, progress')]
            .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.textContent.trim()).map(el => el.outerHTML)"""
    )
    assert unlabelled == []
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")
    await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.getAttribute('href')") == "#/trigger"
    await page.keyboard.press("Enter")
    await page.wait_for_selector("form.form")
    assert await page.evaluate("document.activeElement.id") == "main"  # focus moved to the new view
    await _shot(page, "trigger-390")
