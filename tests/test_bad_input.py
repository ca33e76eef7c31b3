"""Bad input is refused at the door: a 4xx JSON error naming the field, nothing stored, the
server still up. A row that got into the store anyway never breaks a read. Big shard sets are
made and cancelled in bulk."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from velda.config import Config
from velda.models import Task, TaskStatus
from velda.server.app import build_app
from velda.server.auth import Auth
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore
from velda_cli import Velda

TOKEN = "server-token"
HUGE = "9" * 23  # beyond 64 bits
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Door:
    """The app in-process over a real store, with a task already in it (ID 1, ended)."""

    def __init__(self, home: Path, config: Config) -> None:
        self.store = SqliteStore(home / "velda.db")
        self.store.insert(
            Task(id=0, pool="shell", command=["true"], cwd="/", env={},
                 status=TaskStatus.SUCCESS, created_at=1.0, attempt=1)
        )
        auth = Auth(TOKEN)
        self.runtime = Runtime(home, config, self.store, auth.task_token)
        self.app = build_app(self.runtime, auth)

    def refused(self, client: TestClient, method: str, path: str, field: str | None,
                status: int = 400, **kwargs: Any) -> dict[str, Any]:
        """The request is refused with `status`, naming `field`; nothing was stored."""
        before = self.store.count()
        response = client.request(method, path, headers=AUTH, **kwargs)
        body = response.json()
        assert response.status_code == status, body
        assert body["field"] == field, body
        assert body["error"], body
        assert self.store.count() == before
        listed = client.get("/api/v1/tasks", headers=AUTH)
        assert listed.status_code == 200 and listed.json()["tasks"]
        return body  # type: ignore[no-any-return]


@pytest.fixture
def door(tmp_path: Path) -> Door:
    return Door(tmp_path, Config())


@pytest.fixture
def client(door: Door) -> Iterator[TestClient]:
    with TestClient(door.app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        yield c


def submit(door: Door, client: TestClient, field: str | None, raw: str | bytes,
           status: int = 400) -> dict[str, Any]:
    return door.refused(client, "POST", "/api/v1/tasks", field, status, content=raw)


@pytest.mark.parametrize(
    "timeout",
    [f'"{"9" * 400}s"', "Infinity", "-Infinity", "NaN", '"31d"', "1e400", "9" * 400, "0", '""x'],
)
def test_a_timeout_must_be_finite_and_at_most_30_days(
    door: Door, client: TestClient, timeout: str
) -> None:
    raw = f'{{"command": ["true"], "timeout": {timeout}}}'
    field = None if timeout == '""x' else "timeout"  # the last one is not JSON at all
    submit(door, client, field, raw)


LONE = "\\udc80"  # as JSON spells it: valid JSON, not valid UTF-8


@pytest.mark.parametrize(
    ("field", "fragment"),
    [
        ("command", f'"command": ["echo", "{LONE}"]'),
        ("labels", f'"labels": {{"k": "{LONE}"}}'),
        ("labels", f'"labels": {{"{LONE}": "v"}}'),
        ("pool", f'"pool": "{LONE}"'),
        ("name", f'"name": "a{LONE}"'),
        ("after_success", f'"after_success": ["{LONE}"]'),
        ("after_fail", f'"after_fail": ["{LONE}"]'),
        ("after", f'"after": ["{LONE}"]'),
        ("env", f'"env": {{"A": "{LONE}"}}'),
        ("env", f'"env": {{"{LONE}": "x"}}'),
        ("cwd", f'"cwd": "/{LONE}"'),
        ("command", '"command": ["echo", "a\\u0000b"]'),
        ("env", '"env": {"A": "a\\u0000b"}'),
        ("cwd", '"cwd": "/tmp\\u0000"'),
    ],
)
def test_text_must_be_utf8_without_nul(
    door: Door, client: TestClient, field: str, fragment: str
) -> None:
    base = '"command": ["true"], ' if not fragment.startswith('"command"') else ""
    submit(door, client, field, "{" + base + fragment + "}")


@pytest.mark.parametrize("key", ["", "=x", "A=B", "A\\u0000"])
def test_env_keys_must_be_variable_names(door: Door, client: TestClient, key: str) -> None:
    body = submit(door, client, "env", f'{{"command": ["true"], "env": {{"{key}": "v"}}}}')
    assert "not a valid variable name" in body["error"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("total_shards", 10_001), ("total_shards", 0), ("priority", 10**10), ("retries", 10**6),
     ("priority", 1.5), ("retries", True)],
)
def test_numbers_are_bounded(door: Door, client: TestClient, field: str, value: object) -> None:
    submit(door, client, field, json.dumps({"command": ["true"], field: value}))


def test_an_integer_of_5000_digits_is_a_400(door: Door, client: TestClient) -> None:
    body = submit(door, client, None, '{"command": ["true"], "retries": ' + "9" * 5000 + "}")
    assert "not JSON" in body["error"]


def test_a_deeply_nested_body_is_a_400(door: Door, client: TestClient) -> None:
    body = submit(door, client, None, "[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in body["error"]


def test_a_body_past_the_limit_is_a_413(door: Door, client: TestClient) -> None:
    big = json.dumps({"command": ["echo", "x" * (11 * 1024 * 1024)]})
    body = submit(door, client, None, big, status=413)
    assert "10485760 bytes" in body["error"]


def test_the_body_limit_is_configurable(tmp_path: Path) -> None:
    (tmp_path / "velda.toml").write_text("[server]\nmax_request_bytes = 1000\n")
    from velda.config import load_config

    door = Door(tmp_path, load_config(tmp_path / "velda.toml"))
    with TestClient(door.app, base_url="http://127.0.0.1") as client:
        raw = json.dumps({"command": ["echo", "x" * 2000]})
        assert "1000 bytes" in submit(door, client, None, raw, 413)["error"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/api/v1/tasks/{HUGE}"),
        ("GET", f"/api/v1/tasks/{HUGE}/logs"),
        ("GET", f"/api/v1/tasks/{HUGE}/output"),
        ("GET", f"/api/v1/tasks/{HUGE}/events"),
        ("POST", f"/api/v1/tasks/{HUGE}/cancel"),
        ("POST", f"/api/v1/tasks/{HUGE}/retry"),
        ("POST", f"/api/v1/tasks/{HUGE}/signal"),
    ],
)
def test_ids_beyond_63_bits_in_a_path(
    door: Door, client: TestClient, method: str, path: str
) -> None:
    door.refused(client, method, path, "id")


@pytest.mark.parametrize(
    ("query", "field"),
    [
        (f"page_token={HUGE}", "page_token"),
        (f"parent={HUGE}", "parent"),
        ("page_token=%C2%B2", "page_token"),
        ("page_size=0", "page_size"),
        (f"page_size={HUGE}", "page_size"),
        ("status=nosuch", "status"),
        ("label=novalue", "labels"),
    ],
)
def test_bad_list_queries(door: Door, client: TestClient, query: str, field: str) -> None:
    door.refused(client, "GET", f"/api/v1/tasks?{query}", field)


@pytest.mark.parametrize("ref", [HUGE, "%C2%B2", "%ED%B2%80"])
def test_refs_that_name_nothing_are_a_404(door: Door, client: TestClient, ref: str) -> None:
    door.refused(client, "GET", f"/api/v1/resolve?ref={ref}", "ref", 404)


@pytest.mark.parametrize(
    ("query", "field"),
    [(f"offset={HUGE}", "offset"), ("offset=-1", "offset"), ("attempt=0", "attempt"),
     (f"attempt={HUGE}", "attempt"), ("stream=stdin", "stream")],
)
def test_bad_log_queries(door: Door, client: TestClient, query: str, field: str) -> None:
    door.refused(client, "GET", f"/api/v1/tasks/1/logs?{query}", field)


def test_an_offset_past_any_file_reads_nothing(client: TestClient) -> None:
    response = client.get(f"/api/v1/tasks/1/logs?offset={2**63 - 1}", headers=AUTH)
    assert response.status_code == 200 and response.content == b""


@pytest.mark.parametrize("signal", ["true", '"9"', "1e3", "99999999999999999999999"])
def test_a_signal_must_be_a_signal_number(
    door: Door, client: TestClient, signal: str
) -> None:
    door.refused(client, "POST", "/api/v1/tasks/1/signal", "signal",
                 content=f'{{"signal": {signal}}}')


def test_a_path_with_a_non_ascii_digit_is_a_json_404(client: TestClient) -> None:
    response = client.get("/api/v1/tasks/%C2%B2", headers=AUTH)
    assert response.status_code == 404 and "no such path" in response.json()["error"]


# ---- stored rows that a check at the door would refuse ---------------------------------------


def _write_bad_rows(db_path: Path) -> None:
    """Rows as a store from before these checks may hold them (its user_version is 0)."""
    db = sqlite3.connect(db_path)
    db.execute("PRAGMA user_version = 0")
    cols = "status, pool, command, env, cwd, labels, created_at, timeout_s, name"
    db.executemany(
        f"INSERT INTO tasks ({cols}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("SUCCESS", "shell", '["echo", "\\udc80"]', '{"A": "\\udc80"}', "/",
             '{"k": "\\udc80"}', 1.0, float("inf"), "surrogates"),
            ("NO_SUCH_STATUS", "shell", "not json", "{", "/", "[1,", 2.0, -5.0, "broken"),
        ],
    )
    db.execute(
        f"INSERT INTO tasks ({cols}) VALUES ('SUCCESS', 'shell', '[]', '{{}}', '/', '{{}}', "
        "3.0, NULL, CAST(x'eda080ff' AS TEXT))"
    )
    db.commit()
    db.close()


def test_bad_rows_are_shown_safely_and_repaired_at_start(velda: Velda) -> None:
    velda.run("velda", "server", "start", check=True)
    velda.run("velda", "server", "stop", check=True)
    _write_bad_rows(velda.home / "velda.db")
    listed = velda.run("velda", "task", "list", "-o", "json", check=True)  # starts the server
    tasks = {t["name"]: t for t in json.loads(listed.stdout)["tasks"]}
    assert tasks["surrogates"]["command"] == ["echo", "\ufffd"]
    assert tasks["surrogates"]["timeout_s"] is None
    assert tasks["broken"]["status"] == "FAILURE" and tasks["broken"]["command"] == ["not json"]
    assert len(tasks) == 3  # the row whose name is not UTF-8 lists too
    for task in tasks.values():
        velda.run("velda", "task", "get", task["id"], "-o", "json", check=True)
        velda.run("velda", "task", "log", task["id"], check=True)
    assert velda.get(tasks["surrogates"]["id"])["env"] == {"A": "\ufffd"}
    rows = sqlite3.connect(velda.home / "velda.db").execute(
        "SELECT command, env, labels, timeout_s, status FROM tasks ORDER BY id"
    ).fetchall()
    assert rows[0] == ('["echo", "\\ufffd"]', '{"A": "\\ufffd"}', '{"k": "\\ufffd"}', None,
                       "SUCCESS")
    assert rows[1] == ('["not json"]', "{}", "{}", None, "FAILURE")


# ---- the real CLI --------------------------------------------------------------------------


def test_the_cli_gets_one_line_naming_the_field(velda: Velda) -> None:
    cases = [
        (("vbatch", "--timeout", "9" * 400 + "s", "true"), "timeout"),
        (("vbatch", "-e", "=x", "echo", "hi"), "env: '' is not a valid variable name"),
        (("vbatch", "-N", "10001", "true"), "total_shards"),
        (("velda", "task", "get", "²"), "no task named '²'"),
        (("velda", "task", "get", HUGE), "id: must be from 0 to 9223372036854775807"),
        (("velda", "task", "list", "-o", "id,nosuchfield"), "no field 'nosuchfield'"),
    ]
    for argv, named in cases:
        result = velda.run(*argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert named in result.stderr and len(result.stderr.strip().splitlines()) == 1, argv
    assert "Invalid HTTP request" not in velda.run("velda", "task", "get", "²").stderr
    fields = velda.run("velda", "task", "list", "-o", "nosuchfield").stderr
    assert "id,name,status" in fields
    assert json.loads(velda.run("velda", "task", "list", "-o", "json").stdout)["tasks"] == []


def test_ten_thousand_shards_are_made_and_cancelled_in_bulk(velda: Velda) -> None:
    parent = velda.vbatch("-N", "10000", "sleep", "300")
    velda.run("velda", "task", "cancel", parent, check=True)
    task = velda.wait(parent, timeout=120)
    assert task["status"] == "CANCELLED"
    assert task["children"]["total"] == 10_000 and task["children"]["cancelled"] == 10_000
    page = velda.run("velda", "task", "list", parent, "--max-results", "1000", "-o", "json")
    shards = json.loads(page.stdout)["tasks"]
    assert len(shards) == 1000 and {s["status"] for s in shards} == {"CANCELLED"}
    assert shards[0]["name"] == "0" and shards[-1]["name"] == "999"
    url = json.loads((velda.home / "server.json").read_text())["url"]
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as response:
        assert response.status == 200
