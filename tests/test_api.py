"""The HTTP API: tokens, bad input answered with a 4xx naming the field, never a 500."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from velda_cli import Velda


class Api:
    def __init__(self, velda: Velda) -> None:
        velda.run("velda", "server", "start", check=True)
        self.url = json.loads((velda.home / "server.json").read_text())["url"]
        self.token = (velda.home / "token").read_text().strip()
        self.cwd = str(velda.cwd)

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = "server",
        raw: bytes | None = None,
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if token is not None:
            secret = self.token if token == "server" else token
            request.add_header("Authorization", f"Bearer {secret}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read()
                status = response.status
        except urllib.error.HTTPError as e:
            text, status = e.read(), e.code
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Velda]:
    """One server for this module: these tests only read, or add independent tasks."""
    root = tmp_path_factory.mktemp("api")
    velda = Velda(root / "home", root / "work")
    yield velda
    velda.shutdown()


@pytest.fixture(scope="module")
def api(server: Velda) -> Api:
    return Api(server)


def test_health_needs_no_token_and_everything_else_does(api: Api) -> None:
    assert api.call("GET", "/healthz", token=None) == (200, {"ok": True})
    for path in ("/api/v1/tasks", "/api/v1/pools", "/api/v1/server", "/metrics"):
        status, body = api.call("GET", path, token=None)
        assert status == 401 and body["error"] == "missing or invalid token"
    assert api.call("GET", "/api/v1/tasks", token="wrong")[0] == 401
    assert api.call("GET", "/api/v1/tasks", token="task.1.forged")[0] == 401


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"command": "echo hi"}, "command"),
        ({"command": ["true"], "pool": 3}, "pool"),
        ({"command": ["true"], "priority": "high"}, "priority"),
        ({"command": ["true"], "retries": -1}, "retries"),
        ({"command": ["true"], "timeout": "soon"}, "timeout"),
        ({"command": ["true"], "name": "x" * 201}, "name"),
        ({"command": ["true"], "labels": {"a": 1}}, "labels"),
        ({"command": ["true"], "env": ["A=1"]}, "env"),
        ({"command": ["true"], "cwd": "relative"}, "cwd"),
        ({"command": ["true"], "cwd": "/no/such/dir"}, "cwd"),
        ({"command": ["true"], "colour": "red"}, "colour"),
        ({"command": ["true"], "total_shards": 0}, "total_shards"),
        ({"command": ["true"], "gang": True}, "gang"),
        ({"command": ["true"], "after_success": ["ghost"]}, "after_success"),
        ({"command": ["true"], "pool": "nope"}, "pool"),
        ({"command": []}, "command"),
        ({"command": ["a\u0000b"]}, "command"),
    ],
)
def test_bad_submissions_name_the_field(api: Api, body: dict[str, Any], field: str) -> None:
    status, answer = api.call("POST", "/api/v1/tasks", {"cwd": api.cwd, **body})
    assert 400 <= status < 500, answer
    assert answer["field"] == field
    assert "\n" not in answer["error"]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status"),
    [
        ("POST", "/api/v1/tasks", b"{not json", 400),
        ("POST", "/api/v1/tasks", b"[1, 2]", 400),
        ("POST", "/api/v1/tasks", b"\xff\xfe", 400),
        ("GET", "/api/v1/tasks?page_size=0", None, 400),
        ("GET", "/api/v1/tasks?page_size=abc", None, 400),
        ("GET", "/api/v1/tasks?status=DONE", None, 400),
        ("GET", "/api/v1/tasks?label=novalue", None, 400),
        ("GET", "/api/v1/tasks?parent=999999", None, 200),
        ("GET", "/api/v1/tasks/999999", None, 404),
        ("GET", "/api/v1/tasks/abc", None, 404),
        ("GET", "/api/v1/resolve?ref=", None, 400),
        ("GET", "/api/v1/resolve?ref=ghost", None, 404),
        ("POST", "/api/v1/tasks/999999/cancel", b"{}", 404),
        ("POST", "/api/v1/tasks/999999/signal", b'{"signal": 2}', 404),
        ("DELETE", "/api/v1/tasks", None, 405),
        ("GET", "/api/v1/nothing", None, 404),
    ],
)
def test_malformed_requests_get_a_json_4xx(
    api: Api, method: str, path: str, raw: bytes | None, status: int
) -> None:
    got, answer = api.call(method, path, raw=raw)
    assert got == status, answer
    if status >= 400:
        assert isinstance(answer, dict) and answer["error"]
    assert api.call("GET", "/healthz")[0] == 200  # the server stays up


def test_submit_get_list_and_logs_through_the_api(api: Api, server: Velda) -> None:
    status, task = api.call("POST", "/api/v1/tasks", {
        "command": ["sh", "-c", "echo out; echo err >&2"], "cwd": api.cwd, "name": "api",
        "labels": {"via": "api"}, "env": {"SECRET_KEY": "hunter2", "PATH": "/usr/bin:/bin"},
    })
    assert status == 201
    assert set(task) >= {
        "id", "name", "status", "pool", "command", "parent_id", "labels", "priority", "attempt",
        "exit_code", "signal", "reason", "created_at", "started_at", "finished_at",
        "resolved_at", "depends_on", "children",
    }
    detail = api.call("GET", f"/api/v1/tasks/{task['id']}")[1]
    assert detail["env"]["SECRET_KEY"] == "********"
    assert detail["env"]["PATH"] == "/usr/bin:/bin"
    server.wait(task["id"])
    assert api.call("GET", f"/api/v1/tasks/{task['id']}/logs?stream=stdout")[1] == b"out\n"
    assert api.call("GET", f"/api/v1/tasks/{task['id']}/logs?stream=stderr")[1] == b"err\n"
    assert api.call("GET", f"/api/v1/tasks/{task['id']}/logs?stream=stdout&offset=2")[1] == b"t\n"
    status, listed = api.call("GET", "/api/v1/tasks?label=via=api")
    assert [t["id"] for t in listed["tasks"]] == [task["id"]]
    status, again = api.call("POST", f"/api/v1/tasks/{task['id']}/retry", {})
    assert status == 409 and "nothing to retry" in again["error"]


def test_openapi_and_metrics(api: Api) -> None:
    status, doc = api.call("GET", "/api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert {"/api/v1/tasks", "/api/v1/tasks/{id}/logs", "/api/v1/pools"} <= set(doc["paths"])
    api.call("POST", "/api/v1/tasks", {"command": ["true"], "cwd": api.cwd})
    status, text = api.call("GET", "/metrics")
    assert status == 200 and b"velda_tasks{status=" in text


def test_events_stream_ends_with_the_final_task(api: Api) -> None:
    _, task = api.call("POST", "/api/v1/tasks", {"command": ["sleep", "0.3"], "cwd": api.cwd})
    status, body = api.call("GET", f"/api/v1/tasks/{task['id']}/events")
    assert status == 200
    events = [json.loads(line[6:]) for line in body.decode().splitlines()
              if line.startswith("data: ")]
    assert events[-1]["status"] == "SUCCESS"
    assert len({e["status"] for e in events}) >= 2
