"""What a pool on a remote engine must do end to end, the same on Ray (test_ray_pools.py) and
on Slurm (test_slurm_pools.py): each check takes a `Velda` whose `cpu-1` pool runs on that
engine, and `shell` on this machine."""

from __future__ import annotations

import signal
import time

from velda_cli import Velda, wait_gone


def wait_for_output(velda: Velda, ref: str, text: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = velda.log(ref).stdout
        if text in out:
            return out
        assert time.monotonic() < deadline, f"no {text!r} from {ref} in {timeout:g} s: {out!r}"
        time.sleep(0.1)


def explain(velda: Velda, task_id: str) -> str:
    """A failed task and its children, for the assertion message."""
    lines = []
    for task in [velda.get(task_id), *velda.children(task_id)]:
        log = velda.run("velda", "task", "log", task["id"])
        lines.append(f"{task['id']} {task['status']} {task['reason']} {task['command']}\n"
                     f"  stdout: {log.stdout[-500:]!r}\n  stderr: {log.stderr[-1500:]!r}")
    return "\n".join(lines)


def exit_codes_and_signals_are_recorded(velda: Velda) -> None:
    failed = velda.run("vrun", "-P", "cpu-1", "--name", "three", "sh", "-c",
                       "echo out; echo err >&2; exit 3")
    assert (failed.returncode, failed.stdout, failed.stderr) == (3, "out\n", "err\n")
    task = velda.get("three")
    assert (task["status"], task["exit_code"], task["signal"]) == ("FAILURE", 3, None)
    killed = velda.run("vrun", "-P", "cpu-1", "--name", "killed", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + signal.SIGTERM
    task = velda.get("killed")
    assert (task["status"], task["signal"], task["reason"]) == ("FAILURE", 15, "signal")


def stdout_and_stderr_come_back_separately_and_exactly(velda: Velda) -> None:
    writer = ("import os\n"
              "for i in range(3000):\n"
              "    os.write(1, b'%05d out ' % i + b'x' * (i % 50) + b'\\n')\n"
              "    if i % 7 == 0: os.write(2, b'%05d err\\n' % i)\n")
    task_id = velda.vbatch("-P", "cpu-1", "python", "-c", writer)
    assert velda.wait(task_id)["status"] == "SUCCESS"
    out = "".join(f"{i:05d} out {'x' * (i % 50)}\n" for i in range(3000))
    err = "".join(f"{i:05d} err\n" for i in range(0, 3000, 7))
    assert velda.log(task_id, "--stdout").stdout == out
    assert velda.log(task_id, "--stderr").stderr == err


def cancel_kills_the_process_on_its_node(velda: Velda) -> None:
    task_id = velda.vbatch("-P", "cpu-1", "sh", "-c", "sleep 1000 & echo $$ $!; wait")
    pids = [int(p) for p in wait_for_output(velda, task_id, "\n").split()]
    started = time.monotonic()
    velda.run("velda", "task", "cancel", task_id, check=True)
    task = velda.wait(task_id, timeout=20)
    assert (task["status"], task["signal"], task["reason"]) == ("CANCELLED", 15, "cancelled")
    for pid in pids:
        wait_gone(pid)
    assert time.monotonic() - started < 10


# Submits a task and cancels it at once, in the same process (a millisecond apart): the
# cancel may come while the pool's engine is still taking the task (on Slurm, while sbatch
# runs).
SUBMIT_AND_CANCEL = """
import sys
from velda.client import Client
client = Client()
task = client.submit(command=["sh", "-c", sys.argv[2]], pool=sys.argv[1], cwd=sys.argv[3])
print(client.cancel(task["id"])["id"])
"""


def a_cancel_right_after_the_submit_stops_the_task(velda: Velda, pool: str) -> None:
    """A task cancelled right after its submit ends CANCELLED, and its command is stopped
    before it does what it would, however far its engine had got with it."""
    marker = velda.cwd / f"ran-{pool}"
    script = f"sleep 3; touch {marker}"
    task_id = velda.run("python", "-c", SUBMIT_AND_CANCEL, pool, script, str(velda.cwd),
                        check=True).stdout.strip()
    task = velda.wait(task_id, timeout=60)
    assert task["status"] == "CANCELLED", explain(velda, task_id)
    after = velda.vbatch("-P", pool, "true")  # the pool took what came before it
    assert velda.wait(after, timeout=60)["status"] == "SUCCESS", explain(velda, after)
    time.sleep(4)
    assert not marker.exists(), f"task {task_id} was cancelled, yet its command ran"


def vbatch_inside_a_task_makes_children(velda: Velda) -> None:
    """A task on the remote pool submits one child there and one to `shell`."""
    parent_id = velda.vbatch("-P", "cpu-1", "--name", "outer", "sh", "-c",
                             "vbatch -q -P cpu-1 --name remote echo remote &&"
                             " vbatch -q -P shell --name local echo local")
    parent = velda.wait(parent_id, timeout=60)
    assert parent["status"] == "SUCCESS", velda.log(parent_id).stderr
    children = {c["name"]: c for c in velda.children(parent_id)}
    assert set(children) == {"remote", "local"}
    assert all(c["parent_id"] == parent_id and c["status"] == "SUCCESS"
               for c in children.values())
    assert (children["remote"]["pool"], children["local"]["pool"]) == ("cpu-1", "shell")
    assert velda.log(f"{parent_id}/remote").stdout == "remote\n"
    assert velda.log(f"{parent_id}/local").stdout == "local\n"
    assert parent["children"]["succeeded"] == 2
