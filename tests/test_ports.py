"""Forwarded ports (server/ports.py, cli/port_forward.py): a task serving HTTP is reached at
http://127.0.0.1:LOCAL through `velda task port-forward` and `vrun -p`, from a local pool
and a Ray pool (a Slurm pool: test_slurm_pools.py); the task's JSON shows the port while it is
forwarded; the refusals (a token of another task, a task that is not running, nothing
listening) say why in one line. Real server, real commands, real HTTP servers as tasks."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

from forwarding import check_forward, forwarded, get, port_forward, serve, wait_forwarded
from ray_cluster import RayCluster
from velda_cli import Velda, cancel_open_tasks, default_signals, free_port

ONE_REQUEST = """
import http.server, sys
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the task"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), Hello)
server.handle_request()
print("served one request")
"""


def server_url(velda: Velda) -> str:
    return str(json.loads((velda.home / "server.json").read_text())["url"])


def task_token(velda: Velda, task_id: str) -> str:
    """The VELDA_TOKEN a running local task was given (velda keeps it out of the stored
    environment), read from its process's environment (the task of that ID of this test's
    server: another server on the machine may run one of the same ID)."""
    ours = {b"VELDA_TASK_ID": task_id.encode(), b"VELDA_SERVER": server_url(velda).encode()}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            pairs = dict(v.partition(b"=")[::2] for v in environ.read_bytes().split(b"\0"))
        except OSError:
            continue
        if ours.items() <= pairs.items() and b"VELDA_TOKEN" in pairs:
            return pairs[b"VELDA_TOKEN"].decode()
    raise AssertionError(f"no process of task {task_id} found")


def refusal(velda: Velda, path: str, token: str | None) -> tuple[int, str]:
    """The close code and reason the server's port websocket answers with."""
    url = server_url(velda).replace("http://", "ws://") + path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with connect(url, additional_headers=headers, proxy=None) as ws:
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=10)
    frame = closed.value.rcvd
    assert frame is not None
    return frame.code, frame.reason


# --- a local pool


def test_a_task_serving_http_is_reachable_through_port_forward(velda: Velda) -> None:
    port = free_port()
    task_id = serve(velda, port)
    check_forward(velda, task_id, port)
    velda.run("velda", "task", "cancel", task_id, check=True)


def test_port_forward_ends_with_the_task(velda: Velda) -> None:
    port = free_port()
    task_id = serve(velda, port)
    with port_forward(velda, task_id, f"{port}:0") as proc:
        wait_forwarded(velda, task_id, [{"port": port, "local": forwarded_local(velda, task_id)}])
        velda.run("velda", "task", "cancel", task_id, check=True)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert f"stopped: task {task_id} is no longer running (CANCELLED)" in err


def forwarded_local(velda: Velda, task_id: str) -> int:
    deadline = time.monotonic() + 15
    while not (found := forwarded(velda, task_id)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return int(found[0]["local"])


def vrun_serving_one_request(velda: Velda, *pool: str, python: str = sys.executable,
                             bind: str = "127.0.0.1", timeout: float = 30) -> str:
    """`vrun -p PORT:LOCAL` of a task that serves one HTTP request on PORT: the request goes
    through 127.0.0.1:LOCAL here, and vrun ends with the task. vrun's stderr."""
    port, local = free_port(), free_port()
    vrun = subprocess.Popen(
        ["vrun", *pool, "-p", f"{port}:{local}", python, "-c", ONE_REQUEST, bind, str(port)],
        cwd=velda.cwd, env=velda.env, text=True, stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_signals,
    )
    try:
        assert get(f"http://127.0.0.1:{local}/", timeout=timeout) == "hello from the task"
        out, err = vrun.communicate(timeout=timeout)
    finally:
        if vrun.poll() is None:
            vrun.kill()
            vrun.communicate()
    assert vrun.returncode == 0, err
    assert out == "served one request\n"
    assert f"forwarding http://127.0.0.1:{local} -> task " in err
    return err


def test_vrun_publishes_a_port_while_it_runs(velda: Velda) -> None:
    vrun_serving_one_request(velda)


def test_bad_publish_options_are_usage_errors(velda: Velda) -> None:
    result = velda.run("vrun", "-p", "http", "true")
    assert result.returncode == 2 and "-p: 'http' is not PORT[:LOCAL]" in result.stderr
    with socket_held() as held:
        result = velda.run("vrun", "-p", f"8000:{held}", "true")
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{held}" in result.stderr


@contextmanager
def socket_held() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_nothing_listening_is_said_in_one_line(velda: Velda) -> None:
    task_id = velda.vbatch("-q", "sleep", "60")
    velda.wait(task_id, until={"RUNNING"})
    port, local = free_port(), free_port()
    with port_forward(velda, task_id, f"{port}:{local}") as proc:
        get_fails(f"http://127.0.0.1:{local}/", proc)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert f"velda: nothing listens on port {port} in task {task_id}" in err
    velda.run("velda", "task", "cancel", task_id, check=True)


def get_fails(url: str, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while True:  # until the forwarder listens: then the connection is closed without answer
        try:
            urllib.request.urlopen(url, timeout=10).close()
        except urllib.error.URLError as e:
            if not isinstance(e.reason, ConnectionRefusedError):
                return
        except OSError as e:
            if not isinstance(e, ConnectionRefusedError):
                return
        else:
            raise AssertionError(f"GET {url} was answered")
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)


def test_a_task_that_is_not_running_is_refused(velda: Velda) -> None:
    task_id = velda.vbatch("-q", "-f", "true")
    result = velda.run("velda", "task", "port-forward", task_id, "8000")
    assert result.returncode == 2
    assert result.stderr.strip() == f"velda: task {task_id} is not running (SUCCESS)"
    code, reason = refusal(velda, f"/api/v1/tasks/{task_id}/ports/8000?local=8000",
                           (velda.home / "token").read_text().strip())
    assert (code, reason) == (4409, f"task {task_id} is not running (SUCCESS)")


def test_only_tokens_that_may_act_on_the_task_open_a_forward(velda: Velda) -> None:
    port = free_port()
    task_id = serve(velda, port)
    other = velda.vbatch("-q", "sleep", "60")
    velda.wait(other, until={"RUNNING"})
    token = task_token(velda, other)  # acts only in the subtree of `other`
    path = f"/api/v1/tasks/{task_id}/ports/{port}"
    assert refusal(velda, path, token) == (4403, f"task {task_id} is outside this task's subtree")
    assert refusal(velda, path, None) == (4401, "missing or invalid token")
    assert refusal(velda, path, "task.1.forged") == (4401, "missing or invalid token")
    env = {"VELDA_SERVER": server_url(velda), "VELDA_TOKEN": token}
    result = velda.run("velda", "task", "port-forward", task_id, str(port), env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == f"velda: task {task_id} is outside this task's subtree"
    # its own token may: a task can forward its own ports
    own = task_token(velda, task_id)
    local = free_port()
    with port_forward(velda, task_id, f"{port}:{local}", env={**env, "VELDA_TOKEN": own}):
        assert "hello.txt" in get(f"http://127.0.0.1:{local}/")
    for ref in (task_id, other):
        velda.run("velda", "task", "cancel", ref, check=True)


def test_a_task_token_forwards_a_port_of_its_own_subtree(velda: Velda) -> None:
    """From inside a task, with its token: the port of a child it started."""
    port, local = free_port(), free_port()
    (velda.cwd / "hello.txt").write_text("hi\n")
    script = (f"vbatch -q -n web python3 -m http.server {port} --bind 127.0.0.1 && "
              f"until velda task port-forward web {port}:{local}; do sleep 0.3; done")
    parent = velda.vbatch("-q", "sh", "-c", script)
    assert "hello.txt" in get(f"http://127.0.0.1:{local}/")
    velda.run("velda", "task", "cancel", parent, check=True)


def test_a_port_websocket_naming_another_host_is_refused(tmp_path: Path) -> None:
    """DNS rebinding: a page of another site must not reach a task's port through the
    server's loopback name either (doors.HostCheck covers websockets too)."""
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from velda.config import Config
    from velda.server.app import build_app
    from velda.server.auth import Auth
    from velda.server.runtime import Runtime
    from velda.store.sqlite import SqliteStore

    auth = Auth("t")
    runtime = Runtime(tmp_path, Config(), SqliteStore(tmp_path / "velda.db"), auth.task_token)
    client = TestClient(build_app(runtime, auth), base_url="http://127.0.0.1")
    headers = {"Authorization": "Bearer t"}
    with pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/api/v1/tasks/1/ports/80",
                                      headers={**headers, "Host": "evil.example:7411"}):
            pass
    assert refused.value.code == 1008 and "evil.example" in refused.value.reason
    with client.websocket_connect("ws://127.0.0.1/api/v1/tasks/1/ports/80", headers=headers) as ws:
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
    assert (closed.value.code, closed.value.reason) == (4404, "no task 1")


@pytest.mark.browser
def test_the_task_page_links_to_its_forwarded_port(
    signed_in: Any, velda: Velda, url: str
) -> None:
    from playwright.sync_api import expect

    port = free_port()
    task_id = serve(velda, port)
    local = free_port()
    signed_in.goto(f"{url}/tasks/{task_id}")
    ports = signed_in.locator("#details .ports a.port")
    expect(ports).to_have_count(0)
    with port_forward(velda, task_id, f"{port}:{local}"):
        expect(ports).to_have_attribute("href", f"http://127.0.0.1:{local}/", timeout=15_000)
        expect(ports).to_contain_text(f"127.0.0.1:{local}")
    expect(ports).to_have_count(0, timeout=15_000)
    velda.run("velda", "task", "cancel", task_id, check=True)


# --- a Ray pool


@pytest.fixture(scope="module")
def ray_velda(
    ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Velda]:
    root = tmp_path_factory.mktemp("ray-ports")
    v = Velda(root / "home", root / "work")
    v.configure(f'[pools.ray]\nengine = "ray"\naddress = "{ray_cluster.address}"\ncpus = 1\n')
    try:
        yield v
    finally:
        cancel_open_tasks(v)
        v.shutdown()


@pytest.mark.ray
def test_a_task_on_a_ray_node_is_reachable_through_port_forward(ray_velda: Velda) -> None:
    port = free_port()
    task_id = serve(ray_velda, port, "-P", "ray", bind="0.0.0.0")
    assert ray_velda.get(task_id)["pool"] == "ray"
    check_forward(ray_velda, task_id, port)
    ray_velda.run("velda", "task", "cancel", task_id, check=True)


@pytest.mark.ray
def test_vrun_publishes_a_port_of_a_ray_task(ray_velda: Velda) -> None:
    vrun_serving_one_request(ray_velda, "-P", "ray", python="python3", bind="0.0.0.0",
                             timeout=60)