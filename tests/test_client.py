"""velda.Client as a program uses it: many calls in a row go over one kept connection, and a
connection the server closed (idle too long, or a restart) is replaced without a word."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from velda import Client, wire
from velda_cli import Velda

KEEP_ALIVE_S = 5  # how long the server keeps an idle connection (uvicorn's default)


@pytest.fixture
def client(velda: Velda, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    velda.run("velda", "server", "start", check=True)
    monkeypatch.setenv("VELDA_HOME", velda.env["VELDA_HOME"])
    monkeypatch.delenv("VELDA_SERVER", raising=False)
    monkeypatch.delenv("VELDA_TOKEN", raising=False)
    yield Client(start=False)
    velda.run("velda", "server", "stop")


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """The TCP connections the client opens (each one a handshake and a new server-side
    connection)."""
    opened: list[tuple[Any, ...]] = []
    real = socket.create_connection

    def counting(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        opened.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(wire.socket, "create_connection", counting)
    return opened


def test_calls_in_a_row_share_one_connection(
    client: Client, velda: Velda, connects: list[tuple[Any, ...]]
) -> None:
    ids = [client.submit(command=["echo", str(n)], cwd=str(velda.cwd))["id"] for n in range(20)]
    assert len(set(ids)) == 20
    for n, task_id in enumerate(ids):
        assert velda.wait(task_id)["status"] == "SUCCESS"
        assert client.get(task_id)["id"] == task_id
        assert client.logs(task_id, "stdout") == f"{n}\n".encode()  # a streamed answer
    assert client.list_tasks(all=1)["tasks"]
    assert len(connects) == 1


def test_a_connection_the_server_closed_while_idle_is_replaced(
    client: Client, velda: Velda, connects: list[tuple[Any, ...]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = client.submit(command=["true"], cwd=str(velda.cwd))["id"]
    time.sleep(KEEP_ALIVE_S + 1)
    started = time.monotonic()
    assert client.get(first)["id"] == first
    assert time.monotonic() - started < 1  # no waiting for a server thought gone
    assert "retrying" not in capsys.readouterr().err
    assert len(connects) == 2


def test_the_client_goes_on_with_a_restarted_server(client: Client, velda: Velda) -> None:
    task_id = client.submit(command=["true"], cwd=str(velda.cwd))["id"]
    velda.run("velda", "server", "stop", check=True)
    velda.run("velda", "server", "start", check=True)  # on another port: VELDA_PORT=0
    assert client.get(task_id)["id"] == task_id
    again = client.submit(command=["true"], cwd=str(velda.cwd))["id"]
    assert int(again) > int(task_id)
