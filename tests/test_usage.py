"""What each attempt used (server/usage.py): CPU time and %, memory now and at its peak, per
attempt and for a parent's subtree, through `velda task get`, `-o json`, `-o wide` and
`velda task top`, and kept across a kill -9 of the server. Real tasks on a real server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from hog import MB, hog_command, wait_for
from velda.server import gpu_usage
from velda_cli import Velda

Hog = Callable[[int, float], list[str]]


@pytest.fixture
def hog(velda: Velda) -> Hog:
    return lambda megabytes, seconds: hog_command(velda, megabytes, seconds)


def test_cpu_time_and_peak_memory_of_a_task(velda: Velda, hog: Hog) -> None:
    task_id = velda.vbatch(*hog(200, 5))
    running = wait_for(velda, task_id, samples=3)  # one a second, the first after one
    assert running["final"] is False
    assert int(str(running["memory_bytes"])) >= 200 * MB
    assert float(str(running["cpu_percent"])) > 50  # one CPU spinning
    task = velda.wait(task_id)
    assert task["status"] == "SUCCESS"
    spun = float(velda.log(task_id).stdout)
    done = task["usage"]
    assert done["final"] is True and done["memory_bytes"] is None
    assert done["peak_memory_bytes"] >= 200 * MB
    assert spun - 0.01 <= done["cpu_s"] <= spun + 2  # what it spun, plus start-up and the touch
    assert done["cpu_s"] == pytest.approx(done["cpu_user_s"] + done["cpu_system_s"], abs=0.01)
    assert 50 < done["cpu_percent"] <= 110
    text = velda.run("velda", "task", "get", task_id, check=True).stdout
    assert f"usage: cpu {done['cpu_s']:.2f} s" in text and "memory peak 2" in text, text


def test_a_short_task_gets_exact_cpu_totals(velda: Velda) -> None:
    task = velda.wait(velda.vbatch("true"))
    usage = task["usage"]
    assert usage["final"] is True
    assert 0 <= usage["cpu_s"] < 1
    # it ended before its first sample: no memory figure rather than a guess
    assert (usage["samples"] == 0) == (usage["peak_memory_bytes"] is None)


def test_a_task_started_without_the_wrapper_gets_exact_cpu_totals_from_the_store(
    velda: Velda, hog: Hog
) -> None:
    # the server spawns it itself: no status file holds its totals, its zombie gave them
    task = velda.wait(velda.vbatch(*hog(1, 0.4)))
    spun = float(velda.log(task["id"]).stdout)
    assert spun - 0.01 <= task["usage"]["cpu_s"] <= spun + 1, task["usage"]
    assert not (velda.home / "logs" / f"{task['id']}.1" / "status").exists()


def test_wide_listing_and_top_show_what_running_tasks_use(velda: Velda, hog: Hog) -> None:
    busy = velda.vbatch("--name", "busy", *hog(50, 30))
    idle = velda.vbatch("--name", "idle", "sleep", "30")
    wait_for(velda, busy, samples=2)
    wait_for(velda, idle, samples=2)
    top = velda.run("velda", "task", "top", "--once", check=True).stdout.splitlines()
    assert top[0].endswith("2 running"), top
    header, first, second = top[1].split(), top[2].split(), top[3].split()
    assert header[:4] == ["ID", "NAME", "POOL", "CPU%"]
    assert (first[1], second[1]) == ("busy", "idle")  # busiest first
    assert int(first[3]) > 50 and int(second[3]) < 10
    wide = velda.run("velda", "task", "list", "-o", "wide", check=True).stdout.splitlines()
    columns = wide[0].split()
    assert "CPU" in columns and "MEMORY" in columns
    busy_row = next(line for line in wide if line.split()[1] == "busy")
    assert " MB" in busy_row and "%" in busy_row
    for task_id in (busy, idle):
        velda.run("velda", "task", "cancel", task_id, check=True)
    assert velda.wait(busy)["usage"]["final"] is True
    assert "no task is running" in velda.run("velda", "task", "top", "--once").stdout


def test_each_attempt_and_a_parents_subtree(velda: Velda, hog: Hog, tmp_path: Path) -> None:
    marker = tmp_path / "first-attempt-done"
    spin = " ".join(hog(1, 1))
    script = f"{spin} && [ -e {marker} ] && exit 0; touch {marker}; exit 1"
    retried = velda.wait(velda.vbatch("--retries", "1", "sh", "-c", script))
    assert retried["status"] == "SUCCESS" and retried["attempt"] == 2
    attempts = velda.get(retried["id"])["attempts"]
    assert [a["usage"]["final"] for a in attempts] == [True, True]
    assert all(a["usage"]["cpu_s"] >= 0.8 for a in attempts)
    parent = velda.vbatch("sh", "-c", " ; ".join(
        [f"vbatch --name c{i} {' '.join(hog(20, 1))}" for i in range(2)]))
    assert velda.wait(parent)["status"] == "SUCCESS"
    subtree = velda.get(parent)["subtree_usage"]
    assert subtree["attempts"] == 2
    assert subtree["cpu_s"] >= 1.6 and subtree["peak_memory_bytes"] >= 20 * MB
    text = velda.run("velda", "task", "get", parent, check=True).stdout
    assert "subtree: cpu" in text and "in 2 attempt(s)" in text


def test_usage_survives_a_killed_server(velda: Velda, hog: Hog) -> None:
    task_id = velda.vbatch(*hog(120, 4))
    wait_for(velda, task_id, samples=2)
    velda.kill_server()
    task = velda.wait(task_id, timeout=60)  # a new server adopts it and samples on
    assert task["status"] == "SUCCESS"
    spun = float(velda.log(task_id).stdout)
    assert task["usage"]["peak_memory_bytes"] >= 120 * MB  # seen before the kill
    assert spun - 0.01 <= task["usage"]["cpu_s"] <= spun + 2  # exact, from the wrapper


def test_gpu_figures_come_from_nvml(velda: Velda) -> None:
    if not gpu_usage.available():
        pytest.skip(f"no GPU figures here: {gpu_usage.why_unavailable()}")
    velda.configure("[pools.gpu]\ngpus = 1\n")
    task_id = velda.vbatch("-P", "gpu", "sleep", "8")
    found = wait_for(velda, task_id, samples=2)  # one a second, the first after one
    gpus = found["gpus"]
    assert isinstance(gpus, list) and [g["index"] for g in gpus] == [0]
    assert gpus[0]["memory_total_bytes"] > 0
