"""A minimal HTTP/1.0 client over a socket, for the command-line tools.

`http.client` pulls in the `email` package and costs more than the whole start-up budget of
`vbatch`; this needs only `socket`. HTTP/1.0 keeps it simple: one request per connection, and a
streamed body simply runs until the server closes it.
"""

from __future__ import annotations

import socket

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO


class Response:
    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        self._sock = sock
        self.body: BinaryIO = sock.makefile("rb")
        status_line = self.body.readline()
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

    def read(self, size: int = -1) -> bytes:
        if not self._chunked:
            return self.body.read(size)
        out = bytearray()
        while (size < 0 or len(out) < size) and self._next_chunk():
            want = self._left if size < 0 else min(self._left, size - len(out))
            data = self.body.read(want)
            if not data:
                raise OSError("the server closed the connection in the middle of a chunk")
            out += data
            self._left -= len(data)
        return bytes(out)

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
        return not self._done

    _started_chunk = False

    def close(self) -> None:
        self.body.close()
        self._sock.close()


def request(
    host: str, port: int, method: str, path: str, headers: dict[str, str],
    body: bytes | None = None, timeout: float | None = 60.0,
) -> Response:
    # a bytes host skips the idna codec, whose import is a cost of every vbatch
    address = (host.encode("ascii"), port)
    sock = socket.create_connection(address, timeout=10 if timeout is None else timeout)  # type: ignore[arg-type]
    try:
        name = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets
        head = [f"{method} {path} HTTP/1.0", f"Host: {name}:{port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body or b""))
        return Response(sock, timeout)
    except BaseException:
        sock.close()
        raise
