"""Forwarded ports: a port a running task listens on, reached through the server.

`velda task port-forward` and `vrun -p` listen on the user's machine. For each TCP connection
they accept they open the WebSocket `/api/v1/tasks/{id}/ports/{port}?local=LOCAL`; the server
connects to that port on the host where the attempt runs (its engine's `host_of`: 127.0.0.1
for the local engine, the node's address for Ray and Slurm) and copies bytes both ways as binary
messages until either side closes. An empty message from the client is its end of input (a
half-close), passed on as such. For as long as it listens, the forwarder also holds one
`?listen=1` WebSocket per port: it carries no bytes (the server sends one `{"ok": true}` once
it is admitted), shows the port in the task's JSON (`forwarded_ports`) and is closed by the
server when the task stops running, which ends `velda task port-forward`.

Who may: a token that may change the task (a WebSocket counts as a write, so a task token
acts only in its own subtree and only while its task is open, and a web session, which cannot
send the CSRF header, never opens one). A refusal is a close with code 4000 + the HTTP
status the same refusal would have (4401 no valid token, 4403 not this token's task, 4404 no
such task, 4409 not running, 4501 not on this engine, 4502 nothing listens) and a one-line
reason; the forwarder prints that reason.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Protocol

from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket

from velda.engines.base import EngineError
from velda.models import Task, TaskStatus
from velda.protocol import BadRequest, parse_int
from velda.server.auth import Auth, Principal
from velda.server.runtime import Runtime

PATH = "/api/v1/tasks/{id:int}/ports/{port:int}"
REFUSED = 4000  # + the HTTP status of the same refusal
TASK_CHECK_S = 1.0  # how often a listener's websocket looks whether its task still runs
CHUNK = 65536
_MAX_REASON = 123  # bytes: what a close frame can carry


class Refusal(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Gate(Protocol):
    """What the HTTP API already decides about a request (app.Api): who asks, and whether
    they may act on the task the path names."""

    auth: Auth

    def refusal(self, request: HTTPConnection, principal: Principal) -> tuple[str, int] | None:
        ...

    def task(self, request: HTTPConnection, principal: Principal) -> Task: ...


class Forwards:
    """The forwards open now, per task, counted by (task port, the client's local port): a
    port shows in the task's JSON while any listener or connection for it is open."""

    def __init__(self) -> None:
        self._open: dict[int, Counter[tuple[int, int | None]]] = {}

    @contextlib.contextmanager
    def open(self, task_id: int, port: int, local: int | None) -> Iterator[None]:
        counts = self._open.setdefault(task_id, Counter())
        counts[(port, local)] += 1
        try:
            yield
        finally:
            counts[(port, local)] -= 1
            if counts[(port, local)] <= 0:
                del counts[(port, local)]
            if not counts:
                self._open.pop(task_id, None)

    def of(self, task_id: int) -> list[dict[str, int | None]]:
        counts = self._open.get(task_id, Counter())
        return [{"port": port, "local": local}
                for port, local in sorted(counts, key=lambda k: (k[0], k[1] or 0))]


class PortRelay:
    def __init__(self, runtime: Runtime, gate: Gate) -> None:
        self.runtime = runtime
        self.gate = gate
        self.forwards = Forwards()

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()  # first: a refusal's reason travels only in a close frame
        try:
            task, port, local = self._admitted(websocket)
            if websocket.query_params.get("listen") in ("1", "true"):
                await self._hold(websocket, task, port, local)
            else:
                await self._relay(websocket, task, port, local)
        except Refusal as e:
            await _close(websocket, REFUSED + e.status, str(e))

    def _admitted(self, websocket: WebSocket) -> tuple[Task, int, int | None]:
        """The running task, its port and the client's local port, for a client that may
        act on the task; else Refusal naming why."""
        auth = self.gate.auth
        principal = auth.authenticate(websocket.headers.get("authorization"),
                                      dict(websocket.cookies))
        if principal is None:
            raise Refusal("missing or invalid token", 401)
        refusal = self.gate.refusal(websocket, principal)
        if refusal is not None:
            raise Refusal(*refusal)
        self.runtime.settle()  # a task that just started has its handle stored
        try:
            task = self.gate.task(websocket, principal)
            port = parse_int(str(websocket.path_params["port"]), "port", 1, 65535)
            local = parse_int(websocket.query_params.get("local"), "local", 0, 65535)
        except BadRequest as e:
            raise Refusal(str(e), e.status) from None
        assert port is not None
        if task.status != TaskStatus.RUNNING or not task.handle:
            raise Refusal(f"task {task.id} is not running ({task.status.value})", 409)
        return task, port, local

    def _host(self, task: Task) -> str:
        try:
            return self.runtime.engine_of(task.pool).host_of(task.handle or {})
        except EngineError as e:
            raise Refusal(str(e), 501) from None

    async def _relay(self, websocket: WebSocket, task: Task, port: int, local: int | None) -> None:
        host = self._host(task)
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except ConnectionRefusedError:
            raise Refusal(f"nothing listens on port {port} in task {task.id}", 502) from None
        except OSError as e:
            why = e.strerror or str(e) or type(e).__name__
            raise Refusal(f"cannot reach port {port} of task {task.id} at {host}: {why}",
                          502) from None
        with self.forwards.open(task.id, port, local):
            await _pump(websocket, reader, writer)

    async def _hold(self, websocket: WebSocket, task: Task, port: int, local: int | None) -> None:
        """A listener's websocket: open until the client closes it or the task stops
        running (then closed with 4409 and the reason)."""
        self._host(task)  # an engine that cannot forward says so now, not at each connection
        with self.forwards.open(task.id, port, local):
            await websocket.send_json({"ok": True})
            while not await _closed_within(websocket, TASK_CHECK_S):
                now = self.runtime.store.get(task.id)
                if now is None or now.status != TaskStatus.RUNNING or now.attempt != task.attempt:
                    state = now.status.value if now else "deleted"
                    raise Refusal(f"task {task.id} is no longer running ({state})", 409)


async def _closed_within(websocket: WebSocket, seconds: float) -> bool:
    """Whether the client closed within `seconds`; what else it sends is ignored."""
    try:
        message = await asyncio.wait_for(websocket.receive(), seconds)
    except TimeoutError:
        return False
    return bool(message["type"] == "websocket.disconnect")


async def _pump(
    websocket: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Bytes both ways until one side closes, then the other is closed too."""
    upstream = asyncio.create_task(_to_port(websocket, writer))
    downstream = asyncio.create_task(_from_port(reader, websocket))
    try:
        await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for side in (upstream, downstream):
            side.cancel()
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        writer.close()
    await _close(websocket, 1000, "")  # nothing happens if the client closed first


async def _to_port(websocket: WebSocket, writer: asyncio.StreamWriter) -> None:
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("bytes")
        if data is None:
            data = str(message.get("text") or "").encode()
        if not data:  # the client's end of input: the task sees a half-closed connection
            if writer.can_write_eof():
                writer.write_eof()
            continue
        writer.write(data)
        await writer.drain()


async def _from_port(reader: asyncio.StreamReader, websocket: WebSocket) -> None:
    while data := await reader.read(CHUNK):
        await websocket.send_bytes(data)


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    text = reason.encode()[:_MAX_REASON].decode(errors="ignore")
    with contextlib.suppress(Exception):  # the client may have gone already
        await websocket.close(code, text)
