"""Attempt folders made ahead (server/folders_ahead.py): a helper process (folder_maker.py)
makes the folders and empty log files of the next queued local tasks; a start that finds them
uses them, and one that does not makes its own, so a helper that is gone costs nothing but
time."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from velda.models import Resources
from velda.ready_queue import ReadyQueue
from velda.scheduler import Request
from velda.server.folders_ahead import FoldersAhead
from velda_cli import Velda


def _queue(*ids_and_priorities: tuple[int, int]) -> ReadyQueue:
    queue = ReadyQueue()
    for task_id, priority in ids_and_priorities:
        queue.add(Request(task_id, "shell", Resources(cpus=1), priority, None))
    return queue


def _eventually(check: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.01)


def _made(logs: Path, task_id: int) -> bool:
    folder = logs / f"{task_id}.1"
    return (folder / "stdout").exists() and (folder / "stderr").exists()


@pytest.fixture
def ahead(tmp_path: Path) -> Iterator[FoldersAhead]:
    (tmp_path / "logs").mkdir(mode=0o700)
    folders = FoldersAhead(tmp_path, ahead=4, slow_s=0)
    try:
        yield folders
    finally:
        folders.close()


def test_the_head_of_the_queue_gets_its_folders_made_ahead(tmp_path: Path,
                                                            ahead: FoldersAhead) -> None:
    # serving order: priority 0 before 1, then by ID
    queue = _queue(*[(task_id, 1) for task_id in range(1, 8)], (9, 0))
    ahead.refill(queue)
    logs = tmp_path / "logs"
    for task_id in (9, 1, 2, 3):
        _eventually(lambda task_id=task_id: _made(logs, task_id))
    folder = logs / "9.1"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("stdout", "stderr"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
        assert (folder / name).read_bytes() == b""
    time.sleep(0.2)
    assert sorted(p.name for p in logs.iterdir()) == ["1.1", "2.1", "3.1", "9.1"]

    queue.discard(9)  # started
    ahead.refill(queue)  # three of the four asked for still wait: no more yet
    time.sleep(0.2)
    assert not (logs / "4.1").exists()
    for task_id in (1, 2):
        queue.discard(task_id)
    ahead.refill(queue)
    for task_id in (4, 5, 6):
        _eventually(lambda task_id=task_id: _made(logs, task_id))


def test_folders_are_made_ahead_only_where_they_are_slow_to_make(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir(mode=0o700)
    folders = FoldersAhead(tmp_path, ahead=4, slow_s=20e-6)
    try:
        queue = _queue((1, 0), (2, 0))
        for seconds in (5e-6, 2e-3, 6e-6, 4e-6, 1e-3):  # tmpfs, preempted twice in a mkdir
            folders.made(seconds)
        folders.refill(queue)
        time.sleep(0.2)
        assert not (tmp_path / "logs" / "1.1").exists()
        for _ in range(6):
            folders.made(300e-6)  # a disk that deleted many files lately
        folders.refill(queue)
        _eventually(lambda: _made(tmp_path / "logs", 2))
    finally:
        folders.close()


def test_a_folder_made_ahead_keeps_what_was_written_to_it(tmp_path: Path,
                                                          ahead: FoldersAhead) -> None:
    logs = tmp_path / "logs"
    (logs / "1.1").mkdir(mode=0o700)
    (logs / "1.1" / "stdout").write_bytes(b"kept\n")
    ahead.refill(_queue((1, 0), (2, 0)))
    _eventually(lambda: _made(logs, 2))
    _eventually(lambda: _made(logs, 1))
    assert (logs / "1.1" / "stdout").read_bytes() == b"kept\n"


def test_a_helper_that_is_gone_costs_nothing_but_the_folders(tmp_path: Path,
                                                              ahead: FoldersAhead) -> None:
    logs = tmp_path / "logs"
    queue = _queue((1, 0))
    ahead.refill(queue)
    _eventually(lambda: _made(logs, 1))
    helper = ahead._helper
    assert helper is not None
    os.kill(helper.pid, signal.SIGKILL)
    helper.wait()
    queue = _queue(*[(task_id, 0) for task_id in range(2, 12)])
    ahead.refill(queue)  # the pipe is broken: said in the log, and no more asked
    ahead.refill(queue)
    time.sleep(0.2)
    assert not (logs / "2.1").exists()


def test_queued_tasks_start_from_folders_made_ahead(velda: Velda) -> None:
    velda.env["VELDA_FOLDERS_AHEAD_FROM_S"] = "0"  # however fast this file system is
    velda.configure('[pools.one]\nengine = "local"\ncpus = 1\ncapacity = 1\n')
    blocker = velda.vbatch("-P", "one", "sleep", "30")
    velda.wait(blocker, until={"RUNNING"})
    ids = [velda.vbatch("-P", "one", "sh", "-c", f"printf 'out {n}\\n'; printf 'err {n}\\n' >&2")
           for n in range(5)]
    logs = velda.home / "logs"
    for task_id in ids:  # made while they wait
        _eventually(lambda task_id=task_id: _made(logs, int(task_id)))
        assert velda.get(task_id)["status"] == "QUEUED"
    helper = _folder_maker(velda)
    assert b"velda.server.folder_maker" in Path(f"/proc/{helper}/cmdline").read_bytes()
    velda.run("velda", "task", "cancel", blocker, check=True)
    for n, task_id in enumerate(ids):
        assert velda.wait(task_id)["status"] == "SUCCESS"
        assert velda.log(task_id).stdout == f"out {n}\n"
        assert (logs / f"{task_id}.1" / "stderr").read_text() == f"err {n}\n"
    velda.shutdown()
    _eventually(lambda: not Path(f"/proc/{helper}").exists() or _zombie(helper))


def test_a_killed_server_s_folder_maker_ends_and_is_no_task_to_its_reaper(velda: Velda) -> None:
    velda.env["VELDA_FOLDERS_AHEAD_FROM_S"] = "0"
    velda.configure('[pools.one]\nengine = "local"\ncpus = 1\ncapacity = 1\n')
    blocker = velda.vbatch("-P", "one", "sleep", "30")
    velda.wait(blocker, until={"RUNNING"})
    queued = velda.vbatch("-P", "one", "echo", "after")
    _eventually(lambda: _made(velda.home / "logs", int(queued)))
    helper = _folder_maker(velda)
    velda.kill_server()
    _eventually(lambda: not Path(f"/proc/{helper}").exists())  # ended, and reaped
    velda.run("velda", "task", "cancel", blocker, check=True)  # a new server recovers both
    assert velda.wait(blocker)["status"] == "CANCELLED"
    assert velda.wait(queued)["status"] == "SUCCESS"
    assert velda.log(queued).stdout == "after\n"


def _folder_maker(velda: Velda) -> int:
    server = velda.server_pid()
    assert server is not None
    children = Path(f"/proc/{server}/task/{server}/children").read_text().split()
    makers = [int(pid) for pid in children
              if b"folder_maker" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(makers) == 1, children
    return makers[0]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize("name", ["VELDA_FOLDERS_AHEAD_FROM_S", "VELDA_CANCEL_GRACE_S"])
def test_a_bad_duration_setting_stops_the_start_with_its_name(velda: Velda, name: str) -> None:
    velda.env[name] = "soon"
    started = velda.run("velda", "server", "start")
    assert started.returncode != 0
    assert "server.log" in started.stderr
    log = (velda.home / "server.log").read_text()
    assert f"velda: {name}='soon' is not a number of seconds\n" in log
    assert "Traceback" not in log
