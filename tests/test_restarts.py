"""Submitters ride out a restart of the server: retries, idempotency keys, the port kept,
clients that find a moved server, and followers that resume where their stream broke."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from velda_cli import Velda, alive


def _api(velda: Velda, method: str, path: str, body: Any, key: str) -> tuple[int, Any]:
    url = json.loads((velda.home / "server.json").read_text())["url"]
    token = (velda.home / "token").read_text().strip()
    request = urllib.request.Request(
        url + path, method=method, data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                 "Idempotency-Key": key},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def _port(velda: Velda) -> int:
    url = json.loads((velda.home / "server.json").read_text())["url"]
    return int(url.rsplit(":", 1)[1])


def _new_server(velda: Velda, old_pid: int, timeout: float = 60) -> int:
    """Wait until a server other than old_pid runs for the home (a client restarted it)."""
    deadline = time.monotonic() + timeout
    while True:
        pid = velda.server_pid()
        if pid is not None and pid != old_pid and alive(pid):
            return pid
        assert time.monotonic() < deadline, "no client started the server again"
        time.sleep(0.05)


def _wait_files(directory: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(list(directory.iterdir())) < n:
        assert time.monotonic() < deadline, f"fewer than {n} files in {directory}"
        time.sleep(0.05)


def test_a_submit_repeated_with_its_key_returns_the_same_task(velda: Velda) -> None:
    velda.vbatch("true")  # start the server
    body = {"command": ["echo", "once"], "cwd": str(velda.cwd)}
    first = _api(velda, "POST", "/api/v1/tasks", body, "key-1")
    again = _api(velda, "POST", "/api/v1/tasks", body, "key-1")
    other = _api(velda, "POST", "/api/v1/tasks", body, "key-2")
    assert first[0] == 201 and again[0] == 200 and other[0] == 201
    assert again[1]["id"] == first[1]["id"] != other[1]["id"]
    listed = json.loads(velda.run("velda", "task", "list", "-o", "json", check=True).stdout)
    assert len(listed["tasks"]) == 3  # the first `true`, and one task for each key
    # a retry repeated with its key reopens the task once
    failed = velda.vbatch("false")
    assert velda.wait(failed)["status"] == "FAILURE"
    _api(velda, "POST", f"/api/v1/tasks/{failed}/retry", {}, "retry-1")
    velda.wait(failed)
    _api(velda, "POST", f"/api/v1/tasks/{failed}/retry", {}, "retry-1")
    assert velda.wait(failed)["attempt"] == 2


def test_a_restarted_server_takes_its_old_port_back(velda: Velda) -> None:
    velda.vbatch("true")
    port = _port(velda)
    velda.kill_server()
    velda.vbatch("true")  # this command starts the server again
    assert _port(velda) == port
    velda.run("velda", "server", "stop", check=True)
    velda.vbatch("true")
    assert _port(velda) == port


def test_server_stop_stops_a_server_too_busy_to_answer(velda: Velda) -> None:
    velda.vbatch("true")
    pid = velda.server_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # it cannot answer now, as under a flood it answers late
    try:
        stop = subprocess.Popen([*velda.prefix, "velda", "server", "stop"], env=velda.env,
                                stdout=subprocess.PIPE, text=True)
        time.sleep(3)  # longer than a health check waits
    finally:
        os.kill(pid, signal.SIGCONT)
    out, _ = stop.communicate(timeout=30)
    assert (stop.returncode, out.strip()) == (0, f"stopped the server (pid {pid})")
    assert not alive(pid)


def test_fan_out_survives_two_kills_each_child_once(velda: Velda, tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "vrun-code"
    runs.mkdir()
    child = f'echo run >> {runs}/$1'
    parent = (
        "set -e\n"
        f"seq 1 50 | xargs -P4 -I{{}} sh -c "
        f"'vbatch -q --name c$1 bash -c \"{child}\" _ $1 >/dev/null; sleep 0.1' _ {{}}\n"
        f"vrun -q sh -c 'sleep 1; echo from vrun' > {out}; echo \"exit $?\" >> {out}\n"
    )
    parent_id = velda.vbatch("--name", "fan", "bash", "-c", parent)
    for threshold in (10, 30):
        _wait_files(runs, threshold)
        old = velda.server_pid()
        assert old is not None
        velda.kill_server()
        _new_server(velda, old)  # started again by a vbatch inside the parent
    task = velda.wait(parent_id, timeout=240)
    children = velda.children(parent_id)
    assert task["status"] == "SUCCESS", velda.log(parent_id).stderr
    assert len(children) == 51  # 50 children and the vrun
    assert sorted(p.name for p in runs.iterdir()) == sorted(str(i) for i in range(1, 51))
    assert {(runs / str(i)).read_text() for i in range(1, 51)} == {"run\n"}
    assert out.read_text() == "from vrun\nexit 0\n"  # (a failing child would fail the parent)


def test_a_task_reaches_a_server_that_had_to_move(velda: Velda, tmp_path: Path) -> None:
    gate, seen = tmp_path / "gate", tmp_path / "child"
    script = (f"while [ ! -e {gate} ]; do sleep 0.05; done; "
              f"vbatch -q --name queued sh -c 'echo queued > {seen}.2' > /dev/null; "
              f"vrun -q sh -c 'echo from the child > {seen}; exit 4'")
    task_id = velda.vbatch("bash", "-c", script)
    velda.wait(task_id, until={"RUNNING"})
    port = _port(velda)
    velda.kill_server()
    # another program (here another velda server, of another home) takes the old port
    other = Velda(tmp_path / "other-home", tmp_path / "other")
    other.env["VELDA_PORT"] = str(port)
    try:
        other.vbatch("true")
        assert _port(other) == port
        velda.vbatch("true")  # our server starts again, on another port
        assert _port(velda) != port
        gate.touch()
        task = velda.wait(task_id, timeout=120)
        assert (task["status"], task["exit_code"]) == ("FAILURE", 4), velda.log(task_id).stderr
        assert seen.read_text() == "from the child\n"
        assert velda.wait(f"{task_id}/queued")["status"] == "SUCCESS"
        assert Path(f"{seen}.2").read_text() == "queued\n"
    finally:
        other.shutdown()


def test_followers_across_restarts_lose_and_repeat_nothing(velda: Velda) -> None:
    velda.vbatch("true")
    script = ("for i in $(seq 1 400); do echo out $i; echo err $i >&2; sleep 0.01; done; "
              "exit 3")
    followers = [
        ["vrun", "-q", "--name", "a", "bash", "-c", script],
        ["vbatch", "-f", "-q", "--name", "b", "bash", "-c", script],
    ]
    procs = [subprocess.Popen(argv, env=velda.env, cwd=velda.cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv in followers]
    velda.wait("a", until={"RUNNING"})
    procs.append(subprocess.Popen(["velda", "task", "log", "-f", "a"], env=velda.env,
                                  cwd=velda.cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
    for _ in range(2):
        time.sleep(1.5)
        old = velda.server_pid()
        assert old is not None
        velda.kill_server()
        _new_server(velda, old)  # a follower starts it again
    for name, proc in zip(["vrun", "vbatch -f", "log -f"], procs, strict=True):
        out, err = proc.communicate(timeout=180)
        if name == "vbatch -f":
            out = out.split("\n", 1)[1]  # after the task ID
        err = "".join(line for line in err.splitlines(keepends=True)
                      if not line.startswith("velda server unreachable"))
        assert proc.returncode == 3, (name, err)
        assert out == "".join(f"out {i}\n" for i in range(1, 401)), name
        assert err == "".join(f"err {i}\n" for i in range(1, 401)), name


def test_velda_home_reaches_tasks_and_the_retry_line_says_how_long(velda: Velda) -> None:
    task_id = velda.vbatch("sh", "-c", 'echo "$VELDA_HOME"')
    velda.wait(task_id)
    assert velda.log(task_id).stdout == f"{velda.home}\n"
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    blocker.close()  # a port nothing listens on
    nowhere = {"VELDA_SERVER": f"http://127.0.0.1:{port}", "VELDA_TOKEN": "x",
               "VELDA_RETRY_S": "1", "VELDA_HOME": str(velda.home / "none")}
    result = velda.run("vbatch", "true", env=nowhere)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "velda server unreachable, retrying for up to 1 s",
        f"vbatch: cannot reach the velda server at http://127.0.0.1:{port}",
    ]
    quiet = velda.run("vbatch", "-q", "true", env=nowhere)
    assert quiet.stderr.splitlines() == [
        f"vbatch: cannot reach the velda server at http://127.0.0.1:{port}"]
    assert os.path.isdir(velda.home)


def test_a_store_of_the_previous_version_gets_the_key_columns(tmp_path: Path) -> None:
    import sqlite3

    from velda.models import Task
    from velda.store.sqlite import SqliteStore

    path = tmp_path / "velda.db"
    SqliteStore(path).close()
    old = sqlite3.connect(path)  # as the previous version left it: no key columns
    old.execute("DROP INDEX tasks_idempotency_key")
    old.execute("ALTER TABLE tasks DROP COLUMN idempotency_key")
    old.execute("ALTER TABLE tasks DROP COLUMN retry_key")
    old.commit()
    old.close()
    store = SqliteStore(path)
    task_id = store.insert(Task(id=0, pool="shell", command=["true"], cwd="/", env={}))
    store.set_idempotency_key(task_id, "k")
    found = store.by_idempotency_key("k")
    assert found is not None and found.id == task_id
    assert store.by_idempotency_key("other") is None
    store.close()


def test_a_store_of_the_previous_version_keeps_what_its_handles_said(tmp_path: Path) -> None:
    """An attempt already handed to a cluster is not handed over twice after the upgrade, and
    one stopped for its timeout still ends `timeout`."""
    import json
    import sqlite3

    from velda.models import Reason, Task, TaskStatus
    from velda.store.sqlite import SqliteStore

    path = tmp_path / "velda.db"
    store = SqliteStore(path)
    handed = store.insert(Task(id=0, pool="ray", command=["true"], cwd="/", env={},
                               status=TaskStatus.QUEUED, created_at=5.0))
    timed = store.insert(Task(id=0, pool="ray", command=["true"], cwd="/", env={},
                              status=TaskStatus.RUNNING, created_at=5.0, started_at=7.0))
    waiting = store.insert(Task(id=0, pool="ray", command=["true"], cwd="/", env={},
                                status=TaskStatus.QUEUED, created_at=5.0))
    store.close()
    old = sqlite3.connect(path)  # as the previous version left it: flags in the handle
    old.execute("ALTER TABLE tasks DROP COLUMN submitted_at")
    old.execute("ALTER TABLE tasks DROP COLUMN stop_cause")
    old.execute("UPDATE tasks SET handle = ? WHERE id = ?",
                (json.dumps({"key": "1/1", "submitted": True}), handed))
    old.execute("UPDATE tasks SET handle = ? WHERE id = ?",
                (json.dumps({"key": "2/1", "timed_out": True}), timed))
    old.commit()
    old.close()
    store = SqliteStore(path)
    got = {t.id: t for t in store.get_many([handed, timed, waiting])}
    assert got[handed].submitted_at == 5.0
    assert (got[timed].submitted_at, got[timed].stop_cause) == (7.0, Reason.TIMEOUT)
    assert (got[waiting].submitted_at, got[waiting].stop_cause) == (None, None)
    store.close()
