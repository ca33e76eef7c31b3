"""Where the local server answers, as every client finds it: the server.json of a live
server process, the host and port of its URL, this home's token. Standard library's C-backed
modules only: `vbatch`'s fast path (cli/fast_submit.py) imports this, and velda.client does
too; each reads JSON with its own decoder (the fast path keeps `json` out)."""

from __future__ import annotations

import os

from velda.paths import server_file, token_file

TYPE_CHECKING = False  # typing's import would cost the fast path a few milliseconds
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Loads = Callable[[bytes], Any]


def read_server_info(home: str, loads: Loads) -> dict[str, Any] | None:
    """What the running server wrote in server.json: url and pid."""
    try:
        with open(server_file(home), "rb") as f:
            info = loads(f.read())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and "url" in info else None


def running_url(home: str, loads: Loads) -> str | None:
    """The URL in server.json while its process lives (a signal 0, no round trip)."""
    info = read_server_info(home, loads)
    return str(info["url"]) if info and alive(info.get("pid")) else None


def split_url(url: str) -> tuple[str, int]:
    """('host', port) of http://host:port[/...], without urllib's import cost."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = rest.rpartition(":") if not rest.endswith("]") else (rest, "", "")
    if not host or not port.isdigit():
        host, port = rest, "80"
    return host.strip("[]") or "127.0.0.1", int(port)


def alive(pid: object) -> bool:
    """A live process, not a killed one left a zombie (whose parent may never reap it)."""
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[:1] != [b"Z"]
    except OSError:
        return True  # no /proc here: the signal said it lives


def read_token(home: str) -> str | None:
    """The token the server of `home` wrote for its own user; None where there is none."""
    try:
        with open(token_file(home)) as f:
            return f.read().strip()
    except OSError:
        return None
