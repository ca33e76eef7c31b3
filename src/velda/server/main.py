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

from velda.config import Config, ConfigError, config_file, config_path, load_config
from velda.engines.reaper import inherited_lock, server_link
from velda.paths import DEFAULT_PORT, server_file, velda_home
from velda.server.app import build_app
from velda.server.auth import Auth, load_or_create_token
from velda.server.config_watch import ConfigWatcher
from velda.server.doors import WILDCARD_HOSTS, served_names
from velda.server.folders_ahead import FoldersAhead
from velda.server.permissions import create_private, secure_home, write_private
from velda.server.runtime import Runtime
from velda.server.space import is_full, no_space
from velda.store.sqlite import SqliteStore, StoreFull

log = logging.getLogger("velda.server")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="velda-server", description="Run the velda server.")
    p.add_argument("--home", type=Path, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts")
    return p.parse_args(argv)


def bind(host: str, port: int | None, remembered: int | None = None) -> socket.socket:
    """The given port; else (none given, or 0: any) the port this home's server had last time,
    so that clients and running tasks find a restarted server where it was; else the default
    one (none given); else any free port."""
    if port:
        candidates = [port]
    else:
        candidates = [remembered] if remembered else []
        candidates += [DEFAULT_PORT, 0] if port is None else [0]
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
    """The home's lock, held while this server lives; a reaper that started it took it for
    it (reaper.py)."""
    inherited = inherited_lock()
    if inherited is not None:
        return inherited
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
    secure_home(home, traversable=any("user" in p.options for p in config.pools.values()))
    token = load_or_create_token(home)
    auth = Auth(token)
    create_private(home / "velda.db")
    store = SqliteStore(home / "velda.db")
    runtime = Runtime(home, config, store, auth.task_token)
    runtime.ahead = FoldersAhead(home)
    runtime.config_file = config_file(home, args.config)
    runtime.watcher = ConfigWatcher(runtime.config_file, config, runtime.apply_config)
    port = args.port if args.port is not None else _env_port()
    sock = bind(args.host, port, _remembered_port(home))
    _remember_port(home, sock.getsockname()[1])
    runtime.url = url_of(sock, args.host)
    await runtime.recover()
    runtime.watcher.start()
    app = build_app(runtime, auth, *_served(args.host, config, args.allowed_hosts))
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                       timeout_graceful_shutdown=1)
    )
    announce(home, runtime.url, _start_args(args))
    try:
        await server.serve(sockets=[sock])
    finally:
        runtime.watcher.stop()
        await runtime.close()
        store.close()
        withdraw(home)


def _served(bind_host: str, config: Config, extra: list[str]) -> tuple[set[str], bool]:
    """The host names the server answers to, and whether it answers to any IP address."""
    urls = [config.server_url] + [str(p.options.get("server_url") or "")
                                  for p in config.pools.values()]
    names = served_names(bind_host, urls, config.allowed_hosts + extra)
    return names, bind_host in WILDCARD_HOSTS


def _env_port() -> int | None:
    value = os.environ.get("VELDA_PORT")
    return int(value) if value else None


def _remembered_port(home: Path) -> int | None:
    try:
        return int((home / "port").read_text())
    except (OSError, ValueError):
        return None


def _remember_port(home: Path, port: int) -> None:
    write_start_file(home / "port", f"{port}\n")


def _start_args(args: argparse.Namespace) -> list[str]:
    """What `velda server restart` starts the next server with: the same address, port and
    config file as this one was given."""
    start = ["--host", args.host]
    start += ["--port", str(args.port)] if args.port is not None else []
    start += [arg for name in args.allowed_hosts for arg in ("--allowed-host", name)]
    return start + (["--config", str(args.config.resolve())] if args.config else [])


def announce(home: Path, url: str, start_args: list[str] | None = None) -> None:
    info = {"url": url, "pid": os.getpid(), "args": start_args or []}
    write_start_file(Path(server_file(home)), json.dumps(info))


def write_start_file(path: Path, text: str) -> None:
    """A file the server writes as it starts. On a full disk it goes over the old file's
    bytes in place (no new blocks needed), else it is left out: the server starts anyway."""
    try:
        write_private(path, text)
        return
    except OSError as e:
        if not is_full(e):
            raise
    path.with_name(path.name + ".tmp").unlink(missing_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
            os.ftruncate(fd, len(text.encode()))
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot write %s: %s", path, no_space(e, path.parent))


def withdraw(home: Path) -> None:
    path = Path(server_file(home))
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """`main` to its end on uvloop where it is installed, else on asyncio's own loop."""
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
    server_link()  # taken now, before anything is started that could inherit it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        run_loop(serve(args, home))
    except ConfigError as e:
        print(f"velda: {e}", file=sys.stderr)
        return 2
    except StoreFull as e:  # only a store that needs a new column, with no room for it
        print(f"velda: cannot upgrade the store: {no_space(e, home)}", file=sys.stderr)
        return 1
    return 0
