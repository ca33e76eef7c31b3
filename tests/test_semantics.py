"""Task semantics through the real commands (SPEC §4.1-§4.4, §4.7)."""

from __future__ import annotations

import os
from pathlib import Path

from velda_cli import Velda


def test_after_success_of_a_failure_is_failed_upstream_and_after_fail_runs(velda: Velda) -> None:
    velda.vbatch("--name", "step", "sh", "-c", "exit 4")
    downstream = velda.vbatch("--name", "next", "--after-success", "step", "true")
    later = velda.vbatch("--after-success", "next", "true")
    handler = velda.vbatch("--after-fail", "step", "sh", "-c", "echo handled")
    always = velda.vbatch("--after", "step", "true")
    assert velda.wait("step")["status"] == "FAILURE"
    assert velda.wait(downstream)["status"] == "FAILED_UPSTREAM"
    assert velda.wait(later)["status"] == "FAILED_UPSTREAM"  # transitively
    assert velda.wait(handler)["status"] == "SUCCESS"
    assert velda.log(handler).stdout == "handled\n"
    assert velda.wait(always)["status"] == "SUCCESS"
    assert velda.get(downstream)["started_at"] is None


def test_a_task_after_a_shard_that_never_ran_is_decided(velda: Velda) -> None:
    # the shards end FAILED_UPSTREAM with their parent, before they ever start: what waits
    # on one of them is decided then, not left PENDING
    velda.vbatch("--name", "gate", "sh", "-c", "sleep 1; exit 4")
    velda.vbatch("--name", "p", "-N", "3", "--after-success", "gate", "true")
    after_shard = velda.vbatch("--after-success", "p/1", "true")
    after_any = velda.vbatch("--after", "p/2", "true")
    assert velda.wait("p")["status"] == "FAILED_UPSTREAM"
    assert velda.wait(after_shard)["status"] == "FAILED_UPSTREAM"
    assert velda.wait(after_any)["status"] == "SUCCESS"


def test_after_fail_of_a_success_is_skipped(velda: Velda) -> None:
    velda.vbatch("--name", "ok", "true")
    skipped = velda.vbatch("--after-fail", "ok", "true")
    after_skip = velda.vbatch("--after-success", skipped, "true")
    assert velda.wait(skipped)["status"] == "SKIPPED"
    assert velda.wait(after_skip)["status"] == "SKIPPED"


def test_parent_fails_when_a_child_fails(velda: Velda) -> None:
    parent = velda.vbatch("bash", "-c", "vbatch true; vbatch sh -c 'exit 1'; vbatch true")
    task = velda.wait(parent)
    assert task["status"] == "FAILURE"
    assert task["exit_code"] == 0
    assert task["children"] == {
        "total": 3, "succeeded": 2, "failed": 1, "cancelled": 0, "skipped": 0, "running": 0,
        "queued": 0
    }


def test_parent_waits_in_running_subtasks(velda: Velda, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waiter = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    parent = velda.vbatch("bash", "-c", f"vbatch bash -c '{waiter}'")
    assert velda.wait(parent, until={"RUNNING_SUBTASKS"})["exit_code"] == 0
    assert velda.get(parent)["children"]["running"] == 1
    gate.touch()
    assert velda.wait(parent)["status"] == "SUCCESS"


def test_names_resolve_to_the_newest_task_in_scope(velda: Velda) -> None:
    first = velda.vbatch("--name", "process", "sh", "-c", "exit 1")
    velda.wait(first)
    second = velda.vbatch("--name", "process", "true")
    velda.wait(second)
    train = velda.vbatch("--after-success", "process", "true")
    assert velda.get(train)["depends_on"] == [{"id": second, "kind": "success"}]
    assert velda.wait(train)["status"] == "SUCCESS"
    assert velda.get("process")["id"] == second


def test_unknown_reference_is_an_error_at_submit(velda: Velda) -> None:
    result = velda.run("vbatch", "--after-success", "nope", "true")
    assert result.returncode == 2
    assert result.stderr.strip() == "vbatch: no task named 'nope' at the top level"
    assert result.stdout == ""
    listed = velda.run("velda", "task", "list", "-o", "json", check=True).stdout
    assert '"tasks": []' in listed


def test_children_scope_names_inside_their_parent(velda: Velda) -> None:
    velda.vbatch("--name", "inference", "true")  # a top-level one of the same name
    script = "vrun --name inference true && vrun --after-success inference true"
    parent = velda.vbatch("bash", "-c", script)
    assert velda.wait(parent)["status"] == "SUCCESS"
    inference, evaluation = velda.children(parent)
    assert evaluation["depends_on"] == [{"id": inference["id"], "kind": "success"}]


def test_task_sees_environment_working_directory_and_no_stdin(
    velda: Velda, tmp_path: Path
) -> None:
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    script = (
        'echo "$PWD|$VELDA_TASK_ID|$VELDA_TASK_NAME|$VELDA_POOL|$VELDA_ATTEMPT|$MY_VAR|'
        '$FROM_SUBMITTER|$OMP_NUM_THREADS|${CUDA_VISIBLE_DEVICES-unset}"; cat; echo "stdin done"'
    )
    task_id = velda.run(
        "vbatch", "-n", "envy", "-P", "cpu-2", "-C", str(workdir), "-e", "MY_VAR=hello",
        "sh", "-c", script, env={"FROM_SUBMITTER": "yes"}, check=True,
    ).stdout.strip()
    assert velda.wait(task_id)["status"] == "SUCCESS"
    out = velda.log(task_id).stdout
    assert out == f"{workdir}|{task_id}|envy|cpu-2|1|hello|yes|2|\nstdin done\n"
    token = velda.run("vrun", "sh", "-c", "echo $VELDA_TOKEN", check=True).stdout.strip()
    assert token.startswith("task.") and token != (velda.home / "token").read_text().strip()


def test_a_task_token_acts_only_in_its_subtree(velda: Velda) -> None:
    outsider = velda.vbatch("--name", "outsider", "true")
    velda.wait(outsider)
    script = f"velda task get {outsider}; echo rc=$?; velda task list -o id --header=false"
    parent = velda.vbatch("bash", "-c", f"vbatch --name mine true; {script}")
    velda.wait(parent)
    log = velda.log(parent)
    assert "rc=2" in log.stdout
    assert "outside this task's subtree" in log.stderr
    mine = velda.children(parent)[0]["id"]
    assert log.stdout.strip().endswith(mine)


def test_stdout_and_stderr_are_kept_apart_and_in_order(velda: Velda) -> None:
    script = "for i in $(seq 1 2000); do echo out$i; echo err$i >&2; done"
    task = velda.vbatch("bash", "-c", script)
    velda.wait(task)
    log = velda.log(task)
    assert log.stdout == "".join(f"out{i}\n" for i in range(1, 2001))
    assert log.stderr == "".join(f"err{i}\n" for i in range(1, 2001))
    only_err = velda.log(task, "--stderr", "--tail", "2")
    assert only_err.stdout == "" and only_err.stderr == "err1999\nerr2000\n"


def test_first_command_starts_the_server_with_private_state(velda: Velda) -> None:
    assert velda.server_pid() is None
    velda.vbatch("true")
    status = velda.run("velda", "server", "status", "-o", "json", check=True).stdout
    import json

    info = json.loads(status)
    assert info["pid"] == velda.server_pid()
    assert info["home"] == str(velda.home)
    assert info["url"].startswith("http://127.0.0.1:")
    assert set(info) >= {"url", "pid", "version", "uptime_s", "home"}
    assert (velda.home / "token").stat().st_mode & 0o777 == 0o600
    assert (velda.home / "velda.db").exists()
    mode = os.stat(velda.home).st_mode & 0o777
    assert mode & 0o077 == 0


def test_log_follow_waits_for_a_queued_task_and_returns_when_it_ends(
    velda: Velda, tmp_path: Path
) -> None:
    import subprocess

    gate = tmp_path / "gate"
    first = velda.vbatch("--name", "first", "bash", "-c",
                         f"while [ ! -e {gate} ]; do sleep 0.02; done")
    second = velda.vbatch("--after-success", first, "sh", "-c", "echo one; echo two >&2")
    follower = subprocess.Popen(
        ["velda", "task", "log", "-f", second], env=velda.env, cwd=velda.cwd,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert velda.get(second)["status"] == "PENDING"
    gate.touch()
    out, err = follower.communicate(timeout=60)
    assert (out, err, follower.returncode) == ("one\n", "two\n", 0)
    assert velda.get(second)["status"] == "SUCCESS"
