"""Tasks started straight from the server, under its reaper (engines/reaper.py): what a dead
server leaves is written down, a dead reaper costs nothing but the fast path, and a task's end
is told exactly (read from its zombie, with its CPU totals); where its command is found."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from velda.engines import zombie
from velda.engines.command_path import CommandPaths
from velda.engines.pids import boot_ticks, start_time, start_time_since
from velda.engines.status_file import read_int, read_status
from velda_cli import FINAL, Velda, alive, wait_gone


def _reaper_of(velda: Velda) -> int:
    pid = velda.server_pid()
    assert pid is not None
    stat = Path(f"/proc/{pid}/stat").read_text()
    reaper = int(stat.rsplit(")", 1)[1].split()[1])
    assert b"velda.engines.reaper" in Path(f"/proc/{reaper}/cmdline").read_bytes()
    return reaper


def test_a_task_is_the_server_s_own_child_and_no_shell_sits_between(velda: Velda) -> None:
    task_id = velda.vbatch("sleep", "30")
    pid = velda.task_pid(task_id)
    assert Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0030\x00"
    assert os.getsid(pid) == pid  # it leads its own session, as the wrapper did
    velda.run("velda", "task", "cancel", task_id, check=True)
    assert velda.wait(task_id)["status"] == "CANCELLED"


def test_a_signal_and_an_exit_status_above_128_are_told_apart(velda: Velda) -> None:
    killed = velda.vbatch("sh", "-c", "kill -INT $$")
    exited = velda.vbatch("sh", "-c", "exit 130")
    task = velda.wait(killed)
    assert (task["status"], task["exit_code"], task["signal"]) == ("FAILURE", None, 2)
    task = velda.wait(exited)
    assert (task["status"], task["exit_code"], task["signal"]) == ("FAILURE", 130, None)


def test_tasks_a_killed_server_left_are_recorded_by_its_reaper(velda: Velda) -> None:
    marker = velda.cwd / "go"
    ids = [velda.vbatch("sh", "-c", f"while [ ! -e {marker} ]; do sleep 0.05; done; exit {n}")
           for n in (3, 4)]
    pids = [velda.task_pid(task_id) for task_id in ids]
    reaper = _reaper_of(velda)
    velda.kill_server()
    marker.touch()
    for pid in pids:
        wait_gone(pid)
    for task_id, pid in zip(ids, pids, strict=True):
        attempt = velda.home / "logs" / f"{task_id}.1"
        assert read_int(attempt / "pid") == pid  # written by the reaper when the server died
    deadline = time.monotonic() + 10
    while alive(reaper):  # its server and the tasks it took over are gone
        assert time.monotonic() < deadline, "the reaper outlived what it watched"
        time.sleep(0.05)
    assert [velda.wait(task_id)["exit_code"] for task_id in ids] == [3, 4]  # a new server


def test_a_reaper_whose_tasks_folders_were_removed_still_ends(velda: Velda) -> None:
    marker = velda.cwd / "go"
    task_id = velda.vbatch("sh", "-c", f"while [ ! -e {marker} ]; do sleep 0.05; done")
    pid = velda.task_pid(task_id)
    reaper = _reaper_of(velda)
    velda.kill_server()
    shutil.rmtree(velda.home / "logs" / f"{task_id}.1")  # as when the home is removed
    marker.touch()
    deadline = time.monotonic() + 10
    while alive(reaper):  # nothing left that anyone could read: it reaps and exits
        assert time.monotonic() < deadline, "the reaper kept a task no server will read"
        time.sleep(0.05)
    assert not alive(pid)


def test_when_the_reaper_dies_tasks_still_run_and_end_through_the_wrapper(
    velda: Velda,
) -> None:
    before = velda.vbatch("sh", "-c", "sleep 1; exit 5")
    velda.task_pid(before)
    os.kill(_reaper_of(velda), signal.SIGKILL)
    after = velda.vbatch("sh", "-c", "exit 6")  # the server notices the reaper is gone
    last = velda.vbatch("sh", "-c", "exit 7")
    assert [velda.wait(t)["exit_code"] for t in (before, after, last)] == [5, 6, 7]
    wrapped = velda.home / "logs" / f"{last}.1" / "pid"
    assert wrapped.exists()  # the wrapper writes its pid; a task started directly has none


# --- the reaper alone, under a stand-in for the server that dies in the middle of a spawn


_SERVER = textwrap.dedent("""
    import os, sys
    fd = int(os.environ["VELDA_REAPER_FD"])
    attempts = [sys.argv[1], sys.argv[2]]
    for attempt in attempts:
        os.write(fd, b"S " + attempt.encode() + b"\\n")
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", sys.argv[3]], {}, setsid=True,
            file_actions=[(os.POSIX_SPAWN_OPEN, 1, attempt + "/stdout", flags, 0o600)])
        if attempt == attempts[0]:
            os.write(fd, b"P %d\\n" % pid)
    os._exit(0)  # before it could name the second one: as if killed there
""")


def test_a_dead_server_s_tasks_are_written_down_even_the_one_it_was_spawning(
    tmp_path: Path,
) -> None:
    named, in_flight = tmp_path / "1.1", tmp_path / "2.1"
    named.mkdir()
    in_flight.mkdir()
    go = tmp_path / "go"
    command = f"while [ ! -e {go} ]; do sleep 0.02; done; exit 9"
    reaper = subprocess.Popen(
        [sys.executable, "-m", "velda.engines.reaper", str(tmp_path / "server.lock"),
         sys.executable, "-c", _SERVER, str(named), str(in_flight), command])
    for attempt in (named, in_flight):
        _wait_for(attempt / "pid")
    go.touch()
    assert reaper.wait(timeout=30) == 0  # the server's exit status, once its tasks ended
    for attempt in (named, in_flight):
        assert read_status(attempt) == 9
        assert not alive(read_int(attempt / "pid") or 0)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.02)


def test_a_flood_through_two_kills_runs_each_task_once_with_its_exit_code(
    velda: Velda,
) -> None:
    velda.configure("[local]\ncpus = 4\n")
    runs = velda.cwd / "runs"
    runs.mkdir()
    script = f"echo ran >> {runs}/$VELDA_TASK_ID; exit $((VELDA_TASK_ID % 7))"
    velda.vbatch("true")  # the server, before the flood
    flood = subprocess.Popen(
        [*velda.prefix, "bash", "-c",
         f"seq 400 | xargs -P4 -I{{}} vbatch -q sh -c '{script}' >/dev/null"],
        env=velda.env, cwd=velda.cwd)
    for threshold in (60, 200):
        while len(list(runs.iterdir())) < threshold:
            assert flood.poll() is None, "the flood ended before the kills"
            time.sleep(0.005)
        velda.kill_server()  # the flood's next vbatch starts another one
    assert flood.wait(timeout=120) == 0
    tasks = _all_final(velda, 401)
    assert len(tasks) == 400
    for task in tasks:
        code = int(task["id"]) % 7
        assert (task["status"], task["exit_code"], task["signal"]) == (
            "SUCCESS" if code == 0 else "FAILURE", code, None), task
        assert (runs / task["id"]).read_text() == "ran\n", f"task {task['id']} ran twice"


def _all_final(velda: Velda, count: int) -> list[dict[str, Any]]:
    """The tasks started by `sh`, once all `count` stored tasks are final."""
    deadline = time.monotonic() + 120
    while True:
        listed = velda.run("velda", "task", "list", "-a", "--max-results", "1000", "-o",
                           "json", check=True).stdout
        tasks = json.loads(listed)["tasks"]
        if len(tasks) == count and all(t["status"] in FINAL for t in tasks):
            return [t for t in tasks if t["command"][0] == "sh"]
        assert time.monotonic() < deadline, "tasks still open after 120 s"
        time.sleep(0.2)


def test_the_start_time_taken_at_a_spawn_is_the_kernel_s(tmp_path: Path) -> None:
    """A task's handle carries its start time, to tell it from a later process with its
    pid; the server takes it from the clock at the spawn, not from /proc."""
    from_the_clock = 0
    for _ in range(100):
        before = boot_ticks()
        pid = os.posix_spawn("/bin/sleep", ["sleep", "0.02"], {})
        taken = start_time_since(pid, before)
        from_the_clock += taken == before and boot_ticks() == before  # not read from /proc
        assert taken == start_time(pid)
        os.waitpid(pid, 0)
    assert from_the_clock > 0  # the clock's value was checked against /proc, not /proc's


def test_an_ended_child_s_status_and_cpu_totals_are_read_and_it_stays_unreaped() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin + "raise SystemExit(7)"])
    how, status, (user, system) = zombie.ended(child.pid)  # waits for the end, reaps nothing
    assert (how, status) == (os.CLD_EXITED, 7)
    stat = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert stat[0] == "Z"  # still there: its parent reaps it when it chooses
    tick = os.sysconf("SC_CLK_TCK")
    assert 0.3 <= user + system
    assert abs(user - (int(stat[11]) + int(stat[13])) / tick) <= 0.02  # /proc's, in ticks
    assert child.wait() == 7

    killed = subprocess.Popen(["sleep", "30"])
    killed.kill()
    assert zombie.ended(killed.pid)[:2] == (os.CLD_KILLED, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL


def test_where_a_command_is_found_is_remembered_for_a_while(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    (second / "tool").write_text("#!/bin/sh\n")
    (second / "tool").chmod(0o755)
    paths = CommandPaths(ttl_s=0.3)
    path = f"{first}:{second}"
    assert paths.find("tool", path, "/") == str(second / "tool")
    (first / "tool").write_text("#!/bin/sh\n")
    (first / "tool").chmod(0o755)
    assert paths.find("tool", path, "/") == str(second / "tool")  # remembered
    time.sleep(0.35)
    assert paths.find("tool", path, "/") == str(first / "tool")  # looked up again
    assert paths.find("missing", path, "/") is None
    assert paths.find("./run.sh", path, "/") == "./run.sh"  # a path is taken as it is
