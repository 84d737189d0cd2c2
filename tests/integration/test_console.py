"""The run console in a real browser (Debian's chromium, driven by Playwright) against a real
stack: Redis, Triton, workers and the gateway with API keys. A tenant logs in and finds its
runs, live, and each run's steps; another tenant's runs are not there; an operator cancels a
run and replays a dead letter to success from the pages."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.browser import browser_context

from .conftest import REPO, Fleet, close_fleet, new_fleet, served_gateway

pytestmark = pytest.mark.integration

ACME, GLOBEX, ADMIN = "acme-console-key", "globex-console-key", "ops-console-key"
TENANTS = json.dumps([{"name": "acme", "keys": [ACME]}, {"name": "globex", "keys": [GLOBEX]}])
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def stack(redis_url, triton, session_dir, tmp_path_factory) -> Iterator[tuple[Fleet, str]]:
    agents = tmp_path_factory.mktemp("console-agents")
    for toml in (REPO / "tests" / "support" / "agents").glob("*.toml"):
        shutil.copy(toml, agents)
    shutil.copy(REPO / "tests" / "support" / "gated.toml", agents)
    f = new_fleet(redis_url, triton, session_dir, "c", tenants=TENANTS, admin_keys=ADMIN, agents_dir=str(agents))
    try:
        f.start_worker("inference", "llm", "threads", 8)
        f.start_worker("tools", "tool", "threads", 8)
        with served_gateway(f.settings) as url:
            yield f, url
    finally:
        close_fleet(f)


def _submit(url: str, key: str, agent: str, input: dict) -> str:
    made = httpx.post(f"{url}/v1/runs", json={"agent": agent, "input": input}, headers={"X-API-Key": key}, timeout=30)
    assert made.status_code == 201, made.text
    return made.json()["run_id"]


@pytest.fixture
def browser() -> Iterator[object]:
    with browser_context() as context:
        yield context


def _login(page, url: str, key: str) -> None:
    page.goto(f"{url}/console/runs")
    assert "/console/login" in page.url  # a page without a key sends the browser to log in
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/console/runs")


def test_a_tenant_finds_its_runs_live_and_every_step_of_one(stack, browser, tmp_path: Path):
    f, url = stack
    mine = _submit(url, ACME, "calculator", {"question": "What is 6 * 7?"})
    theirs = _submit(url, GLOBEX, "calculator", {"question": "What is 7 * 8?"})
    for run_id in (mine, theirs):
        assert f.client.wait(run_id, timeout=60).status == "succeeded"
    page = browser.new_page()
    _login(page, url, ACME)
    page.wait_for_selector(f'tr[data-run="{mine}"] .s-succeeded')
    assert page.locator(f'tr[data-run="{theirs}"]').count() == 0 and theirs not in page.content()
    tenants_shown = set(page.locator("table.runs tbody tr td:nth-child(3)").all_inner_texts())
    assert tenants_shown == {"acme"}

    # A run submitted while the list is open appears in it, and its status follows the run.
    gate = tmp_path / "gate"
    held = _submit(url, ACME, "gated", {"gate": str(gate)})
    page.wait_for_selector(f'tr[data-run="{held}"] .s-running', timeout=WAIT_MS)

    # Its page streams its events while it runs; once the gate opens it ends, drawn again.
    page.click(f'tr[data-run="{held}"] td.id a')
    page.wait_for_url(f"{url}/console/runs/{held}")
    page.wait_for_selector("#events li", timeout=WAIT_MS)
    assert page.locator("button[data-action]").count() == 0  # a tenant reads, never acts
    gate.write_text("open")
    page.wait_for_selector("#run-status .s-succeeded", timeout=WAIT_MS)
    page.wait_for_selector('tr.step[data-step="count"] .s-done', timeout=WAIT_MS)
    assert page.locator("tr.step").evaluate_all("rows => rows.map(r => r.dataset.step)") == ["wait", "count"]

    # The calculator run's page, by the short id the list prints: every step, drawn.
    short = page.goto(f"{url}/console/runs/{mine[:8]}")
    assert short.status == 200 and page.inner_text("#run-id") == mine
    steps = page.locator("tr.step")
    assert steps.evaluate_all("rows => rows.map(r => r.dataset.step)") == ["plan", "act", "answer"]
    for i in range(3):
        assert steps.nth(i).locator(".s-done").count() == 1
        assert steps.nth(i).locator(".seg").count() >= 2  # its queue wait and its execution at least
    assert page.locator("tr.step").nth(0).locator(".seg.gen").count() == 1  # a model step's generation
    assert page.locator("tr.step").nth(1).locator(".seg.tool").count() == 1  # a tool step's tool time

    # Another tenant's run is no run here, by whole or short id.
    for ref in (theirs, theirs[:8]):
        answer = page.goto(f"{url}/console/runs/{ref}")
        assert answer.status == 404 and f"no run '{ref}'" in page.inner_text("main")


def test_an_operator_cancels_a_run_and_replays_a_dead_letter_to_success(stack, browser, tmp_path: Path):
    f, url = stack
    needed = tmp_path / f"needed-{uuid.uuid4().hex[:6]}"
    failed = _submit(url, ACME, "fixable", {"path": str(needed)})
    assert f.client.wait(failed, timeout=60).status == "dead_lettered"
    held = _submit(url, GLOBEX, "gated", {"gate": str(tmp_path / "never")})
    page = browser.new_page()
    _login(page, url, ADMIN)
    page.wait_for_selector(f'tr[data-run="{held}"]')
    page.wait_for_selector(f'tr[data-run="{failed}"] .s-dead_lettered')  # every tenant's runs

    # Cancel, from the run's page (the API call carries the page's CSRF token).
    page.goto(f"{url}/console/runs/{held}")
    page.click("button[data-action=cancel]")
    page.wait_for_selector("#run-status .s-cancelled", timeout=WAIT_MS)
    assert f.client.get(held).status == "cancelled"

    # Replay from the dead letters, once the file the step needs is there.
    [entry] = [e for e in f.client.dlq_list() if e.run_id == failed]
    page.goto(f"{url}/console/dead-letters")
    row = page.locator(f'tr[data-entry="{entry.id}"]')
    assert "needs_file" in row.inner_text()
    needed.write_text("here")
    row.locator("button[data-action=replay]").click()
    row.locator(".outcome a").wait_for(timeout=WAIT_MS)
    assert row.locator(".outcome a").get_attribute("href") == f"/console/runs/{failed}"
    assert f.client.wait(failed, timeout=60).status == "succeeded"
    row.locator(".outcome a").click()
    page.wait_for_selector("#run-status .s-succeeded", timeout=WAIT_MS)
    assert page.locator('tr.step[data-step="act"] .s-done').count() == 1

    page.goto(f"{url}/console/tenants")
    assert {"acme", "globex"} <= set(page.locator("table.tenants tbody th").all_inner_texts())


def test_pages_need_a_key_and_the_pages_actions_their_token(stack):
    f, url = stack
    run_id = _submit(url, GLOBEX, "gated", {"gate": "/nonexistent/gate"})
    with httpx.Client(base_url=url, follow_redirects=False, timeout=30) as http:
        assert http.get("/console/runs").status_code == 303
        assert http.post("/console/login", data={"key": "wrong"}).status_code == 401
        login = http.post("/console/login", data={"key": ADMIN, "next": "https://elsewhere.example/"})
        assert login.status_code == 303 and login.headers["location"] == "/console/runs"  # never off-site
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie  # loopback
        page = http.get("/console/runs")
        assert page.status_code == 200 and page.headers["x-frame-options"] == "DENY"
        token = page.text.split('name="fleet-csrf" content="', 1)[1].split('"', 1)[0]
        # A change with the cookie alone (what another site's page could make a browser send) is refused.
        assert http.delete(f"/v1/runs/{run_id}").status_code == 403
        assert http.delete(f"/v1/runs/{run_id}", headers={"X-CSRF-Token": "0" * 40}).status_code == 403
        assert f.client.get(run_id).status not in ("cancelled",)
        refused = http.delete(f"/v1/runs/{run_id}", headers={"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"})
        assert refused.status_code == 403
        cancelled = http.delete(f"/v1/runs/{run_id}", headers={"X-CSRF-Token": token})
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True
        # Reads with the cookie need no token; a header key needs neither.
        assert http.get(f"/v1/runs/{run_id}").json()["status"] == "cancelled"
    assert httpx.get(f"{url}/v1/runs/{run_id}", headers={"X-API-Key": GLOBEX}).status_code == 200


def test_without_keys_the_console_asks_no_login(stack, browser):
    f, _ = stack
    open_settings = f.settings.model_copy(update={"tenants": [], "admin_keys": "", "api_keys": ""})
    run_id = f.client.submit("calculator", {"question": "What is 2 + 3?"})
    assert f.client.wait(run_id, timeout=60).status == "succeeded"
    with served_gateway(open_settings) as url:
        page = browser.new_page()
        answer = page.goto(f"{url}/console/runs")
        assert answer.status == 200 and page.url == f"{url}/console/runs"
        page.wait_for_selector(f'tr[data-run="{run_id}"] .s-succeeded')
        assert page.locator("form.logout").count() == 0
