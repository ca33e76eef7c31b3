"""Driving the real velda commands from tests, as a user would in a shell."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
FINAL = {"SUCCESS", "FAILURE", "FAILED_UPSTREAM", "SKIPPED", "CANCELLED"}


class Velda:
    def __init__(self, home: Path, cwd: Path, prefix: list[str] | None = None) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        self.home, self.cwd = home, cwd
        self.prefix = prefix or []  # put before every command (e.g. nsenter into a namespace)
        self.env = {
            k: v for k, v in os.environ.items()
            if not k.startswith("VELDA_") and k not in ("PYTEST_CURRENT_TEST",)
        }
        self.env.update(VELDA_HOME=str(home), VELDA_PORT="0", PYTHONUNBUFFERED="1")
        self.env["PATH"] = f"{BIN}{os.pathsep}{self.env.get('PATH', '')}"

    def configure(self, toml: str) -> Path:
        """Pools and capacity for the next server start (SPEC §5)."""
        path = self.cwd / "velda.toml"
        path.write_text(toml)
        self.env["VELDA_CONFIG"] = str(path)
        return path

    # --- running commands

    def run(
        self, *argv: str, check: bool = False, timeout: float = 120, cwd: Path | None = None,
        input: str | None = None, env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [*self.prefix, *argv], cwd=cwd or self.cwd, env={**self.env, **(env or {})}, text=True,
            capture_output=True, timeout=timeout, input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{argv} exited {result.returncode}\nstdout: {result.stdout}\n"
                f"stderr: {result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("bash", "-c", script, **kwargs)

    def vbatch(self, *argv: str) -> str:
        """Submit and return the task ID (vbatch prints only the ID on stdout)."""
        return self.run("vbatch", *argv, check=True).stdout.strip()

    def get(self, ref: str) -> dict[str, Any]:
        return json.loads(self.run("velda", "task", "get", ref, "-o", "json", check=True).stdout)

    def children(self, ref: str) -> list[dict[str, Any]]:
        out = self.run("velda", "task", "list", ref, "-a", "-o", "json", check=True).stdout
        return json.loads(out)["tasks"]  # type: ignore[no-any-return]

    def wait(self, ref: str, timeout: float = 60, until: set[str] | None = None) -> dict[str, Any]:
        """Poll until the task reaches one of `until` (default: any final state). A task that
        does not exist yet (a child its parent has still to submit) is waited for too."""
        until = until or FINAL
        deadline = time.monotonic() + timeout
        while True:
            task = self._find(ref)
            if task is not None and task["status"] in until:
                return task
            if time.monotonic() > deadline:
                state = task["status"] if task else "not submitted"
                raise AssertionError(f"task {ref} still {state} after {timeout}s")
            time.sleep(0.1)

    def _find(self, ref: str) -> dict[str, Any] | None:
        result = self.run("velda", "task", "get", ref, "-o", "json")
        if result.returncode == 2 and "no task named" in result.stderr:
            return None
        if result.returncode != 0:
            raise AssertionError(f"velda task get {ref}: {result.stderr}")
        return json.loads(result.stdout)  # type: ignore[no-any-return]

    def log(self, ref: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("velda", "task", "log", ref, *extra, check=True)

    def task_pid(self, task_id: str, attempt: int = 1, timeout: float = 30) -> int:
        """The pid of a task's process group leader (its command, or the wrapper around it),
        from the handle the server stored, else from the pid file the wrapper (or the reaper
        of a dead server) wrote."""
        path = self.home / "logs" / f"{task_id}.{attempt}" / "pid"
        deadline = time.monotonic() + timeout
        while True:
            pid = self._stored_pid(task_id, attempt)
            if pid is None and path.exists() and path.read_text().strip():
                pid = int(path.read_text())
            if pid is not None:
                return pid
            assert time.monotonic() < deadline, f"task {task_id} never started"
            time.sleep(0.05)

    def _stored_pid(self, task_id: str, attempt: int) -> int | None:
        db = sqlite3.connect(f"file:{self.home / 'velda.db'}?mode=ro", uri=True, timeout=30)
        try:
            row = db.execute("SELECT attempt, handle FROM tasks WHERE id=?",
                             (int(task_id),)).fetchone()
        finally:
            db.close()
        if row is None or row[0] != attempt or not row[1]:
            return None
        pid = json.loads(row[1]).get("pid")
        return pid if isinstance(pid, int) else None

    # --- the server

    def server_pid(self) -> int | None:
        try:
            return int(json.loads((self.home / "server.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def kill_server(self) -> None:
        pid = self.server_pid()
        assert pid is not None, "no server is running"
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)

    def shutdown(self) -> None:
        """Stop the server and anything its tasks left running."""
        pid = self.server_pid()
        if pid is not None:
            self.run("velda", "server", "stop", timeout=30)
        logs = self.home / "logs"
        for pid_file in logs.glob("*/pid") if logs.is_dir() else []:
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


def cancel_open_tasks(velda: Velda) -> None:
    """Cancel every task not yet final: what a failed test left running must not hold a
    cluster's CPUs for the next tests of a module that shares one server."""
    if velda.server_pid() is None:
        return
    listed = velda.run("velda", "task", "list", "-a", "--max-results", "1000", "-o", "json")
    for task in json.loads(listed.stdout or '{"tasks": []}')["tasks"]:
        if task["status"] not in FINAL:
            velda.run("velda", "task", "cancel", task["id"])


def free_port() -> int:
    """A loopback port nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(pid: int) -> bool:
    """Is pid a live process (not gone, not a zombie waiting to be reaped)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while alive(pid):
        assert time.monotonic() < deadline, f"process {pid} still alive after {timeout:g} s"
        time.sleep(0.02)


def default_signals() -> None:
    """In a child before exec: every signal at its default action and none blocked, as in a
    command typed at a terminal. A suite started in the background (`scripts/test.sh &` from a
    script) has SIGINT and SIGQUIT ignored, and an exec keeps what is ignored, so a command
    started without this would never see the Ctrl-C a test sends it."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP,
                   signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
