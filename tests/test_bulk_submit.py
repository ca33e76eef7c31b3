"""Many tasks in one request: POST /api/v1/tasks:batch and velda.Client.submit_many."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest

from velda import Client
from velda.client import VeldaError
from velda_cli import Velda


@pytest.fixture
def client(velda: Velda, monkeypatch: pytest.MonkeyPatch) -> Client:
    """A velda.Client of this test's server, as a program on its machine makes one."""
    velda.run("velda", "server", "start", check=True)
    monkeypatch.setenv("VELDA_HOME", velda.env["VELDA_HOME"])
    monkeypatch.delenv("VELDA_SERVER", raising=False)
    monkeypatch.delenv("VELDA_TOKEN", raising=False)
    return Client(start=False)


def task(command: str, **fields: Any) -> dict[str, Any]:
    return {"command": ["sh", "-c", command], "cwd": "/", **fields}


def test_tasks_of_one_batch_run_in_order_and_may_name_each_other(
    client: Client, velda: Velda
) -> None:
    made = client.submit_many([
        task("echo one", name="first"),
        task("echo two", name="second", after_success=["first"]),
        task("exit 3", name="third"),
    ])
    assert [t["name"] for t in made] == ["first", "second", "third"]
    ids = [int(t["id"]) for t in made]
    assert ids == sorted(ids) and len(set(ids)) == 3
    first, second, third = (velda.wait(t["id"]) for t in made)
    assert (first["status"], second["status"], third["status"]) == (
        "SUCCESS", "SUCCESS", "FAILURE")
    assert second["depends_on"] == [{"id": made[0]["id"], "kind": "success"}]
    assert second["started_at"] >= first["finished_at"]
    assert velda.log(made[1]["id"]).stdout == "two\n"
    assert third["exit_code"] == 3


def test_one_bad_task_names_its_index_and_stores_none(client: Client, velda: Velda) -> None:
    before = client.list_tasks(all=1)["tasks"]
    with pytest.raises(VeldaError) as bad:
        client.submit_many([task("true"), task("true"), task("true", pool="nosuchpool")])
    assert bad.value.status == 400
    assert bad.value.field == "tasks[2].pool"
    assert str(bad.value).startswith("tasks[2]: unknown pool 'nosuchpool'")
    with pytest.raises(VeldaError) as unknown:
        client.submit_many([task("true", name="a"), task("true", after_success=["nosuch"])])
    assert unknown.value.field == "tasks[1].after_success"
    assert client.list_tasks(all=1)["tasks"] == before  # neither batch left anything


@pytest.mark.parametrize("body, field", [
    ({"tasks": []}, "tasks"),
    ({"tasks": "true"}, "tasks"),
    ({"task": [{"command": ["true"]}]}, "tasks"),
    ({"tasks": [{"command": ["true"]}, {"command": "true"}]}, "tasks[1].command"),
    ({"tasks": [{"command": ["true"], "priority": 1.5}]}, "tasks[0].priority"),
])
def test_malformed_batches_are_refused_naming_the_field(
    client: Client, body: dict[str, Any], field: str
) -> None:
    status, answer = _post(client, body)
    assert status == 400
    assert answer["field"] == field


def test_a_repeated_key_returns_the_same_tasks(client: Client) -> None:
    body = {"tasks": [task("true", name=f"k{i}") for i in range(3)]}
    first = _post(client, body, key="bulk-key-1")
    again = _post(client, body, key="bulk-key-1")
    assert first[0] == 201 and again[0] == 200
    assert [t["id"] for t in again[1]["tasks"]] == [t["id"] for t in first[1]["tasks"]]
    names = [t["name"] for t in client.list_tasks(all=1)["tasks"]]
    assert sorted(names) == ["k0", "k1", "k2"]


def test_thousands_in_one_request(client: Client, velda: Velda) -> None:
    gate = client.submit(command=["sleep", "60"], name="gate", cwd="/")
    made = client.submit_many(
        [task("true", name=f"shard-{i}", after_success=["gate"]) for i in range(3000)])
    assert len({t["id"] for t in made}) == 3000
    assert {t["status"] for t in made} == {"PENDING"}
    velda.run("velda", "task", "cancel", gate["id"], check=True)
    velda.wait(made[-1]["id"])
    ended = {t["id"] for t in _all_tasks(client, status="FAILED_UPSTREAM")}
    assert ended == {t["id"] for t in made}  # every one of the batch, and nothing else
    assert velda.get(made[0]["id"])["status"] == "FAILED_UPSTREAM"


def _all_tasks(client: Client, **query: Any) -> list[dict[str, Any]]:
    """Every task the listing has, page after page."""
    tasks: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.list_tasks(all=1, page_size=1000, page_token=token, **query)
        tasks += page["tasks"]
        token = page["next_page_token"]
        if token is None:
            return tasks


def test_a_batch_from_inside_a_task_makes_its_children(velda: Velda) -> None:
    script = ("from velda import Client; "
              "made = Client().submit_many([{'command': ['echo', str(i)], 'name': f'c{i}'} "
              "for i in range(5)]); print(len(made))")
    parent = velda.vbatch("-n", "parent", sys.executable, "-c", script)
    done = velda.wait(parent)
    assert done["status"] == "SUCCESS"
    assert done["children"]["total"] == 5 and done["children"]["succeeded"] == 5
    assert [c["name"] for c in velda.children(parent)] == [f"c{i}" for i in range(5)]


def _post(client: Client, body: Any, key: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(client.url + "/api/v1/tasks:batch", method="POST",
                                     data=json.dumps(body).encode())
    request.add_header("Authorization", f"Bearer {client.token}")
    if key:
        request.add_header("Idempotency-Key", key)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
