"""The dashboard in a real browser, against a real ``serve`` running real containers.

One ``serve`` for the module (the embedded queue, the Python 2.7 example
worker and the test worker), with a few tasks in every state; a second one
with an API token for the login. Every test checks what a user would see,
that the page logged no error, opened no dialog and asked no other host for
anything, and saves a screenshot in tests/browser/screenshots/.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Watch, screenshot
from tests.conftest import new_host_id
from tests.serving import Serve, config_text, free_port

pytestmark = pytest.mark.docker

TRACE_URL = "http://localhost:16686/trace/{trace_id}"
LEGACY = "PrismQ.Legacy.NormalizeTags"
SCRIPT = "<script>alert(1)</script>"
TOKEN = "dashboard-test-token"

WORKERS = f"""
[[workers]]
name = "{LEGACY}"
image = "workerhost/legacy-tags:latest"
task_types = ["{LEGACY}"]
timeout = "30s"
max_retries = 0
concurrency = 2
memory = "64m"

# A retriable failure with no retries left is a dead letter at once.
[[workers]]
name = "Test.Dead"
image = "workerhost-test/behave:latest"
task_types = ["Test.Dead"]
timeout = "30s"
max_retries = 0
concurrency = 2
memory = "64m"

[telemetry]
trace_url = "{TRACE_URL}"
"""


@dataclass
class Dashboard:
    serve: Serve
    legacy: dict[str, Any]  # completed, by the Python 2.7 example worker (its span: "normalise")
    done: dict[str, Any]  # completed, by the test worker
    dead: dict[str, Any]  # a dead letter (exit 1, no retries)
    hostile: dict[str, Any]  # failed; params and stderr hold SCRIPT


def start_serve(tmp: Path, image: str, extra_host: str = "") -> Serve:
    port = free_port()
    config = tmp / "workerhost.toml"
    config.write_text(config_text(new_host_id(), port, tmp / "queue.db", image, workers=WORKERS, extra_host=extra_host))
    return Serve(config, port, tmp / "serve.log").start()


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, behave_image: str, example_images: None) -> Iterator[Dashboard]:
    serve = start_serve(tmp_path_factory.mktemp("dashboard"), behave_image)
    try:
        ids = {
            "legacy": serve.submit(LEGACY, tags=["Café Bar", "cafe_bar", "Ünïcode", "x"])["id"],
            "done": serve.submit("Test.Behave", do="ok")["id"],
            "dead": serve.submit("Test.Dead", do="exit", code=1)["id"],
            "hostile": serve.submit("Test.Behave", do="stderr", hex=(SCRIPT + "\n").encode().hex(), code=2,
                                    note=SCRIPT)["id"],
        }  # fmt: skip
        ended = ("completed", "failed", "dead")
        tasks = {name: serve.wait_for(task_id, ended, timeout=120) for name, task_id in ids.items()}
        assert [tasks[n]["status"] for n in ("legacy", "done", "dead", "hostile")] == [
            "completed", "completed", "dead", "failed"
        ], tasks  # fmt: skip
        yield Dashboard(serve, tasks["legacy"], tasks["done"], tasks["dead"], tasks["hostile"])
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory, behave_image: str, example_images: None) -> Iterator[Serve]:
    """A second serve, with [host] api_token: the dashboard asks for it."""
    serve = start_serve(tmp_path_factory.mktemp("locked"), behave_image, extra_host=f'api_token = "{TOKEN}"')
    serve.http.headers["Authorization"] = f"Bearer {TOKEN}"
    try:
        yield serve
    finally:
        serve.stop()


def checked(page: Any, watch: Watch, name: str) -> None:
    """Save what the test looked at, then: no console error, no dialog, nothing asked of another host."""
    screenshot(page, name)
    watch.check()


def task_link(page: Any, task_id: str) -> Any:
    return page.locator(f'a[href*="{task_id}"]').first


def task_path(task_id: str) -> str:
    return f"/#/tasks/{task_id}"


def waterfall_row(page: Any, kind: str, name: str) -> Any:
    """One row of a task's waterfall: kind "attempt", "phase" (a container phase) or "span" (the worker's)."""
    return page.locator(f'#waterfall .row[data-kind="{kind}"][data-name="{name}"]')


@pytest.mark.parametrize("name", ["overview", "tasks", "workers", "dead", "submit", "task"])
def test_each_page_loads(dashboard: Dashboard, new_page: Any, watch: Watch, name: str) -> None:
    from playwright.sync_api import expect

    page = new_page(dashboard.serve.url)
    legacy, dead = dashboard.legacy, dashboard.dead
    if name == "overview":
        page.goto("/#/")
        expect(page.get_by_text(LEGACY).first).to_be_visible()  # tasks in flight, per worker
    elif name == "tasks":
        page.goto("/#/tasks")
        for task in (legacy, dashboard.done, dead, dashboard.hostile):
            expect(task_link(page, task["id"])).to_be_visible()
    elif name == "workers":
        page.goto("/#/workers")
        for worker in (LEGACY, "Test.Behave", "Test.Dead"):
            expect(page.get_by_text(worker, exact=True).first).to_be_visible()
        expect(page.get_by_text("workerhost/legacy-tags:latest").first).to_be_visible()
    elif name == "dead":
        page.goto("/#/dead")
        expect(task_link(page, dead["id"])).to_be_visible()
        expect(task_link(page, legacy["id"])).to_have_count(0)  # completed: not a dead letter
    elif name == "submit":
        page.goto("/#/submit")
        expect(page.locator("textarea").first).to_be_visible()
        expect(page.locator("select, input[list], input[name*=type]").first).to_be_visible()
        expect(page.locator(f'option[value="{LEGACY}"]')).to_have_count(1)  # the types it can run
    else:
        page.goto(task_path(legacy["id"]))
        expect(page.get_by_text(legacy["id"]).first).to_be_visible()
        expect(page.get_by_text("normalise").first).to_be_visible()
        expect(page.get_by_text("Café Bar").first).to_be_visible()  # its params
        if legacy["image_id"]:
            expect(page.get_by_text(legacy["image_id"][:15]).first).to_be_visible()  # the image digest
    checked(page, watch, name)


def test_a_submitted_task_appears_without_a_reload(dashboard: Dashboard, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    page = new_page(dashboard.serve.url)
    page.goto("/#/tasks")
    expect(task_link(page, dashboard.done["id"])).to_be_visible()
    page.evaluate("window.stillTheSamePage = true")  # a reload would lose it

    task = httpx.post(f"{dashboard.serve.url}/tasks", json={"type": "Test.Behave", "params": {"do": "ok"}}).json()

    expect(task_link(page, task["id"])).to_be_visible()
    assert page.evaluate("window.stillTheSamePage") is True, "the page reloaded"
    dashboard.serve.wait_for(task["id"], ("completed",))
    checked(page, watch, "tasks-live")


def test_the_retry_button_sends_a_dead_task_back(dashboard: Dashboard, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    serve, dead = dashboard.serve, dashboard.dead
    before = serve.task(dead["id"])
    assert before["status"] == "dead"
    page = new_page(serve.url)
    page.goto("/#/dead")
    row = page.locator("tr", has=page.locator(f'a[href*="{dead["id"]}"]'))
    button = row.get_by_role("button", name=re.compile("retry", re.I))
    expect(button).to_be_visible()
    screenshot(page, "dead-before-retry")

    button.click()

    # It is sent back to pending and runs again (and, exiting 1 with no retries, dies again):
    # either we see it away from dead, or it has ended once more since.
    deadline = time.monotonic() + 60
    seen = set()
    while time.monotonic() < deadline:
        now = serve.task(dead["id"])
        seen.add(now["status"])
        if now["status"] != "dead" or now["finished_at"] != before["finished_at"]:
            break
        time.sleep(0.02)
    assert seen - {"dead"} or now["finished_at"] != before["finished_at"], "the task was not sent back"
    serve.wait_for(dead["id"], ("dead",))  # leave the module's dead letter as it was
    checked(page, watch, "dead-retried")


def test_the_trace_link_carries_the_trace_id(dashboard: Dashboard, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    task = dashboard.legacy
    assert task["trace_id"], task
    expected = TRACE_URL.format(trace_id=task["trace_id"])
    assert task["trace_url"] == expected
    page = new_page(dashboard.serve.url)
    page.goto(task_path(task["id"]))
    link = page.get_by_role("link", name=re.compile("trace", re.I))
    expect(link).to_have_attribute("href", expected)
    checked(page, watch, "task-trace-link")


def test_the_waterfall_shows_attempt_phases_and_worker_span(dashboard: Dashboard, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    task = dashboard.serve.task(dashboard.legacy["id"])
    records = task.get("attempt_records") or []
    assert len(records) == 1, f"the host recorded no attempt (backend): {records}"
    phases = [p["name"] for p in records[0]["phases"]]
    spans = [s["name"] for s in records[0]["spans"]]
    assert "normalise" in spans, f"the worker's span was not recorded (backend): {spans}"
    assert phases, "no container phases recorded (backend)"

    page = new_page(dashboard.serve.url)
    page.goto(task_path(task["id"]))
    expect(waterfall_row(page, "attempt", "attempt 1")).to_be_visible()
    for name in phases:  # create, start, exchange, teardown (or take, for a warm container)
        expect(waterfall_row(page, "phase", name)).to_be_visible()
    expect(waterfall_row(page, "span", "normalise")).to_be_visible()
    checked(page, watch, "task-waterfall")


def test_a_token_requires_a_login(locked: Serve, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    task = locked.submit("Test.Behave", do="ok")
    locked.wait_for(task["id"], ("completed",))
    with httpx.Client(base_url=locked.url) as anonymous:
        for path in ("/overview", "/tasks", "/workers", f"/tasks/{task['id']}"):
            assert anonymous.get(path).status_code == 401, path
        assert anonymous.get("/session").json() == {"auth_required": True, "logged_in": False}

    page = new_page(locked.url)
    page.goto("/#/")
    token = page.locator("input[type=password]")
    expect(token).to_be_visible()
    screenshot(page, "login")

    # The browser logs the 401 of a wrong token as a console error; that one is expected.
    watch.allowed_console.append("status of 401")
    token.fill("not-the-token")
    token.press("Enter")
    refused = page.locator("#login-error")
    expect(refused).to_be_visible()
    expect(refused).to_have_text(re.compile(r"\w"))
    assert not any(c["name"] == "workerhost_session" for c in page.context.cookies())
    screenshot(page, "login-wrong-token")

    token.fill(TOKEN)
    token.press("Enter")
    expect(token).to_have_count(0)
    expect(page.get_by_text("Test.Behave").first).to_be_visible()  # the overview, with its workers
    cookie = next(c for c in page.context.cookies() if c["name"] == "workerhost_session")
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: the page's scripts cannot read it

    # The cookie alone may read, but a change needs the page's CSRF header too.
    with httpx.Client(base_url=locked.url, cookies={"workerhost_session": cookie["value"]}) as session:
        assert session.get("/overview").status_code == 200
        forged = session.post("/tasks", json={"type": "Test.Behave", "params": {"do": "ok"}})
        assert forged.status_code == 403, forged.text
    screenshot(page, "logged-in")

    # The page's own changes carry the header: a task submitted through its form is made.
    submit_through_form(page, "Test.Behave", '{"do": "ok"}')
    checked(page, watch, "logged-in-submitted")


def submit_through_form(page: Any, task_type: str, params: str) -> None:
    """Submit a task with the page's form, and follow it to its page until it completes."""
    from playwright.sync_api import expect

    page.goto("/#/submit")
    page.locator("#submit-type").select_option(task_type)
    page.locator("#submit-params").fill(params)
    page.get_by_role("button", name="Submit").click()
    expect(page).to_have_url(re.compile(r"#/tasks/[0-9a-f-]{36}$"))
    expect(page.locator("#task .badge", has_text="completed").first).to_be_visible()


def test_the_submit_form_checks_the_json(dashboard: Dashboard, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    page = new_page(dashboard.serve.url)
    page.goto("/#/submit")
    page.locator("#submit-type").select_option(LEGACY)
    page.locator("#submit-params").fill('{"tags": ["a", ')
    expect(page.locator("#params-error")).to_contain_text("not valid JSON")
    expect(page.get_by_role("button", name="Submit")).to_be_disabled()
    page.locator("#submit-params").fill('["a"]')
    expect(page.locator("#params-error")).to_contain_text("JSON object")
    screenshot(page, "submit-invalid")

    submit_through_form(page, LEGACY, '{"tags": ["Big Data", "big_data"]}')
    expect(page.get_by_text("big-data").first).to_be_visible()  # its result
    checked(page, watch, "submit-sent")


def test_what_a_task_wrote_is_shown_as_text(dashboard: Dashboard, new_page: Any, watch: Watch) -> None:
    from playwright.sync_api import expect

    task = dashboard.serve.task(dashboard.hostile["id"])
    assert SCRIPT in (task["stderr_tail"] or ""), task
    page = new_page(dashboard.serve.url)
    page.goto(task_path(task["id"]))
    expect(page.get_by_text(task["id"]).first).to_be_visible()
    shown = page.get_by_text(SCRIPT)
    expect(shown.first).to_be_visible()
    assert shown.count() >= 2, "params and stderr should both show the characters"
    injected = page.evaluate("[...document.querySelectorAll('script')].some(s => s.textContent.includes('alert(1)'))")
    assert not injected, "a <script> from the task made it into the DOM"
    assert watch.dialogs == []
    checked(page, watch, "task-script-as-text")
