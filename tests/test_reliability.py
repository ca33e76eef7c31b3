"""Cancel, and the server dying under running tasks (SPEC §4.5, §10)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from velda_cli import Velda, alive


def test_cancel_stops_a_whole_subtree(velda: Velda) -> None:
    velda.configure("[local]\ncpus = 8\n")
    script = (
        "vbatch --name sleeper sleep 600 >/dev/null; "
        "vbatch --name waiter --after-success sleeper true >/dev/null; "
        "vbatch --name nested bash -c 'vbatch --name deep sleep 600 >/dev/null; sleep 600'"
    )
    root = velda.vbatch("--name", "root", "bash", "-c", script)
    velda.wait(root, until={"RUNNING_SUBTASKS"})
    deep = velda.wait(f"{root}/nested/deep", until={"RUNNING"})
    sleeper = velda.wait(f"{root}/sleeper", until={"RUNNING"})
    pids = [velda.task_pid(deep["id"]), velda.task_pid(sleeper["id"])]
    result = velda.run("velda", "task", "cancel", "root", check=True)
    assert result.stdout.startswith(f"task {root}: ")
    final = velda.wait(root, timeout=30)
    assert final["status"] == "CANCELLED"
    statuses = {c["name"]: c["status"] for c in velda.children(root)}
    assert statuses == {"sleeper": "CANCELLED", "waiter": "CANCELLED", "nested": "CANCELLED"}
    assert velda.get(f"{root}/nested/deep")["status"] == "CANCELLED"
    assert velda.get(f"{root}/waiter")["started_at"] is None
    assert velda.get(f"{root}/sleeper")["signal"] == signal.SIGTERM
    assert not any(alive(pid) for pid in pids)


def test_cancel_of_an_inner_task_leaves_its_siblings(velda: Velda) -> None:
    script = "vbatch --name a sleep 600 >/dev/null; vbatch --name b sleep 1 >/dev/null"
    root = velda.vbatch("bash", "-c", script)
    velda.wait(f"{root}/a", until={"RUNNING"})
    velda.run("velda", "task", "cancel", f"{root}/a", check=True)
    assert velda.wait(f"{root}/a")["status"] == "CANCELLED"
    assert velda.wait(f"{root}/b")["status"] == "SUCCESS"
    assert velda.wait(root)["status"] == "FAILURE"


def test_kill_9_of_the_server_loses_nothing(velda: Velda, tmp_path: Path) -> None:
    """Running tasks finish while the server is dead; their exit status and full logs are
    recorded by the next server; queued tasks start then; nothing runs twice."""
    gate = tmp_path / "gate"
    runs = tmp_path / "runs"
    runs.mkdir()
    script = (
        f'echo started >> {runs}/"$VELDA_TASK_NAME"; for i in $(seq 1 500); do echo "line $i"; '
        f'done; echo "to stderr" >&2; while [ ! -e {gate} ]; do sleep 0.02; done; '
        'echo "after the gate"; exit "${CODE:-0}"'
    )
    # cpu-2 tasks take the whole 2-CPU machine: one runs, the others queue
    ids = [
        velda.vbatch("-P", "cpu-2", "--name", f"t{i}", "-e", f"CODE={i}", "bash", "-c", script)
        for i in range(3)
    ]
    long_one = velda.vbatch("--name", "long", "bash", "-c", f"sleep 1; {script}")
    velda.wait(ids[0], until={"RUNNING"})
    velda.kill_server()
    gate.touch()  # let the running task end while no server is up
    time.sleep(1.5)
    assert velda.server_pid() is None or not alive(velda.server_pid() or 0)
    # the next command starts a new server, which finds everything again
    for i, task_id in enumerate(ids):
        task = velda.wait(task_id, timeout=60)
        assert (task["status"], task["exit_code"]) == (
            "SUCCESS" if i == 0 else "FAILURE", i
        )
        log = velda.log(task_id)
        assert log.stdout == "".join(f"line {n}\n" for n in range(1, 501)) + "after the gate\n"
        assert log.stderr == "to stderr\n"
        assert (runs / f"t{i}").read_text() == "started\n"
    assert velda.wait(long_one, timeout=60)["status"] == "SUCCESS"
    assert (runs / "long").read_text() == "started\n"


def test_kill_9_while_a_task_keeps_running_afterwards(velda: Velda, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    task_id = velda.vbatch(
        "bash", "-c", f"echo before; while [ ! -e {gate} ]; do sleep 0.02; done; echo after; exit 3"
    )
    velda.wait(task_id, until={"RUNNING"})
    velda.kill_server()
    assert velda.get(task_id)["status"] == "RUNNING"  # a new server adopted it
    gate.touch()
    task = velda.wait(task_id)
    assert (task["status"], task["exit_code"], task["attempt"]) == ("FAILURE", 3, 1)
    assert velda.log(task_id).stdout == "before\nafter\n"
    follow = velda.run("vrun", "--after", task_id, "echo", "chained", check=True)
    assert follow.stdout == "chained\n"


def test_concurrent_submitters_get_unique_ids_and_their_own_tasks(velda: Velda) -> None:
    velda.vbatch("true")  # start the server once
    script = 'for i in $(seq 1 25); do vbatch -q echo "$1-$i"; done'
    procs = [
        subprocess.Popen(["bash", "-c", script, "_", f"s{n}"], env=velda.env, cwd=velda.cwd,
                         stdout=subprocess.PIPE, text=True)
        for n in range(8)
    ]
    ids = {f"s{n}": p.communicate(timeout=300)[0].split() for n, p in enumerate(procs)}
    every = [i for batch in ids.values() for i in batch]
    assert len(every) == 200 and len(set(every)) == 200
    listed = velda.run("velda", "task", "list", "-a", "--max-results", "1000", "-o", "json",
                       check=True).stdout
    command_of = {t["id"]: t["command"] for t in json.loads(listed)["tasks"]}
    for submitter, batch in ids.items():
        assert [command_of[i] for i in batch] == [
            ["echo", f"{submitter}-{i}"] for i in range(1, 26)
        ]
