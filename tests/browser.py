"""Headless Chromium for the browser tests, as pytest fixtures (tests/conftest.py imports them).

Playwright drives Debian's Chromium (`apt-get install -y chromium`); it never downloads a
browser of its own. Tests that use these fixtures are skipped, saying why, only when that
Chromium is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from conftest import missing
from velda_cli import Velda

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("VELDA_CHROMIUM", "/usr/bin/chromium")
# Headless, and quiet on a machine with no network: without the background-networking flags
# Chromium keeps trying (and failing) to reach Google's services.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# One browser per test module, not per session: while Playwright's sync API is open it keeps
# an event loop running in the main thread, and any later test that runs an asyncio loop of
# its own (the in-memory runtime and engine tests) would fail with "another loop is running".
@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if shutil.which(CHROMIUM) is None:
        missing(f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies) whose uncaught script errors fail the test."""
    context = chromium.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(10_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"script errors in the page: {errors}"


@pytest.fixture
def url(velda: Velda) -> str:
    """The address of the velda fixture's server, started here."""
    velda.run("velda", "server", "start", check=True)
    status = velda.run("velda", "server", "status", "-o", "json", check=True).stdout
    return str(json.loads(status)["url"])


@pytest.fixture
def signed_in(page: Page, velda: Velda, url: str) -> Page:
    """`page`, logged in to that server through `velda ui`'s one-time link."""
    from playwright.sync_api import expect
    page.goto(velda.run("velda", "ui", "--print", check=True).stdout.strip())
    expect(page).to_have_url(url + "/")
    return page
