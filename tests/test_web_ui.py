"""The web UI: its pages and login in-process, then the real thing in headless Chromium.

The browser tests drive the real CLI against a real server (the `server` fixture) and look at
the result in the page: a pipeline's progress, a task's live log, cancel and retry, paging.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, cast

import pytest
from playwright.sync_api import Locator, Page, expect
from starlette.applications import Starlette
from starlette.testclient import TestClient

from velda.server import web
from velda.server.auth import Auth
from velda_cli import Velda

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
TOKEN = "server-token"


# ---- pages and login, in-process -------------------------------------------------------------


@pytest.fixture
def auth() -> Auth:
    return Auth(TOKEN)


@pytest.fixture
def client(auth: Auth) -> TestClient:
    app = Starlette(routes=web.routes(cast(Any, None), auth))
    return TestClient(app, base_url="http://127.0.0.1", follow_redirects=False)


def test_a_page_without_a_session_redirects_to_login(client: TestClient) -> None:
    response = client.get("/tasks/7?x=1")
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Ftasks%2F7%3Fx%3D1"


def test_a_login_code_signs_in_once(client: TestClient, auth: Auth) -> None:
    code = auth.new_login_code()
    response = client.get(f"/login?code={code}&next=/tasks/3")
    assert response.status_code == 303
    assert response.headers["location"] == "/tasks/3"
    cookies = {c.split("=", 1)[0]: c for c in response.headers.get_list("set-cookie")}
    assert "HttpOnly" in cookies["velda_session"]
    assert "SameSite=strict" in cookies["velda_session"]
    assert "HttpOnly" not in cookies["velda_csrf"]  # app.js echoes it in X-Velda-CSRF
    assert client.get("/tasks/3").status_code == 200

    client.cookies.clear()
    again = client.get(f"/login?code={code}")
    assert again.status_code == 200
    assert "not valid or was already used" in again.text


def test_the_login_form_takes_only_the_server_token(client: TestClient, auth: Auth) -> None:
    for token in ("wrong", auth.task_token(1)):
        response = client.post("/login", data={"token": token, "next": "/pools"})
        assert response.status_code == 401
        assert "velda_session" not in response.cookies
    response = client.post("/login", data={"token": TOKEN, "next": "/pools"})
    assert response.status_code == 303
    assert response.headers["location"] == "/pools"
    assert client.get("/pools").status_code == 200


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil", ""])
def test_login_goes_back_only_to_a_local_page(client: TestClient, auth: Auth, target: str) -> None:
    response = client.get(f"/login?code={auth.new_login_code()}&next={target}")
    assert response.headers["location"] == "/"


def test_pages_are_static_shells_with_a_strict_policy(client: TestClient) -> None:
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    page = client.get("/")
    assert page.status_code == 200
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self'
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "<script" in page.text and "<script>" not in page.text  # no inline script
    asset = re.search(r'src="(/static/app\.js\?v=\w+)"', page.text)
    assert asset and client.get(asset.group(1)).status_code == 200
    assert 'data-page="task"' in client.get("/tasks/12345").text


# ---- in the browser, against a real server ---------------------------------------------------


def badge(page: Page) -> Locator:
    return page.locator("#task-status .badge")


def accept_next_dialog(page: Page) -> None:
    page.once("dialog", lambda dialog: dialog.accept())


@pytest.mark.browser
def test_without_a_token_the_api_refuses_and_pages_ask_to_sign_in(
    page: Page, velda: Velda, url: str
) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "/api/v1/tasks")
    assert refused.value.code == 401

    page.goto(url + "/pools")
    expect(page).to_have_url(re.compile(r"/login\?next=%2Fpools$"))
    page.fill("#token", "not-the-token")
    page.click("button[type=submit]")
    expect(page.locator(".login .error")).to_have_text("That is not the server token.")

    page.fill("#token", (velda.home / "token").read_text().strip())
    page.click("button[type=submit]")
    expect(page).to_have_url(url + "/pools")
    expect(page.locator("#pools tr[data-pool=shell]")).to_contain_text("local")


@pytest.mark.browser
def test_a_running_task_logs_live_and_is_cancelled_from_its_page(
    signed_in: Page, velda: Velda, url: str
) -> None:
    page = signed_in
    go = velda.cwd / "go"
    script = (
        "import os, sys, time\n"
        "print('started', flush=True)\n"
        "print('warming up', file=sys.stderr, flush=True)\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "print('ping', flush=True)\n"
        "time.sleep(300)\n"
    )
    task = velda.vbatch("-q", "-n", "ticker", "python3", "-c", script)
    page.goto(f"{url}/tasks/{task}")
    expect(badge(page)).to_have_attribute("data-status", "RUNNING")
    log = page.locator("#log")
    expect(log).to_contain_text("started")
    expect(log).to_contain_text("warming up")

    go.touch()
    start = time.monotonic()
    log.locator("span", has_text="ping").wait_for()
    assert time.monotonic() - start < 1.5, "a printed line took more than 1.5 s to show"

    page.click("[data-view=stderr]")
    expect(log).to_have_text("warming up\n")
    page.click("[data-view=stdout]")
    expect(log).to_have_text("started\nping\n")
    raw = page.request.get(url + (page.locator("#raw-stdout").get_attribute("href") or ""))
    assert raw.text() == "started\nping\n"

    accept_next_dialog(page)
    page.click("#cancel")
    expect(badge(page)).to_have_attribute("data-status", "CANCELLED", timeout=15_000)
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#timing")).to_contain_text("Reasoncancelled")

    page.click("#retry")
    expect(page.locator("#task-error")).to_be_hidden()
    expect(page.locator("#timing")).to_contain_text("Attempt2 (retried by hand)")
    expect(badge(page)).to_have_attribute("data-status", "RUNNING")
    expect(page.locator("#attempt")).to_be_visible()
    accept_next_dialog(page)
    page.click("#cancel")
    expect(badge(page)).to_have_attribute("data-status", "CANCELLED", timeout=15_000)


@pytest.mark.browser
def test_a_large_fan_out_is_browsed_page_by_page(signed_in: Page, velda: Velda, url: str) -> None:
    page = signed_in
    parent = velda.vbatch("-q", "-n", "shards", "-N", "120", "true")
    page.goto(f"{url}/tasks/{parent}")
    expect(badge(page)).to_have_attribute("data-status", "SUCCESS", timeout=60_000)
    rows = page.locator("#children tbody tr")
    pager = page.locator("#children .pager")
    expect(rows).to_have_count(50)
    expect(rows.first.locator(".c-name")).to_have_text("0true")
    pager.get_by_text("Next").click()
    expect(rows.first.locator(".c-name")).to_have_text("50true")
    pager.get_by_text("Next").click()
    expect(rows).to_have_count(20)
    expect(pager.get_by_text("Next")).to_be_disabled()
    pager.get_by_text("Previous").click()
    expect(rows).to_have_count(50)
    expect(rows.first.locator(".c-name")).to_have_text("50true")


@pytest.mark.browser
def test_the_list_filters_and_updates_without_a_reload(signed_in: Page, velda: Velda) -> None:
    page = signed_in
    good = velda.vbatch("-q", "-n", "good-one", "-l", "run=7", "true")
    bad = velda.vbatch("-q", "-n", "bad-one", "false")
    velda.vbatch("-q", "-n", "other", "true")
    rows = page.locator("#tasks tbody tr")
    expect(rows).to_have_count(3)  # they appeared by themselves

    page.fill("#tasks input[type=search]", "-one")
    expect(rows).to_have_count(2)
    page.select_option("#tasks select", label="Failed")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", bad)
    expect(page).to_have_url(re.compile(r"/\?q=-one&status=FAILURE%2CFAILED_UPSTREAM$"))

    page.select_option("#tasks select", label="All statuses")
    page.fill("#tasks input[type=search]", "")
    page.fill("#tasks input[aria-label=Label]", "run=7")
    page.press("#tasks input[aria-label=Label]", "Enter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", good)


@pytest.mark.browser
def test_a_pipeline_in_the_list_and_on_its_pages(signed_in: Page, velda: Velda, url: str) -> None:
    page = signed_in
    (velda.cwd / "fan.sh").write_text(
        "for i in $(seq 1 12); do\n"
        '  code=0; [ "$i" = 7 ] && code=1\n'
        '  vbatch -q -n "part-$i" -l stage=process python3 -c '
        "\"import sys,time; time.sleep(0.05 * $i); print('part $i done'); sys.exit($code)\"\n"
        "done\n"
    )
    velda.vbatch("-q", "-n", "lint", "-l", "team=ml", "true")
    parent = velda.vbatch("-q", "-n", "pipeline", "-l", "team=ml", "bash", "fan.sh")
    report = velda.vbatch("-q", "-n", "report", "--after-success", "pipeline", "echo", "hi")
    train = velda.vbatch("-q", "-n", "train", "-P", "cpu-1", "sleep", "60")

    row = page.locator(f"tr[data-id='{parent}']")
    expect(row.locator(".progress .count")).to_have_text("12/12 · 1 failed", timeout=30_000)
    expect(row.locator(".badge")).to_have_attribute("data-status", "FAILURE")
    expect(page.locator(f"tr[data-id='{report}'] .badge")).to_have_text("Failed upstream")
    expect(page.locator(f"tr[data-id='{train}'] .badge")).to_have_text("Running")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1280, "height": 480})
    page.screenshot(path=str(SCREENSHOTS / "task-list.png"), animations="disabled")
    page.set_viewport_size({"width": 1280, "height": 860})

    row.locator(".c-name a").click()
    expect(page).to_have_url(f"{url}/tasks/{parent}")
    expect(page.locator("#task-title")).to_have_text("pipeline")
    expect(page.locator("#details")).to_contain_text("bash fan.sh")
    expect(page.locator("#details")).to_contain_text("team=ml")
    expect(page.locator("#deps")).to_contain_text(f"{report} report")
    expect(page.locator("#children tbody tr")).to_have_count(12)
    expect(page.locator("#children-summary")).to_contain_text("11 succeeded, 1 failed")
    page.screenshot(path=str(SCREENSHOTS / "task-page.png"), full_page=True, animations="disabled")

    page.locator("#children tr", has_text="part-7").locator(".c-name a").click()
    expect(page.locator("#crumbs")).to_have_text(re.compile("Tasks.*pipeline.*part-7"))
    expect(page.locator("#timing")).to_contain_text("Exit code1")
    expect(page.locator("#log")).to_have_text("part 7 done\n")
    page.locator("#crumbs a", has_text="pipeline").click()
    expect(page).to_have_url(f"{url}/tasks/{parent}")
    velda.run("velda", "task", "cancel", train, check=True)
