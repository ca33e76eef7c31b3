"""velda.Client as a program uses it: many calls in a row go over one kept connection, and a
connection the server closed (idle too long, or a restart) is replaced without a word."""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
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


def test_output_frames_come_whole_however_the_chunks_cut_them(tmp_path: Path) -> None:
    """A frame of output may come within one HTTP chunk (read as it is) or across several,
    cut anywhere; either way each comes out byte for byte, and so does what follows it. A
    frame that names where its bytes are in a log file on this machine (`/output?here=1`)
    comes out as those bytes."""
    from velda.client import _frames, _read_log

    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    log = tmp_path / "stdout"
    log.write_bytes(b"-" + big + b"+")
    where = b"1 %d " % len(big) + bytes(log)
    frames = [b"o 5\nhello", b"e %d\n" % len(big) + big, b"O %d\n" % len(where) + where,
              b"o 3\nend", b"z 0\n"]
    stream = b"".join(frames)
    cuts = [len(frames[0]), 3, len(frames[1]) - 3, len(frames[2]), 4, 3, 4]  # header split too
    chunks, at = [], 0
    for size in cuts:
        chunks.append(b"%x\r\n" % size + stream[at:at + size] + b"\r\n")
        at += size
    assert at == len(stream)
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    server, ours = socket.socketpair()
    with server, ours:
        sending = threading.Thread(target=server.sendall,
                                   args=(head + b"".join(chunks) + b"0\r\n\r\n",))
        sending.start()
        got = list(_frames(wire.Response(ours, timeout=5), _read_log))
        sending.join()
    assert got == [("stdout", b"hello"), ("stderr", big), ("stdout", big), ("stdout", b"end"),
                   ("end", b"")]


_WRITER = (  # 3 MiB to stdout and 96 KiB to stderr, interleaved, every byte value
    "import sys\n"
    "block = bytes(range(256)) * 1024\n"
    "for i in range(12):\n"
    "    sys.stdout.buffer.write(block); sys.stdout.flush()\n"
    "    sys.stderr.buffer.write(block[i * 8192:(i + 1) * 8192]); sys.stderr.flush()\n"
)


def _written(client: Client, velda: Velda) -> tuple[str, bytes, bytes]:
    task_id = client.submit(command=[sys.executable, "-c", _WRITER], cwd=str(velda.cwd))["id"]
    assert velda.wait(task_id)["status"] == "SUCCESS"
    logs = velda.home / "logs" / f"{task_id}.1"
    return task_id, (logs / "stdout").read_bytes(), (logs / "stderr").read_bytes()


def _streams(client: Client, task_id: str) -> dict[str, bytes]:
    got = {"stdout": b"", "stderr": b""}
    for kind, value in client.output(task_id, follow=False, resume=(1, 0, 0)):
        if kind in got:
            got[kind] += value
    return got


def test_a_client_on_the_server_s_machine_reads_the_output_from_the_log_files(
    client: Client, velda: Velda, monkeypatch: pytest.MonkeyPatch
) -> None:
    task_id, stdout, stderr = _written(client, velda)
    assert len(stdout) == 3 << 20 and len(stderr) == 96 << 10
    read_here: list[bytes] = []
    real = client._read_here

    def counting(where: bytes) -> Iterator[bytes]:
        read_here.append(where)
        return real(where)

    monkeypatch.setattr(client, "_read_here", counting)
    assert _streams(client, task_id) == {"stdout": stdout, "stderr": stderr}
    assert read_here and all(str(velda.home).encode() in where for where in read_here)
    read_here.clear()
    client._here = False  # as a client elsewhere: the bytes come in the stream
    assert _streams(client, task_id) == {"stdout": stdout, "stderr": stderr}
    assert read_here == []


def test_a_follower_that_cannot_read_the_log_files_gets_the_bytes_sent_instead(
    client: Client, velda: Velda, monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    from velda import client as client_module
    from velda.cli.follow import Follower

    task_id, stdout, stderr = _written(client, velda)
    real, refused = client_module._read_log, []

    def refusing(where: bytes) -> Iterator[bytes]:
        if not refused:  # a log this user may not open (a pool's other user wrote it)
            refused.append(where)
            raise PermissionError(13, "Permission denied", where.split(b" ", 2)[2].decode())
        return real(where)

    monkeypatch.setattr(client_module, "_read_log", refusing)
    follower = Follower(client, task_id)
    follower.start()
    assert follower.done.wait(60)
    assert follower.error is None and follower.final is not None
    assert refused and client._here is False
    captured = capsysbinary.readouterr()
    assert (captured.out, captured.err) == (stdout, stderr)


@pytest.mark.parametrize(("peer", "here"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.1.2.3", False), ("::ffff:10.1.2.3", False), ("2001:db8::1", False), (None, False),
    ("testclient", False),
])
def test_only_a_client_over_loopback_may_read_the_log_files_itself(
    peer: str | None, here: bool
) -> None:
    from starlette.requests import Request

    from velda.server.app import _from_this_machine

    scope = {"type": "http", "client": (peer, 5000) if peer else None, "headers": []}
    assert _from_this_machine(Request(scope)) is here
