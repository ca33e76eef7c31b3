"""What a user at a terminal sees: the Ctrl-C question of vbatch -f, watch's progress bar, and
`vrun` giving its task a terminal of its own (keys, Ctrl-C, window size, the exit code, the
session kept as its log), on local pools here, on Ray pools in test_ray_pools.py and on Slurm
pools in test_slurm_pools.py."""

from __future__ import annotations

import time
from pathlib import Path

from pty_session import (
    ASK_TERMINAL,
    Terminal,
    a_terminal_task_survives_a_killed_server,
    a_window_resize_reaches_the_task,
    ends_with,
    typed_input_reaches_a_shell_and_its_exit_code_comes_back,
    vrun_has_a_terminal,
)
from velda_cli import Velda


def test_ctrl_c_of_vbatch_follow_asks_and_cancels(velda: Velda, tmp_path: Path) -> None:
    term = Terminal(velda, "vbatch", "-f", "--name", "asked", "bash", "-c",
                    "echo ready; sleep 600")
    term.expect(b"ready")
    term.type(b"\x03")  # Ctrl-C
    term.expect(b"Cancel the task")
    term.type(b"y\n")
    term.wait()
    assert velda.wait("asked", timeout=30)["status"] == "CANCELLED"


def test_ctrl_c_of_vbatch_follow_answered_no_detaches(velda: Velda) -> None:
    term = Terminal(velda, "vbatch", "-f", "--name", "kept", "bash", "-c",
                    "echo ready; sleep 600")
    term.expect(b"ready")
    term.type(b"\x03")
    term.expect(b"Cancel the task")
    term.type(b"\n")
    term.expect(b"keeps running")
    ends_with(term, 130)
    assert velda.get("kept")["status"] == "RUNNING"
    velda.run("velda", "task", "cancel", "kept", check=True)


def test_watch_draws_a_progress_bar_on_a_terminal(velda: Velda) -> None:
    parent = velda.vbatch("bash", "-c", "for i in 1 2 3 4; do vbatch sleep 0.2; done")
    term = Terminal(velda, "velda", "task", "watch", parent)
    term.expect(b"4/4 done: 4 succeeded")
    ends_with(term, 0)
    assert b"\r\x1b[K[" in term.screen
    assert b"[##############################] 4/4 done" in term.screen


# --- vrun at a terminal: the task gets one of its own

def test_vrun_at_a_terminal_gives_the_task_one(velda: Velda) -> None:
    vrun_has_a_terminal(velda)


def test_vrun_with_no_command_opens_the_users_shell(velda: Velda) -> None:
    typed_input_reaches_a_shell_and_its_exit_code_comes_back(velda)


def test_a_window_resize_reaches_the_task(velda: Velda) -> None:
    a_window_resize_reaches_the_task(velda)


def test_ctrl_z_and_fg_are_the_tasks_shells_own(velda: Velda) -> None:
    term = Terminal(velda, "vrun", "bash", "--norc", "-i", env={"PS1": "$ "})
    term.expect(b"$ ")
    term.type(b"sleep 31\r")
    term.expect(b"sleep 31")
    time.sleep(0.5)  # a user's pause: keys typed ahead of a Ctrl-C are the terminal's to drop
    term.type(b"\x1a")  # Ctrl-Z: the shell in the task stops its job
    term.expect(b"Stopped")
    term.type(b"fg\r")
    term.expect(b"sleep 31", times=3)  # typed, stopped, and resumed in the foreground
    time.sleep(0.5)
    term.type(b"\x03")  # and Ctrl-C ends it, not the shell
    term.expect(b"$ ", times=3)
    term.type(b"echo status $?\r")
    term.expect(b"status 130")
    term.type(b"exit 0\r")
    ends_with(term, 0)


def test_without_a_terminal_nothing_changes(velda: Velda) -> None:
    out = velda.run("vrun", "python3", "-c", ASK_TERMINAL.replace(", os.get_terminal_size()", ""),
                    check=True)
    assert out.stdout == "False False\n"
    term = Terminal(velda, "vrun", "--tty", "no", "python3", "-c",
                    "import sys; print(sys.stdin.read() == '', sys.stdout.isatty())")
    term.expect(b"True False")
    ends_with(term, 0)


def test_a_terminal_task_survives_a_killed_server(velda: Velda) -> None:
    a_terminal_task_survives_a_killed_server(velda)


def test_a_terminal_in_a_home_too_long_for_a_unix_socket_path(tmp_path: Path) -> None:
    # a Unix socket's address holds 108 bytes: the keeper's is reached through its directory
    home = tmp_path / ("a-long-velda-home-" * 6)
    assert len(str(home / "logs" / "1.1" / "terminal.sock")) > 108
    velda = Velda(home, tmp_path / "work")
    try:
        typed_input_reaches_a_shell_and_its_exit_code_comes_back(velda)
    finally:
        velda.shutdown()
