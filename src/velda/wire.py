"""A minimal HTTP client over a socket, for the command-line tools and `velda.Client`.

`http.client` pulls in the `email` package and costs more than the whole start-up budget of
`vbatch`; this needs only `socket`. A stream (`request`) is HTTP/1.0, one request per
connection: its body simply runs until the server closes it. A call whose whole answer is
read at once (`Link.exchange`) keeps its connection for the next call (HTTP/1.1 keep-alive):
a program that makes many calls in a row, a loop of `submit`s say, pays the TCP handshake and
the server's set-up of a connection once, not for each call.
"""

from __future__ import annotations

import os
import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO


class Response:
    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self._sock = sock
        self.body: BinaryIO = sock.makefile("rb")
        status_line = self.body.readline()
        if not status_line:
            raise ConnectionAbortedError("the server closed the connection without an answer")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise OSError(f"not an HTTP response: {status_line[:80]!r}")
        self.status = int(parts[1])
        self.headers: dict[str, str] = {}
        while True:
            line = self.body.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            self.headers[name.strip().lower()] = value.strip()
        sock.settimeout(timeout)
        self._chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self._left = 0  # bytes left in the current chunk
        self._done = False

    def whole(self) -> bytes:
        """The whole body, as long as the headers say (OSError if it is cut short)."""
        length = self.headers.get("content-length", "")
        if self.status in (204, 304):
            return b""
        if self._chunked or not length.isdigit():
            return self.read()
        data = self.body.read(int(length))
        if len(data) < int(length):
            raise OSError("the server's answer was cut short")
        return data

    def reusable(self) -> bool:
        """May the connection carry another request, once the whole body is read?"""
        delimited = (self._chunked or self.status in (204, 304)
                     or self.headers.get("content-length", "").isdigit())
        return delimited and self.headers.get("connection", "").lower() != "close"

    def read(self, size: int = -1) -> bytes:
        if not self._chunked:
            return self.body.read(size)
        pieces: list[bytes] = []
        got = 0
        while (size < 0 or got < size) and self._next_chunk():
            want = self._left if size < 0 else min(self._left, size - got)
            data = self.body.read(want)
            if not data:
                raise OSError("the server closed the connection in the middle of a chunk")
            pieces.append(data)
            got += len(data)
            self._left -= len(data)
        # a read within one chunk (a frame of output) comes back as read, not copied again
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def read_some(self, size: int = 1 << 16) -> bytes:
        """What has arrived (at least a byte), without waiting for more; b"" at the end."""
        if self._chunked:
            return self.read(self._left) if self._next_chunk() else b""
        reader: Any = self.body  # a BufferedReader, whose read1 does exactly that
        return reader.read1(size)  # type: ignore[no-any-return]

    def readline(self) -> bytes:
        if not self._chunked:
            return self.body.readline()
        out = bytearray()
        while not out.endswith(b"\n") and self._next_chunk():
            line = self.body.readline(self._left)
            if not line:
                raise OSError("the server closed the connection in the middle of a chunk")
            out += line
            self._left -= len(line)
        return bytes(out)

    def _next_chunk(self) -> bool:
        """Make sure bytes of a chunk are ready; False at the end of the body."""
        while self._left == 0 and not self._done:
            if self._started_chunk:
                self.body.readline()  # the CRLF that ends the previous chunk
            size_line = self.body.readline()
            if not size_line:
                raise OSError("the server closed the connection before the end of the body")
            self._left = int(size_line.split(b";")[0].strip() or b"0", 16)
            self._started_chunk = True
            if self._left == 0:
                self._done = True
                while self.body.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailer fields, then the line that ends the body
        return not self._done

    _started_chunk = False

    def close(self) -> None:
        self.body.close()
        self._sock.close()


def request(
    host: str, port: int, method: str, path: str, headers: dict[str, str],
    body: bytes | None = None, timeout: float | None = 60.0,
) -> Response:
    """One request on a connection of its own, closed with the response (a stream's)."""
    sock = _connect(host, port, timeout)
    try:
        sock.sendall(_head(host, port, method, path, headers, body, "HTTP/1.0"))
        return Response(sock, timeout)
    except BaseException:
        sock.close()
        raise


class Link:
    """A connection kept from one whole-answer call to the next. It is not shared: a call
    takes it while it runs (another thread's call meanwhile opens one of its own), and a
    forked child leaves its parent's alone."""

    def __init__(self) -> None:
        self._kept: tuple[socket.socket, str, int, int] | None = None  # sock, host, port, pid

    def exchange(
        self, host: str, port: int, method: str, path: str, headers: dict[str, str],
        body: bytes | None, timeout: float | None,
    ) -> tuple[int, bytes]:
        """Status and whole body. A kept connection the server closed while it was idle
        (its keep-alive timeout, a restart) fails before any answer: the request goes again
        on a new connection, as the server never read it."""
        data = _head(host, port, method, path, headers, body, "HTTP/1.1")
        sock = self._take(host, port)
        if sock is not None:
            try:
                return self._over(sock, host, port, data, timeout)
            except _Closed:
                pass
        return self._over(_connect(host, port, timeout), host, port, data, timeout, fresh=True)

    def _take(self, host: str, port: int) -> socket.socket | None:
        kept, self._kept = self._kept, None  # one statement: no other thread gets it too
        if kept is None or kept[3] != os.getpid():
            return None  # a forked child's copy stays its parent's
        sock, kept_host, kept_port, _ = kept
        if (kept_host, kept_port) != (host, port):  # the server moved
            sock.close()
            return None
        return sock

    def _over(self, sock: socket.socket, host: str, port: int, data: bytes,
              timeout: float | None, fresh: bool = False) -> tuple[int, bytes]:
        keep = False
        try:
            try:
                sock.sendall(data)
                response = Response(sock, timeout)
            except ConnectionError as e:  # closed before a status line came (not a timeout)
                if fresh:
                    raise
                raise _Closed from e
            body = response.whole()
            keep = response.reusable()
            response.body.close()
            return response.status, body
        finally:
            if keep and self._kept is None:
                self._kept = (sock, host, port, os.getpid())
            else:
                sock.close()


class _Closed(Exception):
    """A kept connection turned out closed: the request got no answer on it."""


def _connect(host: str, port: int, timeout: float | None) -> socket.socket:
    # a bytes host skips the idna codec, whose import is a cost of every vbatch
    address = (host.encode("ascii"), port)
    return socket.create_connection(address, timeout=10 if timeout is None else timeout)  # type: ignore[arg-type]


def _head(host: str, port: int, method: str, path: str, headers: dict[str, str],
          body: bytes | None, version: str) -> bytes:
    name = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets
    head = [f"{method} {path} {version}", f"Host: {name}:{port}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b"")
