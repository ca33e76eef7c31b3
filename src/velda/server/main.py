"""Running the server: one per VELDA_HOME, on loopback unless told otherwise.

Order at start: take the home's lock (a second server for the same home exits at once), open
the store, bind, recover unfinished tasks, then announce the URL in server.json.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import uvicorn

from velda.config import ConfigError, config_path, load_config
from velda.paths import DEFAULT_PORT, server_file, velda_home
from velda.server.app import build_app
from velda.server.auth import Auth, load_or_create_token
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore

log = logging.getLogger("velda.server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="velda-server", description="Run the velda server.")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--config", type=Path, default=None)
    return p.parse_args(argv)


def bind(host: str, port: int | None) -> socket.socket:
    """The given port, else the default one, else any free port."""
    candidates = [port] if port is not None else [DEFAULT_PORT, 0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for i, candidate in enumerate(candidates):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError:
            sock.close()
            if i == len(candidates) - 1:
                raise
            continue
        # uvicorn sets this only on sockets it makes itself; without it small responses on a
        # kept-alive connection wait ~40 ms for Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(1024)
        sock.set_inheritable(False)
        return sock
    raise AssertionError("unreachable")


def take_lock(home: Path) -> int:
    fd = os.open(home / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"velda: a server already runs for {home}") from None
    return fd


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


async def serve(args: argparse.Namespace, home: Path) -> None:
    config = load_config(args.config or config_path(home))
    token = load_or_create_token(home)
    auth = Auth(token)
    store = SqliteStore(home / "velda.db")
    runtime = Runtime(home, config, store, auth.task_token)
    sock = bind(args.host, args.port if args.port is not None else _env_port())
    runtime.url = url_of(sock, args.host)
    await runtime.recover()
    app = build_app(runtime, auth)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                       timeout_graceful_shutdown=1)
    )
    announce(home, runtime.url)
    try:
        await server.serve(sockets=[sock])
    finally:
        await runtime.close()
        store.close()
        withdraw(home)


def _env_port() -> int | None:
    value = os.environ.get("VELDA_PORT")
    return int(value) if value else None


def announce(home: Path, url: str) -> None:
    path = Path(server_file(home))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}))
    tmp.replace(path)


def withdraw(home: Path) -> None:
    path = Path(server_file(home))
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = args.home or Path(velda_home())
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    take_lock(home)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _run(serve(args, home))
    except ConfigError as e:
        print(f"velda: {e}", file=sys.stderr)
        return 2
    return 0
