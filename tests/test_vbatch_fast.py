"""vbatch's fast path (velda.cli.fast_submit): the common `vbatch [options] CMD` submits the
same request as the full path, prints the same, and leaves everything else to it, under the
same idempotency key, so that nothing is ever submitted twice."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from velda.cli import fast_submit, submit
from velda_cli import BIN, Velda

COMMON = [
    ["true"],
    ["-q", "echo", "a b", "-q", "--pool", "x"],
    ["-P", "shell", "-n", "data/a.csv", "--after-success", "1", "--after-fail", "2", "--after",
     "p/q", "-l", "k=v=w", "--label", "e=", "--priority", "007", "--retries", "2",
     "--timeout", "30m", "--gang", "-C", "sub/../dir", "--quiet", "python", "t.py"],
    ["-e", "FAST_A=1", "--env", "FAST_B", "-e", "HOME", "--name", "", "--timeout", "", "x"],
    ["-n", "ünïcode ✓", "printf", "%s\\n", "\udcff surrogate"],
]
UNUSUAL = [
    [], ["-q"], ["-h"], ["--help"], ["-f", "true"], ["--follow", "true"], ["-N", "2", "true"],
    ["--pool=shell", "true"], ["-Pshell", "true"], ["-qf", "true"], ["--pri", "1", "true"],
    ["--", "true"], ["-n", "-x", "true"], ["-n"], ["--priority", "-1", "true"],
    ["--priority", "x", "true"], ["--retries", "²", "true"], ["-e", "FAST_UNSET", "true"],
    ["-l", "novalue", "true"], ["-l", "=v", "true"], ["--tty", "no", "true"], ["-", "true"],
]


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAST_B", "from the environment")
    monkeypatch.delenv("FAST_UNSET", raising=False)


@pytest.mark.parametrize("argv", COMMON)
def test_the_fast_request_is_the_full_paths_byte_for_byte(
    argv: list[str], environment: None
) -> None:
    p = submit.parser("vbatch", "", "", follow=True)
    args = p.parse_args(argv)
    parsed = fast_submit.parse(argv)
    assert parsed is not None
    assert parsed == (submit.request_of(p, args, blocking=False), args.quiet)
    assert fast_submit.encode(parsed[0]) == json.dumps(parsed[0]).encode()


@pytest.mark.parametrize("argv", UNUSUAL)
def test_anything_unusual_is_left_to_the_full_path(argv: list[str], environment: None) -> None:
    assert fast_submit.parse(argv) is None


def test_the_fast_path_imports_neither_argparse_nor_re(velda: Velda) -> None:
    velda.vbatch("true")  # the server runs: the next vbatch takes the fast path
    result = velda.run(sys.executable, "-X", "importtime", str(BIN / "vbatch"), "-q", "true",
                       check=True)
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "velda.cli.fast_submit" in imported
    assert not imported & {"argparse", "re", "socket", "json", "json.decoder", "velda.client"}


def test_fast_and_full_paths_store_the_same_task(velda: Velda) -> None:
    (velda.cwd / "sub").mkdir()
    script = "env | grep ^FAST_ | sort; pwd"
    options = ["-e", "FAST_SET=1", "-e", "FAST_PASSED", "-l", "k=v", "--priority", "3",
               "--retries", "1", "--timeout", "30m", "-C", "sub"]
    env = {"FAST_PASSED": "passed", "FAST_OTHER": "also sent"}
    fast = velda.run("vbatch", "-n", "fast", *options, "sh", "-c", script, env=env, check=True)
    full = velda.run("vbatch", "--name=full", *options, "sh", "-c", script, env=env, check=True)
    a, b = (velda.wait(r.stdout.strip()) for r in (fast, full))
    for field in ("status", "pool", "command", "cwd", "labels", "priority", "retries",
                  "timeout_s", "parent_id", "depends_on"):
        assert a[field] == b[field], field
    assert a["cwd"] == str(velda.cwd / "sub")
    assert velda.log(a["id"]).stdout == velda.log(b["id"]).stdout == (
        f"FAST_OTHER=also sent\nFAST_PASSED=passed\nFAST_SET=1\n{velda.cwd / 'sub'}\n")


def test_the_id_on_stdout_and_the_page_on_stderr_unless_quiet(velda: Velda) -> None:
    velda.vbatch("true")
    url = json.loads((velda.home / "server.json").read_text())["url"]
    loud = velda.run("vbatch", "echo", "hi", check=True)
    task_id = loud.stdout.strip()
    assert task_id.isdigit() and loud.stdout == f"{task_id}\n"
    assert loud.stderr == f"{url}/tasks/{task_id}\n"
    quiet = velda.run("vbatch", "-q", "echo", "hi", check=True)
    assert quiet.stdout.strip().isdigit() and quiet.stderr == ""
    assert velda.wait(task_id)["command"] == ["echo", "hi"]


def test_errors_are_the_full_paths_and_store_nothing(velda: Velda) -> None:
    velda.vbatch("true")
    for bad in (["-P", "no-such-pool"], ["--timeout", "soon"], ["-n", "x" * 201]):
        refused = velda.run("vbatch", *bad, "true")  # refused by the server
        assert refused.returncode == 2 and refused.stdout == "", bad
        assert refused.stderr.startswith("vbatch: ") and len(refused.stderr.splitlines()) == 1
    unset = velda.run("vbatch", "-e", "FAST_UNSET", "true")
    assert unset.returncode == 2 and "-e FAST_UNSET: not set in this environment" in unset.stderr
    assert velda.run("vbatch").returncode == 2
    assert "usage: vbatch" in velda.run("vbatch", "--help", check=True).stdout
    listed = json.loads(velda.run("velda", "task", "list", "-o", "json", check=True).stdout)
    assert len(listed["tasks"]) == 1


def test_a_vbatch_in_a_task_is_its_child(velda: Velda) -> None:
    parent = velda.vbatch("sh", "-c", "vbatch -q --name child echo from the child")
    assert velda.wait(parent)["status"] == "SUCCESS"
    child = velda.wait(f"{parent}/child")
    assert child["parent_id"] == parent and child["command"] == ["echo", "from", "the", "child"]
    assert velda.log(parent).stdout == f"{child['id']}\n"


def test_with_no_server_running_vbatch_starts_one(velda: Velda) -> None:
    velda.vbatch("true")
    velda.kill_server()  # server.json names a dead process: the full path starts another
    task_id = velda.vbatch("echo", "again")
    assert velda.wait(task_id)["command"] == ["echo", "again"]
    listed = json.loads(velda.run("velda", "task", "list", "-o", "json", check=True).stdout)
    assert [t["command"] for t in listed["tasks"]] == [["echo", "again"], ["true"]]


def test_a_vbatch_waits_out_a_server_outage(velda: Velda) -> None:
    velda.vbatch("true")
    url = json.loads((velda.home / "server.json").read_text())["url"]
    # a team server, which this client may not start itself: it waits for it
    team = {"VELDA_SERVER": url, "VELDA_TOKEN": (velda.home / "token").read_text().strip(),
            "VELDA_HOME": str(velda.home / "none")}
    velda.run("velda", "server", "stop", check=True)
    proc = subprocess.Popen(["vbatch", "echo", "after"], env={**velda.env, **team},
                            cwd=velda.cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    assert proc.stderr.readline().startswith("velda server unreachable, retrying")
    velda.run("velda", "server", "start", check=True)  # the same home takes its port back
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err == f"{url}/tasks/{out.strip()}\n"
    assert velda.wait(out.strip())["command"] == ["echo", "after"]


def test_an_answer_lost_after_the_submit_makes_no_second_task(velda: Velda) -> None:
    velda.vbatch("true")
    url = json.loads((velda.home / "server.json").read_text())["url"]
    token = (velda.home / "token").read_text().strip()
    with proxy_dropping_the_first_answer(url) as proxy:
        team = {"VELDA_SERVER": proxy.url, "VELDA_TOKEN": token}
        result = velda.run("vbatch", "-q", "echo", "once", env=team, check=True)
    assert proxy.exchanges == 2  # the fast path's, then the full path's under the same key
    assert velda.wait(result.stdout.strip())["command"] == ["echo", "once"]
    listed = json.loads(velda.run("velda", "task", "list", "-o", "json", check=True).stdout)
    assert [t["command"] for t in listed["tasks"]] == [["echo", "once"], ["true"]]


class Proxy:
    """Forwards each HTTP/1.0 exchange to the server, but drops the first answer: as if the
    server had died just after storing the task."""

    def __init__(self, target: str) -> None:
        host, _, port = target.split("://", 1)[1].rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.exchanges = 0
        self.stopped = threading.Event()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            with client:
                client.settimeout(30)
                self.exchanges += 1
                answer = self.forward(read_request(client))
                if self.exchanges > 1:
                    client.sendall(answer)

    def forward(self, request: bytes) -> bytes:
        with socket.create_connection(self.target, timeout=30) as server:
            server.sendall(request)
            chunks = []
            while data := server.recv(65536):
                chunks.append(data)
        return b"".join(chunks)


def read_request(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@contextmanager
def proxy_dropping_the_first_answer(target: str) -> Iterator[Proxy]:
    proxy = Proxy(target)
    thread = threading.Thread(target=proxy.serve, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.stopped.set()
        thread.join(5)
        proxy.listener.close()
