"""The keeper of a local task's terminal, and how the server talks to it.

A task run under a terminal (`vrun` at a terminal) has a pseudo-terminal as its stdin, stdout
and stderr. Whoever holds the terminal's other side (the master) must outlive the server: when
the last holder closes it, the task's terminal hangs up, its writes fail and its output is gone.
So the server hands the master to this small keeper, a process of its own session started with
the standard library only (`python -I -S terminal_host.py SOCKET_PATH PID`, no velda import):

- it copies everything the task writes to the terminal into the attempt's stdout log (its
  fd 1), so the session is kept as the task's log, one stream, and followed like any other;
- it listens on `terminal.sock` in the attempt directory (private to the server, 0700) for
  what the user types and for window size changes, and hands them to the terminal in order;
  the server binds that socket and hands it over as fd 3, so that what is typed before the
  keeper has started waits in the socket's queue;
- it ends once no process holds the terminal any more, or 1 s after the task's own command
  (PID) ended while something it left behind still holds it.

On that socket one connection carries one request: frames of a kind byte (INPUT or RESIZE),
a 4-byte big-endian length and the payload; the keeper applies them once the sender shuts its
side, then closes the connection: that close is the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import selectors
import socket
import struct
import sys
import termios
import time
from pathlib import Path

SOCKET = "terminal.sock"
INPUT, RESIZE = b"i", b"w"
_HEADER = struct.Struct("!cI")
_MAX_PENDING = 4 << 20  # typed input the task has not read yet, beyond which it is dropped
_MAX_REQUEST = 1 << 20
DRAIN_S = 1.0


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set a terminal's window size; the task's foreground group gets SIGWINCH."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def frames(data: bytes, size: tuple[int, int] | None) -> bytes:
    out = _HEADER.pack(INPUT, len(data)) + data if data else b""
    if size is not None:
        out += _HEADER.pack(RESIZE, 4) + struct.pack("!HH", *size)
    return out


async def send(sock_path: Path, data: bytes, size: tuple[int, int] | None) -> bool:
    """Type `data` into (and resize) the terminal kept for an attempt; False if no keeper
    answers there (the task has ended)."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_unix_connection(str(sock_path))
            with contextlib.closing(writer):
                writer.write(frames(data, size))
                writer.write_eof()
                await writer.drain()
                await reader.read()  # closed once applied
        return True
    except (OSError, TimeoutError):
        return False


def listen(sock_path: Path) -> socket.socket:
    """The keeper's socket, bound and listening (by the server, before the keeper runs)."""
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock_path))
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


class _Keeper:
    def __init__(self, sock_path: Path, command_pid: int) -> None:
        self.master, self.log = 0, 1
        os.set_blocking(self.master, False)
        self.sock_path = sock_path
        self.listener = socket.socket(fileno=3)
        self.listener.setblocking(False)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.master, selectors.EVENT_READ, self._output)
        self.selector.register(self.listener, selectors.EVENT_READ, self._accept)
        self.pending = bytearray()  # typed, not yet taken by the terminal
        self.requests: dict[socket.socket, bytearray] = {}
        self.ended_at: float | None = None
        self.command = _pidfd(command_pid)
        if self.command is None:
            self.ended_at = time.monotonic()
        else:
            self.selector.register(self.command, selectors.EVENT_READ, self._command_ended)

    def run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            with contextlib.suppress(OSError):
                self.sock_path.unlink()

    def _step(self) -> bool:
        timeout = None if self.ended_at is None else self.ended_at + DRAIN_S - time.monotonic()
        if timeout is not None and timeout <= 0:
            return False  # something the task left behind holds the terminal: stop keeping it
        for key, events in self.selector.select(timeout):
            if key.data(key.fileobj, events) is False:
                return False
        return True

    def _output(self, fd: int, events: int) -> bool:
        if events & selectors.EVENT_WRITE:
            self._type()
        if not events & selectors.EVENT_READ:
            return True
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return True
        except OSError as e:  # EIO: no process holds the terminal any more
            return e.errno not in (errno.EIO, errno.EBADF)
        if not data:
            return False
        _write_all(self.log, data)
        return True

    def _accept(self, listener: socket.socket, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = listener.accept()
            conn.setblocking(False)
            self.requests[conn] = bytearray()
            self.selector.register(conn, selectors.EVENT_READ, self._request)

    def _request(self, conn: socket.socket, events: int) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer = self.requests[conn]
        buffer += data
        if data and len(buffer) <= _MAX_REQUEST:
            return
        self.selector.unregister(conn)
        del self.requests[conn]
        self._apply(bytes(buffer))
        conn.close()  # the answer: applied

    def _apply(self, request: bytes) -> None:
        at = 0
        while at + _HEADER.size <= len(request):
            kind, length = _HEADER.unpack_from(request, at)
            payload = request[at + _HEADER.size: at + _HEADER.size + length]
            at += _HEADER.size + length
            if kind == INPUT and len(self.pending) + len(payload) <= _MAX_PENDING:
                self.pending += payload
            elif kind == RESIZE and len(payload) == 4:
                with contextlib.suppress(OSError):
                    set_size(self.master, *struct.unpack("!HH", payload))
        self._type()

    def _type(self) -> None:
        """Hand typed input to the terminal as far as it takes it now; the rest waits for the
        master to be writable."""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self.pending:
                written = os.write(self.master, self.pending)
                del self.pending[:written]
        with contextlib.suppress(OSError):
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.pending else 0)
            self.selector.modify(self.master, mask, self._output)

    def _command_ended(self, fd: int, events: int) -> None:
        self.selector.unregister(fd)
        self.ended_at = time.monotonic()


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return  # a full disk: the server's own checks say so; the task keeps running


if __name__ == "__main__":
    _Keeper(Path(sys.argv[1]), int(sys.argv[2])).run()
