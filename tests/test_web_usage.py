"""The task page's Usage section, in headless Chromium against a real server: the totals line,
the live CPU and memory charts of a running task, a parent's subtree line, and a task that
never ran (no charts, no script error: the `page` fixture fails on any)."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import Page, expect

from velda_cli import Velda

pytestmark = pytest.mark.browser

UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def size(text: str) -> float:
    """'110.3 MB' -> bytes, read the way the page writes sizes (1024-based)."""
    match = re.fullmatch(r"([\d.]+) (B|KB|MB|GB)", text.strip())
    assert match, f"not a size: {text!r}"
    return float(match.group(1)) * UNITS[match.group(2)]


def points(page: Page, metric: str) -> int:
    chart = page.locator(f"#usage svg.usage-chart[data-metric={metric}]")
    value = chart.get_attribute("data-points") or "0"
    line = chart.locator("polyline").get_attribute("points") or ""
    assert len(line.split()) == min(int(value), 600)
    return int(value)


def test_a_running_task_charts_its_cpu_and_memory(signed_in: Page, velda: Velda, url: str) -> None:
    page = signed_in
    go = velda.cwd / "go"
    # ~100 MB written to (so it is resident), then a CPU spun for at least 4 s and until told
    script = (
        "import os, time\n"
        "block = b'x' * (100 << 20)\n"
        "t = time.time()\n"
        f"while time.time() - t < 4 or not os.path.exists({str(go)!r}): pass\n"
    )
    task = velda.vbatch("-q", "-n", "spin", "python3", "-c", script)
    page.goto(f"{url}/tasks/{task}")
    expect(page.locator("#task-status .badge")).to_have_attribute("data-status", "RUNNING")

    cpu = page.locator("#usage svg.usage-chart[data-metric=cpu]")
    memory = page.locator("#usage svg.usage-chart[data-metric=memory]")
    expect(cpu).to_have_attribute("role", "img")
    expect(cpu).to_have_attribute("aria-label", "CPU % over time")
    expect(memory).to_have_attribute("aria-label", "Memory over time")
    # samples every second, charts read every 2 s: two CPU points need three samples
    expect(cpu).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"), timeout=15_000)
    expect(memory).to_have_attribute("data-points", re.compile(r"^([2-9]|\d\d+)$"))
    assert points(page, "cpu") >= 2 and points(page, "memory") >= 2
    expect(cpu.locator(".axis-max")).to_have_text(re.compile(r"^\d+%$"))
    expect(memory.locator(".axis-max")).to_have_text(re.compile(r"^[\d.]+ (KB|MB|GB)$"))
    assert size(memory.locator(".axis-max").text_content() or "") >= 100 * 1024**2
    totals = page.locator("#usage-totals")
    expect(totals).to_contain_text("now, peak")
    expect(totals).to_contain_text("of a CPU now")

    go.touch()
    expect(page.locator("#task-status .badge")).to_have_attribute(
        "data-status", "SUCCESS", timeout=30_000)
    expect(totals).to_contain_text("over its run", timeout=10_000)
    text = totals.inner_text()
    cpu_s = re.search(r"CPU ([\d.]+) s \(user ([\d.]+) s, system ([\d.]+) s\)", text)
    peak = re.search(r"memory peak ([\d.]+ (?:B|KB|MB|GB))", text)
    assert cpu_s and peak, text
    assert float(cpu_s.group(1)) >= 2, text
    assert size(peak.group(1)) >= 100 * 1024**2, text
    assert "now" not in text, text  # memory now is gone once the task ended
    expect(page.locator("#usage-subtree")).to_be_hidden()
    final = velda.get(task)["usage"]["samples"]
    assert final >= 4
    # the charts' next read (within 2 s of the end) is their last, and has every sample
    expect(memory).to_have_attribute("data-points", str(final))

    page.reload()  # a finished task: its charts are read once, and drawn
    expect(memory).to_have_attribute("data-points", str(final))
    expect(page.locator("#usage-totals")).to_have_text(text)


def test_a_parent_shows_what_its_subtree_used(signed_in: Page, velda: Velda, url: str) -> None:
    page = signed_in
    parent = velda.vbatch("-q", "-n", "parent", "sh", "-c",
                          "vbatch -q -n one sleep 0.5; vbatch -q -n two sleep 0.5")
    assert velda.wait(parent)["status"] == "SUCCESS"
    children = velda.children(parent)
    assert sorted(c["name"] for c in children) == ["one", "two"]
    page.goto(f"{url}/tasks/{parent}")
    expect(page.locator("#task-status .badge")).to_have_attribute("data-status", "SUCCESS")
    line = page.locator("#usage-subtree")
    expect(line).to_have_text(re.compile(
        r"^Subtree: CPU [\d.]+ s in 2 attempts, largest memory peak [\d.]+ (B|KB|MB|GB)$"))
    expect(page.locator("#usage-totals")).to_contain_text("memory peak")  # its own sh

    child = children[0]["id"]
    page.goto(f"{url}/tasks/{child}")
    expect(page.locator("#usage-totals")).to_contain_text("memory peak")
    expect(page.locator("#usage-subtree")).to_be_hidden()


def test_a_task_that_never_ran_shows_no_usage(signed_in: Page, velda: Velda, url: str) -> None:
    page = signed_in
    velda.vbatch("-q", "-n", "breaks", "false")
    never = velda.vbatch("-q", "-n", "never", "--after-success", "breaks", "echo", "hi")
    velda.wait(never)
    page.goto(f"{url}/tasks/{never}")
    expect(page.locator("#task-status .badge")).to_have_attribute(
        "data-status", "FAILED_UPSTREAM")
    expect(page.locator("#details")).to_contain_text("echo hi")
    expect(page.locator("#usage")).to_be_hidden()
    expect(page.locator("#usage svg.usage-chart")).to_have_count(0)

    # one that waits: still nothing, and nothing read for it while it waits
    holder = velda.vbatch("-q", "-n", "holder", "sleep", "60")
    waits = velda.vbatch("-q", "-n", "waits", "--after-success", "holder", "echo", "hi")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{url}/tasks/{waits}")
    expect(page.locator("#task-waiting")).to_be_visible()
    page.wait_for_timeout(1500)
    expect(page.locator("#usage")).to_be_hidden()
    expect(page.locator("#usage svg.usage-chart")).to_have_count(0)
    assert not [u for u in requests if "/usage" in u], requests
    velda.run("velda", "task", "cancel", holder, check=True)
