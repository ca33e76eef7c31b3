"""vbatch's fast path: the common `vbatch [simple options] CMD...` submitted with only C modules.

argparse, `re`, `socket` and `json` cost more than the rest of a `vbatch` together (SPEC §9).
This handles what a script's fan-out writes, to a server that is found at once and answers
201; anything else, an unusual option, a server to start or find again, an error, is left to
the full path (`velda.cli.vbatch`), which then sends the very same request under the same
idempotency key: a task the server already accepted is answered again, never made twice.
Each function returns None where the full path must take over.
"""

from __future__ import annotations

import _json
import _socket
import os
import sys

from velda.paths import velda_home
from velda.server_address import read_token, running_url, split_url

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

# vbatch's options (velda.cli.submit.parser) that this parses: option -> (field, kind)
_OPTIONS = {
    "-q": ("quiet", "flag"), "--quiet": ("quiet", "flag"), "--gang": ("gang", "flag"),
    "-P": ("pool", "text"), "--pool": ("pool", "text"),
    "-n": ("name", "text"), "--name": ("name", "text"),
    "--timeout": ("timeout", "text"), "-C": ("directory", "text"),
    "--directory": ("directory", "text"),
    "--after-success": ("after_success", "list"), "--after-fail": ("after_fail", "list"),
    "--after": ("after", "list"), "-l": ("label", "list"), "--label": ("label", "list"),
    "-e": ("env", "list"), "--env": ("env", "list"),
    "--priority": ("priority", "int"), "--retries": ("retries", "int"),
}
_TIMEOUT_S = 60.0  # as velda.wire's: for connecting, and for the answer


def new_key() -> str:
    """An idempotency key, as velda.client makes them; the full path reuses it."""
    return os.urandom(16).hex()


def submit(argv: list[str], key: str) -> int | None:
    """Submit and report as `vbatch` does; None when the full path must do it instead."""
    parsed = parse(argv)
    server = parsed and find_server()
    if not parsed or not server:
        return None
    request, quiet = parsed
    url, token = server
    answer = post(url, token, key, encode(request))
    task = decode(answer) if answer is not None else None
    if not isinstance(task, dict) or "id" not in task:
        return None
    return report(task, url, quiet)


# --- the command line


def parse(argv: list[str]) -> tuple[dict[str, Any], bool] | None:
    """The submit request and -q, for argv that argparse would read the same way: known
    options each with a separate value, then a command that starts with no dash."""
    given: dict[str, Any] = {"after_success": [], "after_fail": [], "after": [], "label": [],
                             "env": [], "priority": 0, "retries": 0}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        field, kind = _OPTIONS.get(argv[i], ("", ""))
        if kind == "flag":
            given[field] = True
            i += 1
            continue
        value = argv[i + 1] if kind and i + 1 < len(argv) else "-"
        if value.startswith("-") or (kind == "int" and not (value.isascii() and value.isdigit())):
            return None  # an option argparse knows better, a missing value, or an error
        if kind == "list":
            given[field].append(value)
        else:
            given[field] = int(value) if kind == "int" else value
        i += 2
    if i == len(argv):
        return None  # no command: argparse's usage error
    request = request_of(argv[i:], given)
    return (request, bool(given.get("quiet"))) if request else None


def request_of(command: list[str], given: dict[str, Any]) -> dict[str, Any] | None:
    """What velda.cli.submit.request_of makes of the same options, key for key and in the
    same order, so that the body sent is byte for byte the full path's."""
    env = environment(given["env"])
    labels = _labels(given["label"])
    if env is None or labels is None:
        return None
    directory = given.get("directory")
    request: dict[str, Any] = {
        "command": command, "pool": given.get("pool"), "name": given.get("name"),
        "after_success": given["after_success"], "after_fail": given["after_fail"],
        "after": given["after"], "labels": labels, "env": env,
        "cwd": os.path.abspath(directory) if directory else os.getcwd(),
        "priority": given["priority"], "gang": bool(given.get("gang")),
        "retries": given["retries"], "blocking": False,
    }
    if given.get("timeout"):
        request["timeout"] = given["timeout"]
    return request


def environment(items: list[str]) -> dict[str, str] | None:
    env = dict(os.environ)
    for item in items:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
        elif key not in os.environ:
            return None  # the full path says it is not set
    return env


def _labels(items: list[str]) -> dict[str, str] | None:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            return None
        labels[key] = value
    return labels


# --- the server, found as velda.client.Client finds it, but never started here


def find_server() -> tuple[str, str] | None:
    """URL and token: VELDA_SERVER and VELDA_TOKEN, else this home's running server."""
    home = velda_home()
    url = os.environ.get("VELDA_SERVER") or running_url(home, decode)
    token = os.environ.get("VELDA_TOKEN") or read_token(home)
    return (url, token) if url and token else None


# --- one HTTP exchange, as velda.wire makes it


def post(url: str, token: str, key: str, body: bytes) -> bytes | None:
    """The body of a 200 or 201 answer to POST /api/v1/tasks, whole; None for anything else
    (no connection, another status, an answer cut short)."""
    host, port = split_url(url)
    name = f"[{host}]" if ":" in host else host
    head = (f"POST /api/v1/tasks HTTP/1.0\r\nHost: {name}:{port}\r\n"
            f"Authorization: Bearer {token}\r\nIdempotency-Key: {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    try:
        sock = _connect(host.encode("ascii"), port)
    except (OSError, UnicodeError):
        return None
    try:
        sock.sendall(head.encode("latin-1") + body)
        return _answer(_read_to_end(sock))
    except (OSError, UnicodeError):
        return None
    finally:
        sock.close()


def _connect(host: bytes, port: int) -> _socket.socket:
    """socket.create_connection's first address: the full path tries the others."""
    family, kind, proto, _, address = _socket.getaddrinfo(host, port, 0, _socket.SOCK_STREAM)[0]
    sock = _socket.socket(family, kind, proto)
    try:
        sock.settimeout(_TIMEOUT_S)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _read_to_end(sock: _socket.socket) -> bytes:
    """An HTTP/1.0 answer ends when the server closes the connection."""
    chunks = []
    while data := sock.recv(1 << 16):
        chunks.append(data)
    return b"".join(chunks)


def _answer(raw: bytes) -> bytes | None:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = lines[0].split(None, 2)[1:2]
    if not sep or status not in ([b"200"], [b"201"]):
        return None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"transfer-encoding":
            return None
        if name.strip().lower() == b"content-length" and value.strip() != b"%d" % len(body):
            return None
    return body


# --- JSON with the json package's own C encoder and scanner, without its Python modules


def encode(value: object) -> bytes:
    """json.dumps(value).encode(), the same bytes: json.dumps runs this very encoder."""
    encoder = _json.make_encoder(
        {}, _not_serializable, _json.encode_basestring_ascii, None, ": ", ", ", False, False,
        True)
    return "".join(encoder(value, 0)).encode()


def _not_serializable(value: object) -> None:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


class _Decoding:
    """What json's C scanner reads of a json.JSONDecoder: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # NaN, Infinity, -Infinity: what json.loads makes of them


# typeshed asks for a JSONDecoder: the scanner reads only the attributes above
_scan = _json.make_scanner(_Decoding())  # type: ignore[arg-type]


def decode(data: bytes) -> Any:
    """One JSON document, or None for anything that is not exactly one."""
    try:
        text = data.decode()
        value, end = _scan(text, 0)
    except (StopIteration, ValueError):
        return None
    return value if end == len(text) else None


# --- what vbatch prints


def report(task: dict[str, Any], url: str, quiet: bool) -> int:
    """The full path's output: a pool's notice, the ID on stdout, the web page's URL."""
    try:
        if task.get("notice"):
            from velda.cli.common import show_notice  # rare: once per pool and session

            show_notice(quiet, "vbatch", task)
        print(task["id"], flush=True)
        if not quiet:
            print(f"{url}/tasks/{task['id']}", file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass
    return 0
