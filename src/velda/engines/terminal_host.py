"""The keeper of a task's terminal (local and Slurm engines), and how the server talks to it.

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
side, answers `ok` and closes the connection.

On a Slurm node no server is there to open the terminal, so the attempt's batch script runs
this same file, copied into the attempt directory (the node may have no velda installed):
`python3 -I -S terminal_host.py serve ATTEMPT_DIR ROWS COLS ARGV...`. It opens a terminal of
that size, starts ARGV (the status-file wrapper) on it, keeps it as above, and listens on a TCP
port of the node, on all its addresses, instead of a Unix socket. That port and a random token
are published in `terminal.json` in the attempt directory (0600, in a 0700 directory on the
filesystem the server shares with the nodes); a request there must start with the token, or it
is dropped unanswered. The keeper exits with the wrapper's status once it has copied the last
of the session, and removes `terminal.json` as it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hmac
import json
import os
import selectors
import signal
import socket
import struct
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

SOCKET = "terminal.sock"
PUBLISHED = "terminal.json"
INPUT, RESIZE = b"i", b"w"
OK = b"ok"
_HEADER = struct.Struct("!cI")
_MAX_PENDING = 4 << 20  # typed input the task has not read yet, beyond which it is dropped
_MAX_REQUEST = 1 << 20
DRAIN_S = 1.0
_MAX_PUBLISHED = 4096
# Slurm sends a signal to every process of a job (`scancel --signal=N --full`): the keeper on a
# node ignores those, as the batch script and the wrapper do, so that it copies what the task
# writes as it handles them. Its command starts with every signal at its default.
_JOB_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                signal.SIGUSR1, signal.SIGUSR2)
_DEFAULT_SIGNALS = (*_JOB_SIGNALS, signal.SIGPIPE, signal.SIGTSTP, signal.SIGTTIN,
                    signal.SIGTTOU, signal.SIGCHLD, signal.SIGALRM)

_Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


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
    with _reachable(sock_path) as path:
        answer = await _request(lambda: asyncio.open_unix_connection(path),
                                frames(data, size))
    return answer is not None  # a keeper of an earlier version closes without a word


@contextlib.contextmanager
def _reachable(sock_path: Path) -> Iterator[str]:
    """A name for the socket that fits a Unix socket address (108 bytes): a long VELDA_HOME
    is reached through a descriptor of its directory, /proc/self/fd/N/terminal.sock."""
    if len(os.fsencode(sock_path)) < 100:
        yield str(sock_path)
        return
    directory = os.open(sock_path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{directory}/{sock_path.name}"
    finally:
        os.close(directory)


async def send_over_tcp(host: str, port: int, token: str, data: bytes,
                        size: tuple[int, int] | None) -> bool:
    """The same for a keeper on a node (`serve`); False unless it answers `ok`."""
    answer = await _request(lambda: asyncio.open_connection(host, port),
                            token.encode() + frames(data, size))
    return answer == OK


async def _request(connect: _Connect, request: bytes) -> bytes | None:
    """The keeper's answer to one request, or None if none came within 5 s."""
    try:
        async with asyncio.timeout(5):
            reader, writer = await connect()
            with contextlib.closing(writer):
                writer.write(request)
                writer.write_eof()
                await writer.drain()
                return await reader.read()  # sent once applied, then closed
    except (OSError, TimeoutError):
        return None


def read_published(attempt_dir: Path) -> tuple[int, str] | None:
    """The port and token a keeper on a node published, or None while there are none (it has
    not started yet, or has ended). The file is the task's side's: no link is followed."""
    try:
        fd = os.open(attempt_dir / PUBLISHED, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        published = json.loads(os.read(fd, _MAX_PUBLISHED))
        port, token = published["port"], published["token"]
    except (OSError, ValueError, TypeError, KeyError):
        return None
    finally:
        os.close(fd)
    if not isinstance(port, int) or not isinstance(token, str):
        return None
    return port, token


def listen(sock_path: Path) -> socket.socket:
    """The keeper's socket, bound and listening (by the server, before the keeper runs)."""
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _reachable(sock_path) as path:
            listener.bind(path)
        listener.listen(16)
    except OSError:
        listener.close()
        raise
    return listener


class _Keeper:
    """Holds the terminal's master side: its output into the log on fd 1, requests from the
    listener into it. `token` starts every request (empty on the server's Unix socket);
    `ours` is removed at the end (the socket, or the published file)."""

    def __init__(self, master: int, listener: socket.socket, token: bytes, command_pid: int,
                 ours: Path) -> None:
        self.master, self.log = master, 1
        os.set_blocking(self.master, False)
        self.ours = ours
        self.listener = listener
        self.token = token
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
                self.ours.unlink()

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
        request = bytes(buffer)
        if hmac.compare_digest(request[:len(self.token)], self.token):
            self._apply(request[len(self.token):])
            with contextlib.suppress(OSError):
                conn.send(OK)
        conn.close()

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


def serve(attempt_dir: Path, rows: int, cols: int, argv: list[str]) -> int:
    """On a node: start argv on a new terminal of rows x cols, keep that terminal with a TCP
    listener published in the attempt directory, and return argv's exit status."""
    for signum in _JOB_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    master, slave = os.openpty()
    set_size(master, rows, cols)
    listener = _listen_on_all_addresses()
    token = os.urandom(16).hex()
    published = attempt_dir / PUBLISHED
    # before the command starts: while the file is there, the engine holds back the exit
    _publish(published, listener.getsockname()[1], token)
    try:
        pid = _start_on(slave, argv)
    except OSError as e:
        published.unlink()
        print(f"velda: cannot start {argv[0]}: {e.strerror}", file=sys.stderr)
        return 127
    finally:
        os.close(slave)  # the command's now: the keeper sees EIO once no one holds it
    _Keeper(master, listener, token.encode(), pid, published).run()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _listen_on_all_addresses() -> socket.socket:
    """The server reaches the node at the address Slurm knows it by, which may be any of the
    node's; IPv6 too where the node has it."""
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", 0))


def _start_on(slave: int, argv: list[str]) -> int:
    """argv as the leader of a new session that opens the terminal first, which makes it its
    controlling terminal: on stdin, stdout and fd 3 (the status-file wrapper's stderr for the
    command); the wrapper's own stderr is /dev/null, as under the local engine."""
    return os.posix_spawnp(argv[0], argv, os.environ, file_actions=[
        (os.POSIX_SPAWN_OPEN, 0, os.ttyname(slave), os.O_RDWR, 0),
        (os.POSIX_SPAWN_DUP2, 0, 1),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_DUP2, 0, 3),
    ], setsid=True, setsigdef=_DEFAULT_SIGNALS, setsigmask=())


def _publish(path: Path, port: int, token: str) -> None:
    """Written whole under another name, then renamed: the server never reads half of it."""
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with open(fd, "w") as out:
        json.dump({"port": port, "token": token, "pid": os.getpid()}, out)
    os.replace(partial, path)


def main(argv: list[str]) -> int:
    if argv[1] == "serve":
        return serve(Path(argv[2]), int(argv[3]), int(argv[4]), argv[5:])
    # the local engine's keeper: the master on fd 0, the log on fd 1, the bound socket on fd 3
    _Keeper(0, socket.socket(fileno=3), b"", int(argv[2]), Path(argv[1])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
