"""Spare attempt folders (engines/spare_folders.py): the folder of a local attempt that ended
with empty logs becomes the next attempt's, and never while anything could still write to
it or read it, so no task's output lands in another task's logs."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from velda.engines.spare_folders import SpareFolders
from velda.server import folder_maker
from velda_cli import Velda


def _attempt(logs: Path, name: str, stdout: bytes = b"") -> Path:
    """An attempt's folder as a start makes it (0700, two 0600 log files), then written to."""
    folder = logs / name
    folder_maker.make(os.fsencode(folder))
    (folder / "stdout").write_bytes(stdout)
    return folder


def test_an_offered_folder_with_empty_logs_becomes_the_next_attempt_s(tmp_path: Path) -> None:
    spares = SpareFolders()
    ended = _attempt(tmp_path, "1.1")
    spares.offer(ended)
    assert spares.take(tmp_path / "2.1") is True
    assert not ended.exists()
    assert sorted(os.listdir(tmp_path / "2.1")) == ["stderr", "stdout"]
    assert (tmp_path / "2.1" / "stdout").read_bytes() == b""
    assert spares.take(tmp_path / "3.1") is None  # each offer is taken once


def test_a_folder_whose_logs_hold_anything_stays_its_attempt_s(tmp_path: Path) -> None:
    spares = SpareFolders()
    printed = _attempt(tmp_path, "1.1", stdout=b"result\n")
    spares.offer(printed)
    assert len(spares) == 0  # not even offered
    silent_then = _attempt(tmp_path, "2.1")
    spares.offer(silent_then)
    (silent_then / "stderr").write_bytes(b"late\n")  # by a process it left behind
    assert spares.take(tmp_path / "3.1") is None
    assert (silent_then / "stderr").read_bytes() == b"late\n"
    assert (printed / "stdout").read_bytes() == b"result\n"
    assert not (tmp_path / "3.1").exists()


def test_a_folder_with_anything_else_in_it_stays(tmp_path: Path) -> None:
    spares = SpareFolders()
    with_status = _attempt(tmp_path, "1.1")
    (with_status / "status").write_text("0\n")  # a wrapper's exit status: not for the next
    linked = _attempt(tmp_path, "2.1")
    os.link(linked / "stdout", tmp_path / "elsewhere")  # readable from elsewhere
    opened_up = _attempt(tmp_path, "3.1")
    (opened_up / "stderr").chmod(0o644)
    for folder in (with_status, linked, opened_up):
        spares.offer(folder)
    assert spares.take(tmp_path / "4.1") is None
    assert with_status.exists() and linked.exists() and opened_up.exists()


def test_a_folder_whose_log_a_process_still_holds_stays_until_it_lets_go(
        tmp_path: Path) -> None:
    spares = SpareFolders()
    ended = _attempt(tmp_path, "1.1")
    with open(ended / "stdout", "ab") as stdout:  # a process the command left behind
        child = subprocess.Popen(["sleep", "30"], stdout=stdout)
    try:
        spares.offer(ended)
        assert spares.take(tmp_path / "2.1") is None
        assert ended.exists()
    finally:
        child.kill()
        child.wait()
    spares.offer(ended)
    assert spares.take(tmp_path / "2.1") is True


def test_a_folder_made_ahead_is_used_and_the_offer_kept(tmp_path: Path) -> None:
    spares = SpareFolders()
    ended = _attempt(tmp_path, "1.1")
    spares.offer(ended)
    _attempt(tmp_path, "2.1")  # made ahead by the folder maker
    assert spares.take(tmp_path / "2.1") is False
    assert spares.take(tmp_path / "3.1") is True
    assert not ended.exists()


def test_only_the_latest_offers_are_kept(tmp_path: Path) -> None:
    spares = SpareFolders(keep=2)
    for n in range(1, 4):
        spares.offer(_attempt(tmp_path, f"{n}.1"))
    assert len(spares) == 2
    assert spares.take(tmp_path / "10.1") and spares.take(tmp_path / "11.1")
    assert spares.take(tmp_path / "12.1") is None
    assert (tmp_path / "1.1").exists()  # the oldest offer was dropped: it stays


def test_a_flood_that_prints_nothing_reuses_its_folders(velda: Velda) -> None:
    ids = [velda.vbatch("true") for _ in range(30)]
    for task_id in ids:
        assert velda.wait(task_id)["status"] == "SUCCESS"
    printed = velda.vbatch("sh", "-c", "echo out; echo err >&2")
    assert velda.wait(printed)["status"] == "SUCCESS"
    folders = os.listdir(velda.home / "logs")
    assert len(folders) < 10, folders  # 31 tasks
    for task_id in ids:
        shown = velda.log(task_id)
        assert (shown.returncode, shown.stdout, shown.stderr) == (0, "", "")
    assert velda.log(printed, "--stdout").stdout == "out\n"
    assert velda.log(printed, "--stderr").stderr == "err\n"


def test_output_written_after_a_task_ended_stays_in_that_task_s_logs(velda: Velda) -> None:
    """A command that ends while a process it started still holds its stdout: the tasks
    after it never get that folder, so the late line is its own and no one else's."""
    velda.configure('[pools.one]\nengine = "local"\ncpus = 1\ncapacity = 1\n')
    first = velda.vbatch("-P", "one", "sh", "-c", "(sleep 2; echo late) & exit 0")
    later = [velda.vbatch("-P", "one", "true") for _ in range(10)]  # each after the one before
    for task_id in later:
        assert velda.wait(task_id)["status"] == "SUCCESS"
    deadline = time.monotonic() + 30
    while velda.log(first).stdout != "late\n" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert velda.log(first).stdout == "late\n"
    for task_id in later:
        assert velda.log(task_id).stdout == ""


def test_tasks_followed_by_vrun_reuse_their_folders_and_keep_their_figures(
        velda: Velda) -> None:
    ran = [velda.run("vrun", "true", check=True) for _ in range(8)]
    assert all(result.stdout == "" for result in ran)
    # 8 tasks, one after the other: each takes the folder of the one before (unless a usage
    # sample, once a second, came in a task's millisecond and made it keep its own)
    assert len(os.listdir(velda.home / "logs")) <= 3
    first = velda.get("1")
    assert first["status"] == "SUCCESS"
    assert first["usage"]["final"] is True
    assert first["usage"]["cpu_s"] >= 0
