"""No task stays RUNNING without a process, no dependency cycle through the tree, and a full
disk loses nothing: launches that fail, cancels that the engine cannot carry out, ancestors as
dependencies, and a server on a 4 MB tmpfs that fills up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from velda.config import Config
from velda.engines.base import EngineEvents, Handle, Launch, StartResult, start_each
from velda.models import Exit, Pool, Resources, TaskStatus
from velda.protocol import SubmitRequest
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore
from velda_cli import Velda, alive

S = TaskStatus


def _wait_for(what: str, check: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not after {timeout:g} s"
        time.sleep(0.1)


def _write_db(velda: Velda, sql: str, *args: object) -> None:
    """Change the store behind the server's back, as an older or broken writer might."""
    db = sqlite3.connect(velda.home / "velda.db", timeout=30, isolation_level=None)
    try:
        db.execute(sql, args)
    finally:
        db.close()


def _held(velda: Velda, gate: Path, *argv: str) -> tuple[str, str]:
    """A gate task holding the only CPU, and a task behind it (PENDING until the gate
    opens): the test can change the waiting task before it starts."""
    gate_id = velda.vbatch("--name", "gate", "bash", "-c",
                           f"while [ ! -e {gate} ]; do sleep 0.05; done")
    velda.wait(gate_id, until={"RUNNING"})
    task_id = velda.vbatch("--after-success", gate_id, *argv)
    return gate_id, task_id


# --- a launch that raises


def test_an_env_the_system_cannot_take_ends_engine_error_and_frees_the_cpu(
    velda: Velda, tmp_path: Path
) -> None:
    velda.configure("[local]\ncpus = 1\n")
    gate = tmp_path / "gate"
    _, bad = _held(velda, gate, "--name", "bad", "echo", "never")
    _write_db(velda, "UPDATE tasks SET env=?, env_id=NULL WHERE id=?",  # as an older writer
              json.dumps({"": "x"}), int(bad))
    after = velda.vbatch("--name", "after", "echo", "next one runs")
    gate.touch()
    task = velda.wait(bad)
    assert (task["status"], task["reason"], task["exit_code"]) == ("FAILURE", "engine-error", None)
    assert task["reason_detail"] == "cannot start: environment variable name '' is not valid"
    assert velda.log(bad, "--stderr").stderr == f"velda: {task['reason_detail']}\n"
    shown = velda.run("velda", "task", "get", bad, check=True).stdout
    assert f"engine-error: {task['reason_detail']}" in shown
    assert velda.wait(after)["status"] == "SUCCESS"  # the CPU came back
    assert velda.log(after).stdout == "next one runs\n"


def test_a_working_directory_removed_before_the_start_ends_engine_error(
    velda: Velda, tmp_path: Path
) -> None:
    velda.configure("[local]\ncpus = 1\n")
    gate, cwd = tmp_path / "gate", tmp_path / "gone"
    cwd.mkdir()
    _, task_id = _held(velda, gate, "-C", str(cwd), "pwd")
    cwd.rmdir()
    gate.touch()
    task = velda.wait(task_id)
    assert (task["status"], task["reason"]) == ("FAILURE", "engine-error")
    assert task["reason_detail"] == f"working directory {cwd} does not exist"
    assert f"velda: working directory {cwd} does not exist" in velda.log(task_id).stderr
    assert velda.vbatch("-f", "echo", "still fine") is not None


class RaisingEngine:
    """Raises on start for commands that say so; starts nothing else (the test ends them)."""

    name, places_work, writes_log_index = "local", False, True
    samples_here = False

    def host_of(self, handle: Handle) -> str:
        return "127.0.0.1"
    gives_terminals = False

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        return None

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        return await start_each(self, launches)

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.started: list[str] = []

    def capacity(self) -> Resources:
        return Resources(2, 0)

    async def check(self, pool: Pool) -> None:
        return None

    async def start(self, launch: Launch) -> Handle:
        if launch.argv == ["explode"]:
            raise RuntimeError("the cluster went away")
        self.started.append(launch.task_id)
        self.runtime.running(launch.task_id, launch.attempt, {})
        return {}

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        raise RuntimeError("cannot cancel either")

    async def close(self) -> None:
        return None


_Engine = TypeVar("_Engine", bound="RaisingEngine")


@contextmanager
def _runtime_with(kind: type[_Engine], tmp_path: Path) -> Iterator[tuple[Runtime, _Engine]]:
    """A runtime on its own event loop whose local engine is a `kind`."""
    loop = asyncio.new_event_loop()
    engines: list[_Engine] = []

    def make(events: EngineEvents) -> _Engine:
        assert isinstance(events, Runtime)  # the runtime hears its engines itself
        engines.append(kind(events))
        return engines[0]

    runtime = Runtime(tmp_path, Config(), SqliteStore(tmp_path / "velda.db"), str, local=make)
    asyncio.set_event_loop(loop)
    try:
        yield runtime, engines[0]
    finally:
        loop.run_until_complete(runtime.close())
        loop.close()
        asyncio.set_event_loop(None)


@pytest.fixture
def raising(tmp_path: Path) -> Iterator[tuple[Runtime, RaisingEngine]]:
    with _runtime_with(RaisingEngine, tmp_path) as pair:
        yield pair


def _submit(runtime: Runtime, command: str) -> int:
    request = SubmitRequest.from_json({"command": [command], "cwd": "/"})
    loop = asyncio.get_event_loop()
    return loop.run_until_complete(runtime.submit(request, None)).id


def _run(runtime: Runtime, seconds: float = 0.05) -> None:
    asyncio.get_event_loop().run_until_complete(asyncio.sleep(seconds))


def test_one_launch_that_raises_does_not_stop_the_others(
    raising: tuple[Runtime, RaisingEngine],
) -> None:
    runtime, engine = raising
    bad, good = _submit(runtime, "explode"), _submit(runtime, "fine")
    _run(runtime)
    task = runtime.store.get(bad)
    assert task is not None and (task.status, task.reason) == (S.FAILURE, "engine-error")
    assert task.reason_detail == "cannot start: RuntimeError: the cluster went away"
    assert (runtime.attempt_dir(bad, 1) / "stderr").read_text() == (
        "velda: cannot start: RuntimeError: the cluster went away\n"
    )
    assert engine.started == [str(good)]
    assert bad not in runtime.machine.allocs and good in runtime.machine.allocs


def test_cancel_ends_a_task_whose_engine_raises_within_the_grace(
    raising: tuple[Runtime, RaisingEngine],
) -> None:
    runtime, engine = raising
    runtime.cancel_grace_s = 0.2
    task_id = _submit(runtime, "fine")
    _run(runtime)
    assert engine.started == [str(task_id)]
    asyncio.get_event_loop().run_until_complete(runtime.cancel(task_id))
    task = runtime.store.get(task_id)
    assert task is not None and task.status == S.RUNNING  # the grace runs
    _run(runtime, 1.0)
    task = runtime.store.get(task_id)
    assert task is not None and (task.status, task.reason) == (S.CANCELLED, "cancelled")
    assert "did not report the end within the 0.2 s grace period" in (task.reason_detail or "")
    assert task_id not in runtime.machine.allocs


class SlowEngine(RaisingEngine):
    """Places work itself, as a remote engine does, and takes each pass's starts only once
    `taking` is set (a driver starting, sbatch running); then what it started runs until
    it is cancelled."""

    places_work = True

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self.taking = asyncio.Event()
        self.cancelled: list[Handle] = []

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        await self.taking.wait()
        self.started += [launch.task_id for launch in launches]
        return [{"job": launch.task_id} for launch in launches]

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        self.cancelled.append(handle)
        task_id = str(handle["job"])
        task = self.runtime.store.get(int(task_id))
        assert task is not None
        self.runtime.exited(task_id, task.attempt, Exit.from_signal(signal.SIGTERM))


def test_a_task_cancelled_while_its_engine_takes_it_is_stopped_once_taken(
    tmp_path: Path,
) -> None:
    with _runtime_with(SlowEngine, tmp_path) as (runtime, engine):
        task_id = _submit(runtime, "sleep")
        _run(runtime)
        task = runtime.store.get(task_id)
        assert task is not None and task.status == S.QUEUED and task.submitted_at is not None
        assert engine.started == []  # handed over, not yet taken
        asyncio.get_event_loop().run_until_complete(runtime.cancel(task_id))  # answers at once
        task = runtime.store.get(task_id)
        assert task is not None and task.status == S.QUEUED and task.cancel_requested
        engine.taking.set()
        _run(runtime, 0.2)
        assert engine.started == [str(task_id)]
        assert engine.cancelled == [{"job": str(task_id)}]  # stopped by its handle
        task = runtime.store.get(task_id)
        assert task is not None and (task.status, task.reason) == (S.CANCELLED, "cancelled")


def test_a_store_from_before_reason_detail_is_upgraded(tmp_path: Path) -> None:
    from velda.store.sqlite import SCHEMA

    old = sqlite3.connect(tmp_path / "velda.db", isolation_level=None)
    old.executescript(SCHEMA)  # the first release's tables, without the added columns
    old.execute("INSERT INTO tasks (status, pool, command, env, cwd, labels, created_at) "
                "VALUES ('FAILURE', 'shell', '[\"x\"]', '{}', '/', '{}', 1.0)")
    old.close()
    store = SqliteStore(tmp_path / "velda.db")
    task = store.get(1)
    assert task is not None and task.reason_detail is None
    task.reason_detail = "why, in words"
    with store.transaction():
        store.update(task, "reason_detail")
    assert (store.get(1) or task).reason_detail == "why, in words"
    store.close()


# --- cancel, whatever the engine's state


def _kill_and_forget(velda: Velda, task_id: str, pid: int) -> None:
    """SIGKILL to a task whose server is dead, and its exit status lost: the status file its
    parent (the dead server's reaper) writes just before it reaps it is deleted once the
    process is gone for good."""
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}"):
        assert time.monotonic() < deadline, f"process {pid} was never reaped"
        time.sleep(0.02)
    (velda.home / "logs" / f"{task_id}.1" / "status").unlink(missing_ok=True)


def _stuck_running(velda: Velda, tmp_path: Path) -> tuple[str, subprocess.Popen[bytes]]:
    """A RUNNING task whose handle names a process the engine cannot stop or see end: the
    server was killed, the task's own process went away, and its handle points elsewhere."""
    task_id = velda.vbatch("sleep", "600")
    velda.wait(task_id, until={"RUNNING"})
    pid = velda.task_pid(task_id)
    velda.kill_server()
    _kill_and_forget(velda, task_id, pid)
    other = subprocess.Popen(["sleep", "600"])  # not a process group leader: killpg misses
    _write_db(velda, "UPDATE tasks SET handle=? WHERE id=?", json.dumps({"pid": other.pid}),
              int(task_id))
    return task_id, other


def test_cancel_of_a_running_task_without_its_process_ends_within_the_grace(
    velda: Velda, tmp_path: Path
) -> None:
    velda.env["VELDA_CANCEL_GRACE_S"] = "1"
    task_id, other = _stuck_running(velda, tmp_path)
    try:
        assert velda.get(task_id)["status"] == "RUNNING"  # adopted, as the server found it
        result = velda.run("velda", "task", "cancel", task_id, check=True)
        assert result.stdout == f"task {task_id}: RUNNING (cancelling)\n"
        task = velda.wait(task_id, timeout=30)
        assert (task["status"], task["reason"]) == ("CANCELLED", "cancelled")
        assert "grace period" in task["reason_detail"]
        assert alive(other.pid)  # velda stopped only what was its own
    finally:
        other.kill()
        other.wait()


def test_cancel_of_an_ended_task_says_so(velda: Velda) -> None:
    task_id = velda.vbatch("-f", "true")
    result = velda.run("velda", "task", "cancel", task_id)
    assert (result.returncode, result.stdout) == (0, f"task {task_id} already ended SUCCESS\n")
    assert velda.get(task_id)["status"] == "SUCCESS"


def test_a_running_task_whose_process_is_gone_does_not_stay_running_after_a_restart(
    velda: Velda,
) -> None:
    task_id = velda.vbatch("sleep", "600")
    velda.wait(task_id, until={"RUNNING"})
    pid = velda.task_pid(task_id)
    velda.kill_server()
    _kill_and_forget(velda, task_id, pid)
    task = velda.wait(task_id, timeout=30)
    assert (task["status"], task["reason"]) == ("FAILURE", "lost")


# --- no cycle through the tree


def test_a_dependency_on_the_task_itself_or_an_ancestor_is_refused(velda: Velda) -> None:
    inner = (
        'vbatch --after-success "$VELDA_TASK_ID" echo x; echo "rc=$?"; '
        'vbatch --name grandchild bash -c \'vbatch --after "$1" echo y; echo "rc=$?"\' _ '
        '"$VELDA_TASK_ID" >/dev/null 2>&1'
    )
    root = velda.vbatch("--name", "root", "bash", "-c", inner)
    assert velda.wait(root)["status"] == "SUCCESS"
    log = velda.log(root)
    assert log.stdout == "rc=2\n"
    assert log.stderr == (
        f"vbatch: after_success: task {root} is an ancestor of the new task; "
        "it would wait for itself\n"
    )
    grandchild = velda.get(f"{root}/grandchild")
    assert velda.wait(grandchild["id"])["status"] == "SUCCESS"
    nested = velda.log(grandchild["id"])
    assert nested.stdout == "rc=2\n"
    assert nested.stderr == (
        f"vbatch: after: task {root} is an ancestor of the new task; it would wait for itself\n"
    )
    assert [c["name"] for c in velda.children(root)] == ["grandchild"]  # nothing else made


# --- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs, mounted for the test and unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 4 MB tmpfs needs root (mount -t tmpfs); this runs as "
                    f"uid {os.geteuid()}")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {disk}: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte of the disk, the way a runaway log would."""
    path = disk / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"x" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


def _listed(velda: Velda) -> list[dict[str, object]]:
    """Every task, less its usage (a running task's changes with each sample)."""
    out = velda.run("velda", "task", "list", "-a", "-o", "json", check=True).stdout
    return [{k: v for k, v in task.items() if k != "usage"} for task in json.loads(out)["tasks"]]


def _refusing(velda: Velda) -> str | None:
    out = velda.run("velda", "server", "status", "-o", "json", check=True).stdout
    return json.loads(out).get("refusing_work")  # type: ignore[no-any-return]


def test_a_full_disk_refuses_submits_keeps_exits_and_lets_the_server_restart(
    small_disk: Path, tmp_path: Path
) -> None:
    home = small_disk / "home"
    velda = Velda(home, tmp_path / "work")
    gates = tmp_path / "gate1", tmp_path / "gate2"
    try:
        velda.vbatch("-f", "true")
        ends = [
            velda.vbatch("--name", f"ends{i}", "bash", "-c",
                         f"while [ ! -e {gate} ]; do sleep 0.05; done; exit {3 + i}")
            for i, gate in enumerate(gates)
        ]
        for task_id in ends:
            velda.wait(task_id, until={"RUNNING"})
        filler = _fill(small_disk)
        before = _listed(velda)

        refused = velda.run("vbatch", "echo", "no room")
        assert refused.returncode == 1
        assert refused.stderr == f"vbatch: no space left on the device holding {home}/velda.db\n"
        assert _listed(velda) == before  # nothing stored
        assert _refusing(velda) == f"no space left on the device holding {home}/velda.db"
        status = velda.run("velda", "server", "status", check=True).stdout
        assert f"refusing new work: no space left on the device holding {home}" in status

        # an exit that cannot be written is kept, and written once there is room
        gates[0].touch()
        time.sleep(1.5)
        assert velda.get(ends[0])["status"] == "RUNNING"  # its exit waits for room
        filler.unlink()
        task = velda.wait(ends[0], timeout=30)
        assert (task["status"], task["exit_code"]) == ("FAILURE", 3)
        _wait_for("the server to take work again", lambda: _refusing(velda) is None)

        # full again: an exit survives a kill of the server too, and the server restarts
        filler = _fill(small_disk)
        gates[1].touch()
        time.sleep(1.5)
        velda.kill_server()
        assert velda.get(ends[1])["status"] == "RUNNING"  # a new server, on the full disk
        refused = velda.run("vbatch", "true")
        assert refused.returncode == 1 and "no space left on the device" in refused.stderr
        assert _refusing(velda) is not None
        filler.unlink()
        task = velda.wait(ends[1], timeout=30)
        assert (task["status"], task["exit_code"]) == ("FAILURE", 4)
        _wait_for("the server to take work again", lambda: _refusing(velda) is None)
        assert velda.run("vrun", "echo", "room again", check=True).stdout == "room again\n"
    finally:
        velda.shutdown()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
