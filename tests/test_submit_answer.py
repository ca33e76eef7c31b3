"""The answer to a submit is the task as a read of it right after says, however the submit
went: waiting, decided at once by its dependencies, a shard set, or a repeat of an earlier one."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from velda.config import Config
from velda.models import Task, TaskStatus
from velda.protocol import SubmitRequest
from velda.server.app import build_app
from velda.server.auth import Auth
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore

AUTH = {"Authorization": "Bearer server-token"}
S = TaskStatus


class World:
    """The app in-process over a real store that holds an ended task and a running one
    (stored RUNNING, with no process: nothing waiting on it ever starts)."""

    def __init__(self, home: Path) -> None:
        self.store = SqliteStore(home / "velda.db")
        self.ended = self._stored(S.SUCCESS)
        self.running = self._stored(S.RUNNING)
        auth = Auth("server-token")
        self.runtime = Runtime(home, Config(), self.store, auth.task_token)
        self.app = build_app(self.runtime, auth)

    def _stored(self, status: TaskStatus) -> int:
        return self.store.insert(
            Task(id=0, pool="shell", command=["true"], cwd="/", env={}, status=status,
                 created_at=1.0, started_at=1.0, attempt=1)
        )


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(world.app, base_url="http://127.0.0.1") as c:
        yield c


def submitted(client: TestClient, body: dict[str, Any], key: str | None = None,
              status: int = 201) -> dict[str, Any]:
    headers = {**AUTH, **({"Idempotency-Key": key} if key else {})}
    response = client.post("/api/v1/tasks", json={"cwd": "/", **body}, headers=headers)
    assert response.status_code == status, response.text
    answer: dict[str, Any] = response.json()
    answer.pop("notice", None)
    return answer


def read(client: TestClient, task_id: str) -> dict[str, Any]:
    response = client.get(f"/api/v1/tasks/{task_id}", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("body", "status", "children"),
    [
        ({"command": ["true"], "after": ["{running}"]}, "PENDING", 0),
        ({"command": ["true"], "after_fail": ["{ended}"]}, "SKIPPED", 0),
        ({"command": ["true"], "after_success": ["{ended}"], "after": ["{running}"]},
         "PENDING", 0),
        ({"command": ["true"], "total_shards": 3, "after": ["{running}"]}, "PENDING", 3),
        ({"command": ["true"], "total_shards": 2, "after_fail": ["{ended}"]}, "SKIPPED", 2),
    ],
)
def test_the_answer_is_the_task_as_stored(
    world: World, client: TestClient, body: dict[str, Any], status: str, children: int
) -> None:
    refs = {"running": world.running, "ended": world.ended}
    for field in ("after", "after_success", "after_fail"):
        if field in body:
            body[field] = [ref.format(**refs) for ref in body[field]]
    answer = submitted(client, body)
    assert (answer["status"], answer["children"]["total"]) == (status, children)
    stored = read(client, answer["id"])
    assert answer == {k: stored[k] for k in answer}


def test_a_repeat_answers_the_children_made_since(world: World, client: TestClient) -> None:
    first = submitted(client, {"command": ["true"], "after": [str(world.running)]}, key="k")
    assert first["children"]["total"] == 0
    world.store.insert(  # as a process of it would submit one, from inside it
        Task(id=0, pool="shell", command=["true"], cwd="/", env={}, parent_id=int(first["id"]),
             status=S.QUEUED, created_at=2.0)
    )
    again = submitted(client, {"command": ["true"], "after": [str(world.running)]}, key="k",
                      status=200)
    assert again["id"] == first["id"]
    assert (again["children"]["total"], again["children"]["queued"]) == (1, 1)


def test_the_runtime_says_which_submit_made_the_task(world: World) -> None:
    req = SubmitRequest(command=["true"], after=[str(world.running)])
    made, was_made = asyncio.run(world.runtime.submit_or_find(req, None, "key"))
    found, found_made = asyncio.run(world.runtime.submit_or_find(req, None, "key"))
    assert (was_made, found_made) == (True, False)
    assert found.id == made.id and world.store.last_id() == made.id
