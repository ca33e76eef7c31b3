"""The server's doors: private files, task tokens that end with their task, Host and Origin
checks, credentials that are never an error, and pools that run tasks as another user."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import missing
from velda.config import ConfigError, load_config
from velda.models import TaskStatus
from velda.server.auth import TASK_TOKEN_GRACE_S, Auth, task_token_refusal
from velda_cli import Velda


class Raw:
    """HTTP/1.1 requests written byte by byte, so tests can send any Host, Origin or
    non-ASCII header a hostile client would."""

    def __init__(self, velda: Velda) -> None:
        velda.run("velda", "server", "start", check=True)
        self.velda = velda
        self.url = json.loads((velda.home / "server.json").read_text())["url"]
        parts = urlsplit(self.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.token = (velda.home / "token").read_text().strip()

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None,
        body: bytes = b"", token: str | None = None, raw_headers: bytes = b"",
    ) -> tuple[int, Any]:
        head = {"Host": f"{self.host}:{self.port}", "Connection": "close",
                "Content-Length": str(len(body)), **(headers or {})}
        if token is not None:
            head["Authorization"] = f"Bearer {token}"
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items() if v is not None)
        data = f"{method} {path} HTTP/1.1\r\n{lines}".encode() + raw_headers + b"\r\n" + body
        with socket.create_connection((self.host, self.port), timeout=30) as sock:
            sock.sendall(data)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        status_line, _, rest = reply.partition(b"\r\n")
        head_text, _, payload = rest.partition(b"\r\n\r\n")
        self.last_headers = head_text.decode("latin-1")
        status = int(status_line.split()[1])
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def task_token(self, task_id: str) -> str:
        return Auth(self.token).task_token(int(task_id))

    def server_log(self) -> str:
        return (self.velda.home / "server.log").read_text(errors="replace")


@pytest.fixture
def raw(velda: Velda) -> Raw:
    return Raw(velda)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- files


def test_an_open_state_directory_is_made_private_at_start_with_one_warning(
    velda: Velda,
) -> None:
    task = velda.vbatch("echo", "secret output")
    velda.wait(task)
    velda.run("velda", "server", "stop", check=True)
    # as an older version, another umask or a careless chmod would have left it
    velda.home.chmod(0o755)
    for path in velda.home.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    velda.run("velda", "server", "start", check=True)

    warnings = [line for line in (velda.home / "server.log").read_text().splitlines()
                if "readable by other users" in line]
    assert len(warnings) == 1, warnings
    assert _mode(velda.home) == 0o700
    entries = list(velda.home.rglob("*"))
    assert {"velda.db", "token", "server.json", "server.log", "stdout", "stderr"} <= {
        p.name for p in entries}
    for path in entries:
        assert _mode(path) == (0o700 if path.is_dir() else 0o600), path


def test_new_files_are_private_from_the_start(velda: Velda) -> None:
    task = velda.vbatch("sh", "-c", "echo out; echo err >&2")
    velda.wait(task)
    home = velda.home
    attempt = home / "logs" / f"{task}.1"
    assert _mode(home) == 0o700 and _mode(home / "logs") == 0o700 and _mode(attempt) == 0o700
    for name in ("velda.db", "velda.db-wal", "velda.db-shm", "server.json", "server.log",
                 "token"):
        assert _mode(home / name) == 0o600, name
    for name in ("stdout", "stderr"):
        assert _mode(attempt / name) == 0o600, name
    log = (home / "server.log").read_text()
    assert "readable by other users" not in log


# --- task tokens


def test_a_final_tasks_token_reads_for_a_while_and_changes_nothing(raw: Raw) -> None:
    done = raw.velda.vbatch("true")
    raw.velda.wait(done)
    token = raw.task_token(done)
    assert raw.request("GET", f"/api/v1/tasks/{done}", token=token)[0] == 200
    assert raw.request("GET", f"/api/v1/tasks/{done}/logs", token=token)[0] == 200

    body = json.dumps({"command": ["true"], "cwd": str(raw.velda.cwd)}).encode()
    status, error = raw.request("POST", "/api/v1/tasks", body=body, token=token)
    assert status == 403 and "has ended" in error["error"], error
    for verb in ("cancel", "retry"):
        status, error = raw.request("POST", f"/api/v1/tasks/{done}/{verb}", token=token)
        assert status == 403 and "can no longer change anything" in error["error"], error
    assert raw.velda.children(done) == []


def test_a_token_is_refused_once_its_task_ended_longer_ago_than_the_grace(raw: Raw) -> None:
    import sqlite3

    done = raw.velda.vbatch("true")
    raw.velda.wait(done)
    raw.velda.run("velda", "server", "stop", check=True)
    with sqlite3.connect(raw.velda.home / "velda.db") as db:  # as if it ended 11 minutes ago
        db.execute("UPDATE tasks SET resolved_at = resolved_at - ? WHERE id = ?",
                   (TASK_TOKEN_GRACE_S + 60, int(done)))
    db.close()
    raw.velda.run("velda", "server", "start", check=True)
    raw.url = json.loads((raw.velda.home / "server.json").read_text())["url"]
    raw.port = urlsplit(raw.url).port or 80
    status, error = raw.request("GET", f"/api/v1/tasks/{done}", token=raw.task_token(done))
    assert status == 401 and "its token has expired" in error["error"], error
    assert raw.request("GET", f"/api/v1/tasks/{done}", token=raw.token)[0] == 200


def test_a_task_token_expires_after_the_grace_period() -> None:
    ended = 1000.0
    within = task_token_refusal(7, TaskStatus.SUCCESS, ended, False, ended + 60)
    assert within is None
    message, status = task_token_refusal(
        7, TaskStatus.SUCCESS, ended, False, ended + TASK_TOKEN_GRACE_S + 1) or ("", 0)
    assert status == 401 and "expired" in message
    for open_status in (TaskStatus.RUNNING, TaskStatus.RUNNING_SUBTASKS, TaskStatus.PENDING):
        assert task_token_refusal(7, open_status, None, True, ended + 10**6) is None


def test_a_token_acts_while_its_task_waits_for_children_and_again_once_retried(
    raw: Raw,
) -> None:
    velda = raw.velda
    parent = velda.vbatch("vbatch", "--name", "child", "sleep", "60")
    velda.wait(parent, until={"RUNNING_SUBTASKS"})
    child = velda.children(parent)[0]["id"]
    token = raw.task_token(parent)
    status, body = raw.request("POST", f"/api/v1/tasks/{child}/cancel", token=token)
    assert status == 200, body
    velda.wait(parent)

    marker = velda.cwd / "second-attempt"
    flaky = velda.vbatch("sh", "-c", f"test -e {marker} && sleep 60 || {{ touch {marker}; "
                         "exit 1; }")
    assert velda.wait(flaky)["status"] == "FAILURE"
    token = raw.task_token(flaky)
    assert raw.request("POST", f"/api/v1/tasks/{flaky}/cancel", token=token)[0] == 403
    velda.run("velda", "task", "retry", flaky, check=True)
    velda.wait(flaky, until={"RUNNING"})
    status, body = raw.request("POST", f"/api/v1/tasks/{flaky}/cancel", token=token)
    assert status == 200, body
    assert velda.wait(flaky)["status"] == "CANCELLED"


def test_a_task_token_cannot_cancel_a_sibling(raw: Raw) -> None:
    one = raw.velda.vbatch("sleep", "60")
    other = raw.velda.vbatch("sleep", "60")
    status, error = raw.request("POST", f"/api/v1/tasks/{other}/cancel",
                                token=raw.task_token(one))
    assert status == 403 and "outside this task's subtree" in error["error"]
    assert raw.velda.get(other)["status"] in ("QUEUED", "RUNNING")
    raw.velda.run("velda", "task", "cancel", one, check=True)
    raw.velda.run("velda", "task", "cancel", other, check=True)


def test_the_server_shows_its_home_only_to_the_server_token(raw: Raw) -> None:
    task = raw.velda.vbatch("sleep", "60")
    status, info = raw.request("GET", "/api/v1/server", token=raw.task_token(task))
    assert status == 200 and "home" not in info and info["url"] == raw.url
    status, info = raw.request("GET", "/api/v1/server", token=raw.token)
    assert info["home"] == str(raw.velda.home)
    raw.velda.run("velda", "task", "cancel", task, check=True)


# --- Origin and Host


def _session(raw: Raw) -> dict[str, str]:
    _, link = raw.request("POST", "/api/v1/login-links", token=raw.token)
    code = link["url"].split("code=", 1)[1]
    status, _ = raw.request("GET", f"/login?code={code}")
    assert status == 303
    cookies = {}
    for line in raw.last_headers.splitlines():
        if line.lower().startswith("set-cookie:"):
            name, _, rest = line.split(":", 1)[1].strip().partition("=")
            cookies[name] = rest.split(";", 1)[0]
    return cookies


def test_a_web_session_change_from_another_origin_is_refused(raw: Raw) -> None:
    cookies = _session(raw)
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()),
               "X-Velda-CSRF": cookies["velda_csrf"]}
    task = raw.velda.vbatch("sleep", "60")
    cancel = f"/api/v1/tasks/{task}/cancel"
    for evil in ({"Origin": "http://evil.example"},
                 {"Referer": "http://evil.example/page"},
                 {"Origin": f"http://{raw.host}:{raw.port + 1}"},
                 {}):
        status, error = raw.request("POST", cancel, headers={**headers, **evil})
        assert status == 403 and "origin" in error["error"].lower(), (evil, error)
    assert raw.velda.get(task)["status"] in ("QUEUED", "RUNNING")
    status, _ = raw.request("POST", cancel, headers={**headers, "Origin": raw.url})
    assert status == 200
    assert raw.velda.wait(task)["status"] == "CANCELLED"


def test_only_the_names_the_server_serves_are_answered(raw: Raw) -> None:
    port = raw.port
    for host in (f"evil.example:{port}", "evil.example", f"127.0.0.1.evil.example:{port}"):
        for path in ("/healthz", "/", "/api/v1/tasks"):
            status, error = raw.request("GET", path, headers={"Host": host}, token=raw.token)
            assert status == 421, (host, path, status)
            assert "does not answer to the host" in error["error"] and error["field"] == "host"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        status, _ = raw.request("GET", "/api/v1/tasks", headers={"Host": host}, token=raw.token)
        assert status == 200, host


def test_a_team_server_answers_to_its_allowed_hosts(velda: Velda) -> None:
    velda.configure('[server]\nallowed_hosts = ["velda.example.com"]\n'
                    'url = "http://head.example:7411"\n')
    raw = Raw(velda)
    for host in ("velda.example.com", "velda.example.com:443", f"head.example:{raw.port}"):
        assert raw.request("GET", "/healthz", headers={"Host": host})[0] == 200, host
    assert raw.request("GET", "/healthz", headers={"Host": "other.example"})[0] == 421


# --- credentials


def test_non_ascii_credentials_are_refused_without_a_traceback(raw: Raw) -> None:
    cases = [
        ("GET", "/api/v1/tasks", b"Authorization: Bearer \xc3\xa9\r\n", b""),
        ("GET", "/api/v1/tasks", b"Authorization: Bearer task.\xc2\xb2.abc\r\n", b""),
        ("GET", "/api/v1/tasks", b"Authorization: Bearer task.1.\xc3\xa9\r\n", b""),
        ("GET", "/api/v1/tasks", b"Authorization: Bearer task." + b"9" * 5000 + b".x\r\n", b""),
        ("GET", "/api/v1/tasks", b"Cookie: velda_session=4102444800.\xc3\xa9\r\n", b""),
        ("GET", "/api/v1/tasks", b"Cookie: velda_session=\xc2\xb2.abc\r\n", b""),
    ]
    for method, path, header, body in cases:
        status, error = raw.request(method, path, raw_headers=header, body=body)
        assert status == 401, (header, status, error)
    status, page = raw.request("GET", "/", raw_headers=cases[4][2])
    assert status == 303
    form = b"token=%C3%A9&next=%2F"
    status, page = raw.request(
        "POST", "/login", body=form,
        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 401 and b"not the server token" in page
    assert raw.request("GET", "/healthz")[0] == 200
    log = raw.server_log()
    assert "Traceback" not in log and "TypeError" not in log, log[-3000:]


# --- a pool that runs its tasks as another user


@pytest.fixture
def task_user() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("running tasks as another user needs root; these tests run as uid "
                    f"{os.geteuid()}")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        missing("useradd/userdel (the passwd package) are not installed")
    if shutil.which("setpriv") is None:
        missing("setpriv (util-linux) is not installed")
    name = f"vtest{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)


@pytest.fixture
def open_base() -> Iterator[Path]:
    """A home whose parent directories let another user through (pytest's are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="velda-sec-", dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_pool_with_user_runs_its_tasks_as_that_user(task_user: str, open_base: Path) -> None:
    velda = Velda(open_base / "home", open_base / "work")
    velda.cwd.chmod(0o755)
    try:
        velda.configure(f'[pools.isolated]\nengine = "local"\nuser = "{task_user}"\n')
        script = 'id -un; cat "$VELDA_HOME/token" || echo "token refused"; exit 3'
        task = velda.vbatch("-P", "isolated", "-e", f"VELDA_HOME={velda.home}",
                            "sh", "-c", script)
        done = velda.wait(task)
        out = velda.run("velda", "task", "log", task, "--stdout").stdout
        err = velda.run("velda", "task", "log", task, "--combined").stdout
        assert done["status"] == "FAILURE" and done["exit_code"] == 3, done
        assert out.splitlines()[0] == task_user, out
        assert "token refused" in out and velda.home.joinpath("token").read_text() not in out
        assert "Permission denied" in err, err
        assert _mode(velda.home) == 0o711 and _mode(velda.home / "token") == 0o600

        go = velda.cwd / "go"
        waits = velda.vbatch("-P", "isolated", "sh", "-c", f"until [ -e {go} ]; do sleep 0.1; "
                             "done; exit 4")
        long = velda.vbatch("-P", "isolated", "sleep", "60")
        velda.wait(waits, until={"RUNNING"})
        velda.wait(long, until={"RUNNING"})
        velda.kill_server()  # both are adopted by the next server
        assert velda.get(long)["status"] == "RUNNING"
        go.touch()
        assert velda.wait(waits)["exit_code"] == 4
        velda.run("velda", "task", "cancel", long, check=True)  # killpg from root
        assert velda.wait(long)["status"] == "CANCELLED"
    finally:
        velda.shutdown()


def test_a_pool_with_user_is_refused_unless_the_server_runs_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "velda.toml"
    path.write_text('[pools.isolated]\nuser = "root"\n')
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match=r"user = 'root': running tasks as another user "
                       r"needs the server to run as root \(it runs as uid 1000\)"):
        load_config(path)
    path.write_text('[pools.isolated]\nengine = "ray"\nuser = "root"\n')
    with pytest.raises(ConfigError, match="only local pools"):
        load_config(path)


def test_a_task_user_that_cannot_reach_the_state_directory_fails_saying_where(
    task_user: str, velda: Velda
) -> None:
    velda.configure(f'[pools.isolated]\nuser = "{task_user}"\n')
    task = velda.vbatch("-P", "isolated", "true")
    done = velda.wait(task)
    err = velda.run("velda", "task", "log", task, "--combined").stdout
    assert done["status"] == "FAILURE" and done["reason"] == "engine-error", done
    assert f"user {task_user} cannot enter " in err and "above the state directory" in err, err
