"""Which requests reach the app at all: the `Host` a request names, and the `Origin` of a
state-changing request made with a web session.

The Host check stops DNS rebinding: a page of another site whose name was made to resolve to
127.0.0.1 reaches a loopback server with its own name in `Host`, so a server that answers only
to its own names never serves it. An IP literal cannot be rebound; a server bound to every
address (`--host 0.0.0.0`) therefore also answers to any address of the machine.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def host_name(netloc: str) -> str:
    """`Host: name:port` -> name, lowercased; `[::1]:7411` -> `::1`."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1:].partition("]")[0]
    if netloc.count(":") > 1:
        return netloc  # a bare IPv6 address
    return netloc.partition(":")[0]


def served_names(bind_host: str, urls: Iterable[str | None], extra: Iterable[str]) -> set[str]:
    """The names a server answers to: loopback, the address it was bound to, the host of each
    URL it tells others to use (`[server] url`, a pool's `server_url`), `allowed_hosts`."""
    names = set(LOOPBACK_NAMES)
    if bind_host in WILDCARD_HOSTS:
        names.add(socket.gethostname().lower())
    else:
        names.add(host_name(bind_host))
    names.update(host_name(urlsplit(url).netloc) for url in urls if url)
    names.update(host_name(name) for name in extra)
    return names


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostCheck:
    """ASGI middleware: a request naming a host this server does not serve gets 421."""

    def __init__(self, app: ASGIApp, names: set[str], any_ip: bool) -> None:
        self.app = app
        self.names = names
        self.any_ip = any_ip
        self.any_name = "*" in names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.any_name:
            await self.app(scope, receive, send)
            return
        host = _header(scope, b"host")
        if host is None or self.allows(host):  # no Host at all: not a browser
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":  # refused before its handshake: the client sees 403
            await send({"type": "websocket.close", "code": 1008, "reason": _why(host)[:123]})
            return
        await _refuse(send, host)

    def allows(self, host: str) -> bool:
        name = host_name(host)
        return name in self.names or (self.any_ip and _is_ip(name))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _why(host: str) -> str:
    return (
        f"this server does not answer to the host {host!r}; "
        "a team server lists its public names in allowed_hosts under [server] in velda.toml "
        "or with --allowed-host"
    )


async def _refuse(send: Send, host: str) -> None:
    body = json.dumps({"error": _why(host), "field": "host"}).encode()
    start: dict[str, Any] = {
        "type": "http.response.start",
        "status": 421,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }
    await send(start)
    await send({"type": "http.response.body", "body": body})


def origin_refusal(
    origin: str | None, referer: str | None, host: str | None, own_urls: Iterable[str | None]
) -> str | None:
    """Why a state-changing request made with a web session does not come from this server's
    own pages, or None if it does. The page's origin must be the host the request was sent to
    (already checked against the served names) or one of the server's own URLs, so a page of
    another site never passes, even with a CSRF header it somehow learnt."""
    claimed = origin if origin and origin != "null" else _origin_of(referer)
    if not claimed:
        return "a request with a web session must carry the Origin (or Referer) of its page"
    netloc = urlsplit(claimed).netloc.lower()
    own = {urlsplit(url).netloc.lower() for url in own_urls if url}
    if host is not None:
        own.add(host.strip().lower())
    if netloc not in own:
        return f"requests from the origin {claimed!r} are not accepted with a web session"
    return None


def _origin_of(url: str | None) -> str | None:
    if not url:
        return None
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
