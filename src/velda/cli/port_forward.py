"""`velda task port-forward REF PORT[:LOCAL]` and `vrun -p PORT[:LOCAL]`: a port the task
listens on, reached at http://127.0.0.1:LOCAL on this machine, through the server.

Each local connection becomes one WebSocket to the server, which connects to the port where
the attempt runs (server/ports.py has the protocol); threads copy the bytes both ways. One
more WebSocket per port, held for as long as it listens, shows the port on the task's page
and is closed by the server when the task stops running. `websockets` is imported only here,
and only when a forward starts: vbatch never pays for it.
"""

from __future__ import annotations

import argparse
import socket
import sys
import threading
import time
from dataclasses import dataclass

from velda.cli.common import fail
from velda.client import Client, VeldaError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from websockets.sync.client import ClientConnection

REFUSED = 4000  # a server's refusal: 4000 + an HTTP status (server/ports.py)
NOT_RUNNING = REFUSED + 409
CHUNK = 65536
RECONNECT_S = 0.5

@dataclass
class PortSpec:
    port: int  # where the task listens
    local: int  # where this machine listens; 0 until bound: any free port


def parse_spec(text: str) -> PortSpec:
    """`8888` or `8888:9000` (`:0`: any free local port); ValueError naming the problem."""
    port_text, sep, local_text = text.partition(":")
    port = _port_number(port_text, text, low=1)
    local = _port_number(local_text, text, low=0) if sep else port
    return PortSpec(port, local)


def _port_number(text: str, spec: str, low: int) -> int:
    if not (text.isascii() and text.isdigit()) or not low <= int(text) <= 65535:
        raise ValueError(f"{spec!r} is not PORT[:LOCAL] with ports from {low} to 65535")
    return int(text)


class Forwarding:
    """The local listeners of one task's forwarded ports. Made before the task exists (vrun
    binds its ports before it submits, so a port in use fails before any task is made), then
    started for the task, then closed."""

    def __init__(self, specs: list[PortSpec]) -> None:
        self.specs = specs
        self.client: Client | None = None
        self.task_id = ""
        self.wait_for_start = False
        self.ended = threading.Event()  # the task stopped running, or the server refused
        self.end_reason: str | None = None
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._holds: list[ClientConnection] = []
        self._lock = threading.Lock()
        self._listeners: list[socket.socket] = []
        try:
            for spec in specs:
                self._listeners.append(_listen(spec))
        except VeldaError:
            self.close()
            raise

    def start(self, client: Client, task_id: str, wait_for_start: bool = False) -> None:
        """Serve the listeners for `task_id`. Without wait_for_start (port-forward) the
        server's refusal of the first listener (not running, not this token's task) raises
        VeldaError here; with it (vrun) the listeners wait for the task to start."""
        self.client, self.task_id, self.wait_for_start = client, task_id, wait_for_start
        for spec, listener in zip(self.specs, self._listeners, strict=True):
            first = None if wait_for_start else self._announce(spec)
            _thread(self._hold, spec, first)
            _thread(self._accept, spec, listener)
            _say(f"forwarding http://127.0.0.1:{spec.local} -> task {task_id} port {spec.port}")

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            holds, self._holds = self._holds, []
            sockets, self._sockets = self._sockets, set()
        for listener in self._listeners:
            _close_socket(listener)
        for sock in sockets:
            _close_socket(sock)
        for hold in holds:
            hold.close()

    # --- the listener websocket of each port

    def _announce(self, spec: PortSpec) -> ClientConnection:
        """A listener's websocket, admitted (its first message came); VeldaError if refused."""
        from websockets.exceptions import ConnectionClosed

        ws = self._connect(spec, listen=True)
        try:
            ws.recv()
        except ConnectionClosed as e:
            code, reason = _close_of(e)
            raise VeldaError(reason or f"the server closed the forward (code {code})",
                             code - REFUSED if code >= REFUSED else None) from None
        with self._lock:
            self._holds.append(ws)
        return ws

    def _hold(self, spec: PortSpec, ws: ClientConnection | None) -> None:
        """Keep the listener's websocket open until closing; again after a break (the server
        restarted), or while the task has not started (vrun)."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        while not self._closing.is_set():
            try:
                ws = ws or self._announce(spec)
                for _ in ws:
                    pass
                code, reason = ws.close_code or 1006, ws.close_reason or ""
            except ConnectionClosed as e:
                code, reason = _close_of(e)
            except VeldaError as e:
                code, reason = REFUSED + (e.status or 0), str(e)
            except (OSError, InvalidHandshake, TimeoutError):
                code, reason = 1006, ""
            ws = None
            if self._closing.is_set() or self._ends_here(code, reason):
                return
            time.sleep(RECONNECT_S)

    def _ends_here(self, code: int, reason: str) -> bool:
        """A refusal ends the forward, except `not running` while vrun waits for its task
        (vrun closes the forward itself when the task ends)."""
        if code < REFUSED or (code == NOT_RUNNING and self.wait_for_start):
            return False
        self.end_reason = reason
        self.ended.set()
        return True

    # --- connections

    def _accept(self, spec: PortSpec, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            self._track(conn)
            _thread(self._relay, spec, conn)

    def _relay(self, spec: PortSpec, conn: socket.socket) -> None:
        """One local connection through one websocket, until either side closes."""
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        try:
            ws = self._connect(spec, listen=False)
        except (OSError, InvalidHandshake, TimeoutError) as e:
            _say(f"cannot open a forward to port {spec.port} of task {self.task_id}: {e}")
            self._untrack(conn)
            return
        _thread(_local_to_ws, conn, ws)
        try:
            for message in ws:
                conn.sendall(message if isinstance(message, bytes) else message.encode())
        except ConnectionClosed as e:
            _say_refusal(*_close_of(e))
        except OSError:
            pass  # the local side went away
        finally:
            ws.close()
            self._untrack(conn)

    def _connect(self, spec: PortSpec, listen: bool) -> ClientConnection:
        from websockets.sync.client import connect

        assert self.client is not None
        url = _ws_url(self.client.url) + f"/api/v1/tasks/{self.task_id}/ports/{spec.port}"
        url += f"?local={spec.local}" + ("&listen=1" if listen else "")
        return connect(url, additional_headers={"Authorization": f"Bearer {self.client.token}"},
                       open_timeout=10, compression=None, max_size=None, proxy=None)

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)
        _close_socket(sock)


def start_forwarding(
    client: Client, task_id: str, specs: list[PortSpec], wait_for_start: bool = False
) -> Forwarding:
    """Listen on each spec's local port and forward it to the task's port, said one line
    per port on stderr. Close the result to stop."""
    forwarding = Forwarding(specs)
    try:
        forwarding.start(client, task_id, wait_for_start)
    except BaseException:
        forwarding.close()
        raise
    return forwarding


def publish(p: argparse.ArgumentParser, texts: list[str]) -> Forwarding:
    """vrun's `-p` options, bound now: a bad one is a usage error, a local port in use an
    error, both before any task is made. vrun starts it once it has its task."""
    try:
        specs = [parse_spec(text) for text in texts]
    except ValueError as e:
        p.error(f"-p: {e}")
    try:
        return Forwarding(specs)
    except VeldaError as e:
        fail(str(e))


def run(client: Client, ref: str, spec_text: str) -> int:
    """velda task port-forward: until the task stops running or Ctrl-C."""
    try:
        spec = parse_spec(spec_text)
    except ValueError as e:
        raise VeldaError(str(e), 400) from None
    task = client.get(ref)
    if task["status"] != "RUNNING":
        raise VeldaError(f"task {task['id']} is not running ({task['status']})", 409)
    forwarding = start_forwarding(client, str(task["id"]), [spec])
    try:
        while not forwarding.ended.wait(1.0):
            pass
        _say(f"stopped: {forwarding.end_reason}")
    except KeyboardInterrupt:
        pass
    finally:
        forwarding.close()
    return 0


# --- helpers


def _listen(spec: PortSpec) -> socket.socket:
    sock = socket.socket()
    try:
        sock.bind(("127.0.0.1", spec.local))
    except OSError as e:
        sock.close()
        raise VeldaError(f"cannot listen on 127.0.0.1:{spec.local}: {e.strerror or e}") from None
    sock.listen(64)
    spec.local = sock.getsockname()[1]
    return sock


def _local_to_ws(conn: socket.socket, ws: ClientConnection) -> None:
    """The local side's bytes to the websocket; its end of input as an empty message."""
    try:
        while data := conn.recv(CHUNK):
            ws.send(data)
        ws.send(b"")
    except Exception:  # either side closed meanwhile: the other thread closes the rest
        return


def _ws_url(http_url: str) -> str:
    base = http_url.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base[len("https://"):]
    return "ws://" + base.split("://", 1)[-1]


def _close_of(e: Any) -> tuple[int, str]:
    """(code, reason) of the close frame the server sent, 1006 if none came."""
    frame = getattr(e, "rcvd", None)
    return (frame.code, frame.reason) if frame is not None else (1006, "")


def _say_refusal(code: int, reason: str) -> None:
    if code >= REFUSED and reason:
        _say(reason)


def _say(message: str) -> None:
    print(f"{_prog()}: {message}", file=sys.stderr, flush=True)


def _prog() -> str:
    import os

    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "vrun" if name == "vrun" else "velda"


def _thread(target: Any, *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def _close_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
