"""Nested pipelines on a 2-CPU machine: a task blocked following its subtree releases its CPUs
to everyone and takes them back after; every waiting task says why it waits."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pipelines import make_data
from velda.server.blocked import Blocked
from velda_cli import Velda

TWO_CPUS = """
[local]
cpus = 2

[pools.gpu-1]   # as the example's velda.toml: a CPU slot stands in for the GPU
engine = "local"
cpus = 1
"""

# The blog's pipelines with the blog's pool sizes (cpu-16, cpu-8, cpu-4 and gpu-1), each a
# variant of a script of examples/ml-pipeline; on 2 CPUs every cpu-N runs alone on both.
SCRIPTS = {
    "linear.sh": """
vbatch -P cpu-16 --name process python process_data.py
vbatch -P gpu-1 --name train --after-success process python train_model.py
vbatch -P cpu-4 --name eval --after-success train python evaluate_model.py
""",
    "fanout.sh": """
vbatch bash -c "ls data/*.csv | xargs -I {} vbatch --name {} -P cpu-8 python process_file.py {}"
""",
    "fanout_chunked.sh": """
vbatch bash -c "ls data/*.csv | xargs -L 2 vbatch -P cpu-4 python process_file.py"
""",
    "process_all.sh": """
ls data/*.csv | xargs -I {} vrun -P cpu-8 python process_file.py {}
""",
    "pipeline.sh": """
vbatch -P cpu-16 --name preprocess ./process_all.sh
vbatch -P gpu-1 --name train --after-success preprocess python train_model.py
vbatch -P cpu-4 --name eval --after-success train python evaluate_model.py
""",
    "recursive.sh": """
vbatch bash -c "ls *.csv | xargs -I {} vbatch --name {} ./inference_and_eval.sh {}"
""",
    "inference_and_eval.sh": """
DATA_FILE=$1
vrun -P gpu-1 --name inference ./run_inference.py "$DATA_FILE"
vrun -P cpu-4 --after-success inference ./evaluate_inference.py "$DATA_FILE"
""",
}


@pytest.fixture
def blog(velda: Velda, example: Path) -> Path:
    """The example pipelines with the blog's pool sizes, on a 2-CPU budget."""
    velda.configure(TWO_CPUS)
    for name, body in SCRIPTS.items():
        path = example / name
        path.write_text("#!/bin/bash\n" + body.lstrip())
        path.chmod(0o755)
    make_data(velda, 4)
    return example


def gate(velda: Velda, name: str) -> str:
    """A command that waits until `open_gate(velda, name)`."""
    path = velda.cwd / name
    return f"while [ ! -e {path} ]; do sleep 0.05; done"


def open_gate(velda: Velda, name: str) -> None:
    (velda.cwd / name).touch()


# ---- which tasks are blocked, in memory ----------------------------------------------------


def test_blocked_from_submit_through_the_follow_stream_to_its_end() -> None:
    import asyncio

    changes: list[tuple[int, bool]] = []
    blocked = Blocked(lambda task, on: changes.append((task, on)))
    blocked.submitted(child_id=11, parent_id=10)  # vrun submitted, not yet following
    assert 10 in blocked and changes == [(10, True)]

    async def stream() -> AsyncIterator[bytes]:
        yield b"frame"

    async def follow() -> None:
        async for _ in blocked.following(10, 11, stream()):
            assert 10 in blocked  # the stream stands for the submit: no gap, no change
        assert 10 not in blocked

    asyncio.run(follow())
    assert changes == [(10, True), (10, False)]
    blocked.ended(11)  # the child's end after its follower left changes nothing
    assert changes == [(10, True), (10, False)]


def test_a_child_that_ends_unfollowed_unblocks_its_parent() -> None:
    changes: list[tuple[int, bool]] = []
    blocked = Blocked(lambda task, on: changes.append((task, on)))
    blocked.submitted(11, 10)
    blocked.submitted(12, 10)
    blocked.ended(11)
    assert 10 in blocked
    blocked.ended(12)
    assert 10 not in blocked and changes == [(10, True), (10, False)]


# ---- end to end on two CPUs ----------------------------------------------------------------


def test_sibling_orchestrators_blocked_in_vrun_do_not_deadlock(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n")
    parent = velda.vbatch("bash", "-c", "for i in 1 2; do vbatch vrun -P cpu-2 echo hi $i; done")
    assert velda.wait(parent, timeout=120)["status"] == "SUCCESS"
    shells = velda.children(parent)
    assert len(shells) == 2 and all(s["status"] == "SUCCESS" for s in shells)
    outputs = sorted(velda.log(velda.children(s["id"])[0]["id"]).stdout for s in shells)
    assert outputs == ["hi 1\n", "hi 2\n"]


def test_blog_linear_fanout_and_chunked_finish_on_two_cpus(velda: Velda, blog: Path) -> None:
    ids = velda.run("./linear.sh", check=True).stdout.split()
    assert [velda.wait(i, timeout=120)["status"] for i in ids] == ["SUCCESS"] * 3
    for script, children in (("./fanout.sh", 4), ("./fanout_chunked.sh", 2)):
        parent = velda.run(script, check=True).stdout.strip()
        assert velda.wait(parent, timeout=120)["status"] == "SUCCESS", script
        assert len(velda.children(parent)) == children


def test_blog_pipeline_then_recursive_fanout_finish_on_two_cpus(
    velda: Velda, blog: Path
) -> None:
    _, _, eval_id = velda.run("./pipeline.sh", check=True).stdout.split()
    assert velda.wait(eval_id, timeout=180)["status"] == "SUCCESS"
    for csv in (blog / "data").iterdir():  # the blog runs recursive.sh next to its CSVs
        (blog / csv.name).write_bytes(csv.read_bytes())
    root = velda.run("./recursive.sh", check=True).stdout.strip()
    assert velda.wait(root, timeout=180)["status"] == "SUCCESS"
    files = velda.children(root)
    assert len(files) == 4
    for child in files:
        steps = velda.children(child["id"])
        assert [(s["pool"], s["status"]) for s in steps] == [
            ("gpu-1", "SUCCESS"), ("cpu-4", "SUCCESS")
        ]
    assert len(list((blog / "eval").iterdir())) == 4


def test_three_levels_vrun_in_vrun_in_vbatch_follow(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n")
    def nested(name: str) -> str:
        return f"vbatch -f -q -P cpu-2 bash -c \"vrun -P cpu-2 vrun -P cpu-4 echo deep {name}\""

    # two of them at once, so that each level's siblings compete for the same two CPUs
    script = f"{nested('one')} > one.out & a=$!; {nested('two')} > two.out && wait $a"
    velda.sh(script, check=True, timeout=180)
    for name in ("one", "two"):
        lines = (velda.cwd / f"{name}.out").read_text().splitlines()
        assert lines[-1] == f"deep {name}"


@pytest.mark.parametrize("follow", ["velda task watch", "velda task log -f"])
def test_watching_or_following_an_own_child_releases_the_cpus(velda: Velda, follow: str) -> None:
    velda.configure("[local]\ncpus = 2\n")
    parent = velda.vbatch("-P", "cpu-2", "bash", "-c",
                          f"child=$(vbatch -q -P cpu-2 echo watched) && {follow} $child")
    assert velda.wait(parent, timeout=120)["status"] == "SUCCESS"
    assert velda.log(velda.children(parent)[0]["id"]).stdout == "watched\n"


def test_a_task_takes_its_cpus_back_when_it_stops_waiting(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n")
    parent = velda.vbatch("-P", "cpu-2", "bash", "-c", f"vrun echo hi; {gate(velda, 'go')}")
    while "hi" not in velda.log(parent).stdout:  # its vrun has ended: it runs on again
        time.sleep(0.05)
    later = velda.vbatch("echo", "later")
    waiting = velda.get(later)["waiting_for"]
    assert waiting["reason"] == "capacity" and waiting["held_by"] == [parent]
    open_gate(velda, "go")
    assert velda.wait(later)["status"] == "SUCCESS"


def test_blocked_state_comes_back_after_a_server_restart(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n")
    parent = velda.vbatch(
        "-P", "cpu-2", "bash", "-c", f"vrun -P cpu-2 bash -c '{gate(velda, 'go')}'; "
        f"{gate(velda, 'done')}"
    )
    child = _running_child(velda, parent)
    velda.kill_server()
    late = velda.vbatch("echo", "late")  # starts a new server, which adopts both
    waiting = velda.get(late)["waiting_for"]
    assert waiting["held_by"] == [child], waiting  # the parent still waits: not a holder
    open_gate(velda, "go")
    open_gate(velda, "done")
    assert velda.wait(late)["status"] == "SUCCESS"
    assert velda.wait(parent)["status"] == "SUCCESS"


def _running_child(velda: Velda, parent: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = velda.children(parent)
        if kids and kids[0]["status"] == "RUNNING":
            return str(kids[0]["id"])
        time.sleep(0.1)
    raise AssertionError(f"no running child of {parent}")


def test_waiting_for_dependencies_and_capacity_held_by_named_tasks(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n")
    first = velda.vbatch("bash", "-c", gate(velda, "go"))
    second = velda.vbatch("bash", "-c", gate(velda, "go"))
    after = velda.vbatch("--after-success", f"{first},{second}", "echo", "after")
    big = velda.vbatch("-P", "cpu-2", "echo", "big")
    for t in (first, second):
        velda.wait(t, until={"RUNNING"})
    assert velda.get(after)["waiting_for"] == {
        "reason": "dependencies", "tasks": [first, second],
        "message": f"waits for tasks {first}, {second} to end",
    }
    assert velda.get(big)["waiting_for"] == {
        "reason": "capacity", "needs": "2 CPUs", "free": "0 CPUs", "held_by": [first, second],
        "message": f"needs 2 CPUs; 0 CPUs free, held by tasks {first}, {second}",
    }
    listed = {t["id"]: t for t in _listed(velda)}
    assert listed[big]["waiting_for"]["reason"] == "capacity"
    assert listed[first]["waiting_for"] is None
    line = velda.run("velda", "task", "get", big, check=True).stdout.splitlines()[-1]
    assert line == f"waiting: needs 2 CPUs; 0 CPUs free, held by tasks {first}, {second}"
    watch = subprocess.Popen(
        ["velda", "task", "watch", big], env=velda.env, cwd=velda.cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    _wait_for_line(watch, f"task {big}: waiting: needs 2 CPUs")
    open_gate(velda, "go")
    _, err = watch.communicate(timeout=60)
    assert watch.returncode == 0 and f"task {big}: SUCCESS" in err
    assert velda.wait(after)["waiting_for"] is None


def _listed(velda: Velda) -> list[dict[str, Any]]:
    out = velda.run("velda", "task", "list", "-o", "json", check=True).stdout
    return json.loads(out)["tasks"]  # type: ignore[no-any-return]


def _wait_for_line(proc: subprocess.Popen[str], start: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(start):
            return
    raise AssertionError(f"no line starting {start!r}")


def test_waiting_for_a_pool_limit(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n\n[pools.one]\nengine = \"local\"\ncapacity = 1\n")
    holder = velda.vbatch("-P", "one", "bash", "-c", gate(velda, "go"))
    velda.wait(holder, until={"RUNNING"})
    second = velda.vbatch("-P", "one", "echo", "second")
    assert velda.get(second)["waiting_for"] == {
        "reason": "pool_capacity", "pool": "one", "limit": 1, "held_by": [holder],
        "message": f"pool one runs at most 1 task at once: held by task {holder}",
    }
    open_gate(velda, "go")
    assert velda.wait(second)["status"] == "SUCCESS"


def test_waiting_for_a_gang_and_for_a_parent(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\n")
    holder = velda.vbatch("bash", "-c", gate(velda, "go"))
    velda.wait(holder, until={"RUNNING"})
    gang = velda.vbatch("-N", "2", "--gang", "echo", "shard")
    later = velda.vbatch("-N", "2", "--after-success", holder, "echo", "later")
    shard = velda.get(f"{gang}/0")["waiting_for"]
    assert shard == {
        "reason": "gang", "shards": 2, "needs": "2 CPUs", "free": "1 CPU", "held_by": [holder],
        "message": f"its gang of 2 shards, started together, needs 2 CPUs; 1 CPU free, "
                   f"held by task {holder}",
    }
    assert velda.get(f"{later}/1")["waiting_for"] == {
        "reason": "parent", "task": later,
        "message": f"its parent {later} waits for its own dependencies",
    }
    open_gate(velda, "go")
    assert velda.wait(gang)["status"] == "SUCCESS" and velda.wait(later)["status"] == "SUCCESS"


def test_a_task_whose_gpu_its_blocked_parent_holds_can_never_start(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 2\ngpus = 1\n")
    parent = velda.vbatch("-P", "gpu-1", "vrun", "-P", "gpu-1", "echo", "never")
    child = _queued_child(velda, parent)
    waiting = velda.get(child)["waiting_for"]
    assert waiting["never"] is True and waiting["held_by"] == [parent]
    assert waiting["message"] == (
        f"can never start: the GPUs it needs are held by task {parent}, waiting for it"
    )
    page = velda.run("velda", "task", "get", child, check=True).stdout
    assert "waiting: can never start" in page
    velda.run("velda", "task", "cancel", parent, check=True)
    assert velda.wait(parent)["status"] == "CANCELLED"


def _queued_child(velda: Velda, parent: str) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        kids = velda.children(parent)
        if kids and kids[0]["status"] == "QUEUED" and kids[0]["waiting_for"].get("never"):
            return str(kids[0]["id"])
        time.sleep(0.1)
    raise AssertionError(f"no child of {parent} waits for ever")


# ---- the task page ---------------------------------------------------------------------------


@pytest.mark.browser
def test_the_task_page_says_why_a_task_waits(page: Any, velda: Velda) -> None:
    from playwright.sync_api import expect

    velda.configure("[local]\ncpus = 2\n")
    holder = velda.vbatch("-P", "cpu-2", "bash", "-c", gate(velda, "go"))
    velda.wait(holder, until={"RUNNING"})
    queued = velda.vbatch("echo", "queued")
    status = json.loads(velda.run("velda", "server", "status", "-o", "json", check=True).stdout)
    page.goto(velda.run("velda", "ui", "--print", check=True).stdout.strip())
    page.goto(f"{status['url']}/tasks/{queued}")
    line = page.locator("#task-waiting")
    expect(line).to_have_text(f"Waiting: needs 1 CPU; 0 CPUs free, held by task {holder}")
    open_gate(velda, "go")
    expect(page.locator("#task-status .badge")).to_have_attribute("data-status", "SUCCESS")
    expect(line).to_be_hidden()
