"""velda server start|stop|status, velda pool list, velda ui."""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from velda.cli.common import fail, help_formatter
from velda.cli.output import render, table
from velda.client import (
    Client,
    VeldaError,
    healthy,
    read_server_info,
    server_lock_held,
    start_server,
)
from velda.paths import velda_home
from velda.server_address import alive

TYPE_CHECKING = False  # typing is not imported at run time: it slows every command
if TYPE_CHECKING:
    from typing import Any

POOL_COLUMNS = ["name", "engine", "resources", "capacity", "running", "queued", "error"]


def add_parsers(sub: Any) -> None:
    server = sub.add_parser(
        "server", help="manage the server",
        description="Start, stop, restart or reload the server, or see its state. On one\n"
                    "machine the first vrun or vbatch starts it in the background; tasks keep\n"
                    "running while it is down.",
        epilog="examples:\n  velda server status\n  velda server restart    # tasks keep running"
               "\n  velda server reload     # read velda.toml again",
        formatter_class=help_formatter,
    )
    verbs = server.add_subparsers(dest="verb", required=True, metavar="VERB")
    start = verbs.add_parser(
        "start", help="start the server (in the background unless --foreground)",
        description="Start the server for $VELDA_HOME, in the background unless --foreground.",
        epilog="example:\n  velda server start --foreground --host 0.0.0.0 --port 7411 "
               "--config velda.toml",
        formatter_class=help_formatter,
    )
    start.add_argument("--foreground", action="store_true", help="run in this process")
    start.add_argument("--host", default="127.0.0.1", help="address to listen on")
    start.add_argument("--port", type=int, help="port (default 7411, else any free one)")
    start.add_argument("--config", help="velda.toml with the pools")
    start.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a public name the server answers to (repeatable; see "
                            "allowed_hosts in velda.toml)")
    verbs.add_parser("stop", help="stop the server; running tasks keep running",
                     description="Stop the server. Running tasks keep running; the next "
                                 "server adopts them.",
                     epilog="example:\n  velda server stop", formatter_class=help_formatter)
    verbs.add_parser(
        "restart", help="stop the server and start it again; running tasks keep running",
        description="Stop the server and start it again with the same address, port and "
                    "config file. Running tasks keep running and the new server adopts them.",
        epilog="example:\n  velda server restart", formatter_class=help_formatter,
    )
    verbs.add_parser(
        "reload", help="read velda.toml again now (the server also notices a change by itself)",
        description="Read velda.toml again and apply its pools without a restart. A file that "
                    "cannot be used is refused, with its line and reason, and the pools read "
                    "before stay in force; the server checks the file every second anyway.",
        epilog="example:\n  velda server reload", formatter_class=help_formatter,
    )
    status = verbs.add_parser("status",
                              help="URL, PID, version, uptime, state directory, config and pools",
                              description="Show the server's URL, PID, version, uptime, state\n"
                                          "directory, the config file it read and its pools.",
                              epilog="example:\n  velda server status -o json",
                              formatter_class=help_formatter)
    status.add_argument("-o", "--output", default="table", help="table or json")

    pool = sub.add_parser("pool", help="pools and their use",
                          description="Pools: where tasks run, and how much of each is in use.",
                          epilog="example:\n  velda pool list", formatter_class=help_formatter)
    pool_verbs = pool.add_subparsers(dest="verb", required=True, metavar="VERB")
    pools = pool_verbs.add_parser("list", help="pools with engine, capacity, running, queued",
                                  description="List the pools with their engine, what each\n"
                                              "task holds, capacity, running and queued tasks.",
                                  epilog="example:\n  velda pool list -o json",
                                  formatter_class=help_formatter)
    pools.add_argument("-o", "--output", default="table")
    pools.add_argument("--header", default="true")

    ui = sub.add_parser("ui", help="open the web UI, logged in",
                        description="Open the web UI in a browser, already logged in (the "
                                    "link logs in once).",
                        epilog="example:\n  velda ui --print    # just print the login link",
                        formatter_class=help_formatter)
    ui.add_argument("--print", action="store_true", help="print the one-time login URL")


def run_server(args: argparse.Namespace) -> int:
    home = velda_home()
    if args.verb == "start":
        return _start(args, home)
    if args.verb == "stop":
        return _stop(home)
    if args.verb == "restart":
        return _restart(home)
    if args.verb == "reload":
        return _reload()
    return _status(args)


def _restart(home: str) -> int:
    info = read_server_info(home)
    start_args = info.get("args") if info else None
    if _stop(home) != 0:
        return 1
    print(start_server(home, start_args if isinstance(start_args, list) else None))
    return 0


def _reload() -> int:
    try:
        config = Client(start=False).call("POST", "/api/v1/server/reload")["config"]
    except VeldaError as e:
        fail(str(e))
    print(f"read {config['path']}: pools {', '.join(config['pools']) or 'none configured'}")
    return 0


def _start(args: argparse.Namespace, home: str) -> int:
    extra = ["--host", args.host]
    if args.port is not None:
        extra += ["--port", str(args.port)]
    if args.config:
        extra += ["--config", os.path.abspath(args.config)]
    for name in args.allowed_host:
        extra += ["--allowed-host", name]
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
    """SIGTERM to the home's server, and wait for it to exit and its lock to be free (its
    reaper frees it once it has taken over the tasks still running). A server too busy to
    answer is stopped all the same: it is found by its lock, not by an answer."""
    info = read_server_info(home)
    pid = info.get("pid") if info else None
    if not isinstance(pid, int) or not _is_server(pid) or not server_lock_held(home):
        print("no server is running")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not alive(pid) and not server_lock_held(home):
            print(f"stopped the server (pid {pid})")
            return 0
        time.sleep(0.05)
    fail(f"the server (pid {pid}) did not stop within 10 s")


def _is_server(pid: int) -> bool:
    """A live velda server process (a stale server.json's pid may be another program's)."""
    if not alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"velda.server" in f.read().split(b"\0")
    except OSError:
        return True  # no /proc here: the home's lock says it


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
        if "config" in info:
            _print_config(info["config"])
        if info.get("refusing_work"):
            print(f"refusing new work: {info['refusing_work']}")
    return 0


def _print_config(config: dict[str, Any]) -> None:
    path = config["path"] if config["exists"] else f"none ({config['path']} does not exist)"
    print(f"config: {path}")
    if config.get("error"):
        print(f"config refused: {config['error']}; the pools read before stay in force")
    pools = config["pools"]
    print(f"pools: {', '.join(pools) if pools else 'none configured'}"
          f" (built in: shell, cpu-N, gpu-N; default {config['default_pool']})")
    for name, pool in pools.items():
        resources = {k: v for k, v in pool.items() if k not in ("engine", "capacity")}
        capacity = f", at most {pool['capacity']} at once" if pool.get("capacity") else ""
        print(f"  {name}: {pool['engine']}, {_resources(resources)}{capacity}")


def run_pool(args: argparse.Namespace) -> int:
    answer = Client().call("GET", "/api/v1/pools")
    pools, machine = answer["pools"], answer.get("machine")
    if args.output in ("json", "yaml"):
        print(render({"pools": pools, "machine": machine}, args.output, POOL_COLUMNS))
        return 0
    rows = [{**p, "resources": _resources(p["resources"])} for p in pools]
    print(render(rows, args.output, POOL_COLUMNS, args.header != "false", fields=()))
    if machine and args.header != "false":
        print(f"this machine: {machine['cpus_used']:g} of {machine['cpus']:g} CPUs in use, "
              f"{machine['cpus_free']:g} free; {machine['gpus_used']} of {machine['gpus']} "
              f"GPUs in use, {machine['gpus_free']} free")
    for pool in pools:
        if pool.get("nodes") and args.header != "false":
            print(_nodes(pool))
    return 0


NODE_COLUMNS = ["name", "state", "cpus", "gpus"]


def _nodes(pool: dict[str, Any]) -> str:
    """A Slurm pool's nodes: CPUs and GPUs allocated of all, as `sinfo` reports them."""
    nodes = pool["nodes"]
    rows = [{"name": n["name"], "state": n["state"],
             "cpus": f"{n['cpus_allocated']}/{n['cpus']} allocated",
             "gpus": f"{n['gpus_allocated']}/{n['gpus']} allocated"} for n in nodes]
    idle = sum(n["cpus"] - n["cpus_allocated"] for n in nodes)
    title = (f"\npool {pool['name']}: {len(nodes)} nodes, {idle} CPUs idle"
             f" of {sum(n['cpus'] for n in nodes)}")
    return title + "\n" + table(rows, NODE_COLUMNS)


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
