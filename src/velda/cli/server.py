"""velda server start|stop|status, velda pool list, velda ui."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from velda.cli.common import fail, help_formatter
from velda.cli.output import render
from velda.client import Client, VeldaError, healthy, read_server_info, start_server
from velda.paths import velda_home

TYPE_CHECKING = False  # typing is not imported at run time: it slows every command
if TYPE_CHECKING:
    from typing import Any

POOL_COLUMNS = ["name", "engine", "resources", "capacity", "running", "queued", "error"]


def add_parsers(sub: Any) -> None:
    server = sub.add_parser("server", help="manage the server")
    verbs = server.add_subparsers(dest="verb", required=True, metavar="VERB")
    start = verbs.add_parser(
        "start", help="start the server (in the background unless --foreground)",
        epilog="example:\n  velda server start --foreground --host 0.0.0.0 --port 7411 "
               "--config velda.toml",
        formatter_class=help_formatter,
    )
    start.add_argument("--foreground", action="store_true", help="run in this process")
    start.add_argument("--host", default="127.0.0.1", help="address to listen on")
    start.add_argument("--port", type=int, help="port (default 7411, else any free one)")
    start.add_argument("--config", help="velda.toml with the pools")
    verbs.add_parser("stop", help="stop the server; running tasks keep running",
                     epilog="example:\n  velda server stop")
    status = verbs.add_parser("status", help="URL, PID, version, uptime and state directory",
                              epilog="example:\n  velda server status -o json")
    status.add_argument("-o", "--output", default="table", help="table or json")

    pool = sub.add_parser("pool", help="pools and their use")
    pool_verbs = pool.add_subparsers(dest="verb", required=True, metavar="VERB")
    pools = pool_verbs.add_parser("list", help="pools with engine, capacity, running, queued",
                                  epilog="example:\n  velda pool list -o json")
    pools.add_argument("-o", "--output", default="table")
    pools.add_argument("--header", default="true")

    ui = sub.add_parser("ui", help="open the web UI, logged in",
                        epilog="example:\n  velda ui --print    # just print the login link")
    ui.add_argument("--print", action="store_true", help="print the one-time login URL")


def run_server(args: argparse.Namespace) -> int:
    home = velda_home()
    if args.verb == "start":
        return _start(args, home)
    if args.verb == "stop":
        return _stop(home)
    return _status(args)


def _start(args: argparse.Namespace, home: str) -> int:
    extra = ["--host", args.host]
    if args.port is not None:
        extra += ["--port", str(args.port)]
    if args.config:
        extra += ["--config", os.path.abspath(args.config)]
    if args.foreground:
        from velda.server.main import main as server_main

        return server_main(["--home", str(home), *extra])
    info = read_server_info(home)
    if info and healthy(info["url"]):
        print(f"already running at {info['url']}")
        return 0
    print(start_server(home, extra))
    return 0


def _stop(home: str) -> int:
    info = read_server_info(home)
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or not info or not healthy(info["url"]):
        print("no server is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"stopped the server (pid {pid})")
            return 0
        time.sleep(0.05)
    fail(f"the server (pid {pid}) did not stop within 10 s")


def _status(args: argparse.Namespace) -> int:
    try:
        info = Client(start=False).server()
    except VeldaError as e:
        if args.output == "json":
            print(json.dumps({"running": False, "home": str(velda_home())}))
        else:
            print(f"not running ({e})")
        return 1
    if args.output == "json":
        print(json.dumps(info, indent=2))
    else:
        for key in ("url", "pid", "version", "uptime_s", "home"):
            print(f"{key}: {info[key]}")
    return 0


def run_pool(args: argparse.Namespace) -> int:
    pools = Client().pools()
    if args.output in ("json", "yaml"):
        print(render({"pools": pools}, args.output, POOL_COLUMNS))
        return 0
    rows = [{**p, "resources": _resources(p["resources"])} for p in pools]
    print(render(rows, args.output, POOL_COLUMNS, args.header != "false"))
    return 0


def _resources(r: dict[str, Any]) -> str:
    parts = [f"{r['cpus']:g} cpu"]
    if r.get("gpus"):
        parts.append(f"{r['gpus']} gpu")
    if r.get("memory_mb"):
        parts.append(f"{r['memory_mb']} MB")
    parts += [f"{k}={v:g}" for k, v in r.items() if k not in ("cpus", "gpus", "memory_mb")]
    return ",".join(parts)


def run_ui(args: argparse.Namespace) -> int:
    client = Client()
    url = client.call("POST", "/api/v1/login-links", {})["url"]
    if args.print:
        print(url)
        return 0
    import webbrowser

    if not webbrowser.open(url):
        print(url)
    return 0
