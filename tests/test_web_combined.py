"""The task page in headless Chromium: the Combined view in the order the task wrote, what the
timing panel and attempts say, children counters with cancelled and skipped, and /pools."""

from __future__ import annotations

import pytest
from playwright.sync_api import Page, expect

from velda_cli import Velda

ALTERNATING = "for i in 1 2 3 4; do echo out$i; sleep 0.3; echo err$i >&2; sleep 0.3; done"
WRITTEN = "".join(f"out{i}\nerr{i}\n" for i in range(1, 5))


@pytest.mark.browser
def test_the_combined_view_shows_both_streams_in_written_order(
    signed_in: Page, velda: Velda, url: str
) -> None:
    page = signed_in
    task = velda.vbatch("-q", "sh", "-c", ALTERNATING)
    page.goto(f"{url}/tasks/{task}")  # while it runs: the page follows it
    log = page.locator("#log")
    expect(log).to_have_text(WRITTEN)
    expect(page.locator("#task-status .badge")).to_have_attribute("data-status", "SUCCESS")
    expect(log.locator("span.err").first).to_have_text("err1\n")  # stderr still marked

    page.reload()  # and the same once it has ended
    expect(log).to_have_text(WRITTEN)
    page.click("[data-view=stderr]")
    expect(log).to_have_text("err1\nerr2\nerr3\nerr4\n")
    page.click("[data-view=combined]")
    expect(log).to_have_text(WRITTEN)


@pytest.mark.browser
def test_a_parent_waiting_for_children_and_a_retry_by_hand_read_true(
    signed_in: Page, velda: Velda, url: str
) -> None:
    page = signed_in
    go = velda.cwd / "go"
    script = (f"vbatch -n ok true; vbatch -n skipped --after-fail ok true; "
              f"vbatch -n wait sh -c 'while [ ! -e {go} ]; do sleep 0.05; done; exit 1'")
    parent = velda.vbatch("-q", "-n", "p", "sh", "-c", script)
    velda.wait(parent, until={"RUNNING_SUBTASKS"})
    velda.wait("p/skipped")
    page.goto(f"{url}/tasks/{parent}")
    timing = page.locator("#timing")
    expect(timing).to_contain_text("Own command ended")
    expect(timing).to_contain_text("Waiting for")
    expect(timing).not_to_contain_text("Finished")
    expect(timing).not_to_contain_text("Resolved")
    expect(page.locator("#children-summary")).to_contain_text("1 skipped")

    go.touch()
    velda.wait(parent)
    velda.run("velda", "task", "retry", "p/wait", check=True)
    velda.wait("p/wait")
    child = velda.get("p/wait")
    page.goto(f"{url}/tasks/{child['id']}")
    expect(page.locator("#timing")).to_contain_text("Attempt2 (retried by hand)")
    expect(page.locator("#timing .attempts")).to_contain_text("attempt 2 (retried by hand)")
    expect(page.locator("#timing")).not_to_contain_text("of 1")


@pytest.mark.browser
def test_the_pools_page_shows_built_in_pools_and_the_machine(
    signed_in: Page, velda: Velda, url: str
) -> None:
    page = signed_in
    page.goto(f"{url}/pools")
    expect(page.locator("#pools tr[data-pool=shell]")).to_contain_text("built in")
    expect(page.locator("#machine-cpus")).to_contain_text("CPUs in use")
    expect(page.locator("#machine-gpus")).to_contain_text("GPUs in use")
