"""velda task ...: read, watch, cancel and retry tasks (SPEC §3.2)."""

from __future__ import annotations

import argparse
import sys
import time

from velda.cli.common import connect, exit_code_of, help_formatter
from velda.cli.output import TABLE, render
from velda.client import Client

TYPE_CHECKING = False  # typing is not imported at run time: it slows every command
if TYPE_CHECKING:
    from typing import Any

EXAMPLES = {
    "log": "velda task log train            # stored stdout and stderr\n"
           "  velda task log 42 -f --stderr    # follow stderr until it ends",
    "get": "velda task get train -o json",
    "list": "velda task list                 # top-level tasks, newest first\n"
            "  velda task list pipeline --status FAILURE   # children of 'pipeline'",
    "search": "velda task search -l team=ml -l stage=train --status FAILURE",
    "watch": "velda task watch pipeline       # live progress of its subtree",
    "cancel": "velda task cancel pipeline      # and everything under it",
    "retry": "velda task retry pipeline       # re-run only what failed",
}


def add_parsers(sub: Any) -> None:
    task = sub.add_parser("task", help="inspect and control tasks")
    verbs = task.add_subparsers(dest="verb", required=True, metavar="VERB")
    _log_parser(verbs)
    _output_options(_verb(verbs, "get", "show one task")).add_argument("ref", metavar="REF")
    lst = _output_options(_verb(verbs, "list", "list top-level tasks, or PARENT's children"))
    lst.add_argument("parent", nargs="?", metavar="PARENT")
    _paging_options(lst)
    search = _output_options(_verb(verbs, "search", "find tasks with all the labels"))
    search.add_argument("-l", "--label", action="append", required=True, metavar="K=V")
    _paging_options(search)
    _verb(verbs, "watch", "print status changes; a progress bar for a parent").add_argument(
        "ref", metavar="REF")
    _verb(verbs, "cancel", "cancel a task and its whole subtree").add_argument("ref")
    _verb(verbs, "retry", "re-run a task that did not succeed").add_argument("ref")


def _verb(verbs: Any, name: str, summary: str) -> argparse.ArgumentParser:
    return verbs.add_parser(  # type: ignore[no-any-return]
        name, help=summary, description=summary[0].upper() + summary[1:] + ".",
        epilog="example:\n  " + EXAMPLES[name],
        formatter_class=help_formatter,
    )


def _log_parser(verbs: Any) -> None:
    p = _verb(verbs, "log", "print a task's stored stdout and stderr")
    p.add_argument("ref", metavar="REF")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    p.add_argument("--stdout", action="store_true", help="only stdout")
    p.add_argument("--stderr", action="store_true", help="only stderr")
    p.add_argument("--tail", type=int, metavar="N", help="only the last N lines of each")
    p.add_argument("--attempt", type=int, metavar="K", help="attempt K (default: latest)")


def _output_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("-o", "--output", default="table",
                   help="table, wide, json, yaml, or fields like id,name,status")
    p.add_argument("--header", default="true", type=_bool, metavar="true|false",
                   help="print the header row of tables")
    return p


def _paging_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--status", action="append", default=[], help="only tasks in this state")
    p.add_argument("-a", "--all", action="store_true", help="every page, not only the first")
    p.add_argument("--max-results", type=int, default=50, metavar="N", help="page size")
    p.add_argument("--page-token", metavar="T", help="continue after this page")


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def run(args: argparse.Namespace) -> int:
    client = connect()
    handler = {
        "log": _log, "get": _get, "list": _list, "search": _search, "watch": _watch,
        "cancel": _cancel, "retry": _retry,
    }[args.verb]
    return handler(client, args)


def _print(data: Any, args: argparse.Namespace) -> None:
    text = render(data, args.output, TABLE, args.header)
    if text:
        print(text)


def _get(client: Client, args: argparse.Namespace) -> int:
    _print(client.get(args.ref), args)
    return 0


def _list(client: Client, args: argparse.Namespace) -> int:
    query: dict[str, Any] = {"status": args.status or None}
    if args.parent:
        query["parent"] = client.get(args.parent)["id"]
    return _pages(client, args, query)


def _search(client: Client, args: argparse.Namespace) -> int:
    query = {"label": args.label, "status": args.status or None, "all": "1"}
    return _pages(client, args, query)


def _pages(client: Client, args: argparse.Namespace, query: dict[str, Any]) -> int:
    tasks, token = [], args.page_token
    while True:
        page = client.list_tasks(**query, page_size=args.max_results, page_token=token)
        tasks += page["tasks"]
        token = page["next_page_token"]
        if not args.all or not token:
            break
    if args.output in ("json", "yaml"):
        _print({"tasks": tasks, "next_page_token": token}, args)
    else:
        _print(tasks, args)
        if token and not args.all:
            print(f"(more: --page-token {token})", file=sys.stderr)
    return 0


def _log(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.ref)
    streams = _chosen_streams(args)
    if args.follow:
        from velda.cli.follow import Follower, wait_for

        follower = Follower(client, task["id"], None, streams, args.attempt)
        wait_for(follower, lambda n: True)
        return 0
    for stream in streams:
        data = client.logs(task["id"], stream, args.attempt)
        if args.tail is not None:
            data = _tail(data, args.tail)
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.buffer.write(data)
        out.flush()
    return 0


def _chosen_streams(args: argparse.Namespace) -> tuple[str, ...]:
    if args.stdout and not args.stderr:
        return ("stdout",)
    if args.stderr and not args.stdout:
        return ("stderr",)
    return ("stdout", "stderr")


def _tail(data: bytes, n: int) -> bytes:
    if n <= 0:
        return b""
    lines = data.splitlines(keepends=True)
    return b"".join(lines[-n:])


def _watch(client: Client, args: argparse.Namespace) -> int:
    from velda.cli.follow import StatusPrinter
    from velda.cli.progress import ProgressView

    task = client.get(args.ref)
    view = ProgressView(sys.stdout)
    printer = StatusPrinter(quiet=False)
    while True:
        task = client.call("GET", f"/api/v1/tasks/{task['id']}?subtree=1")
        printer(task)
        if task.get("subtree", {}).get("total"):
            view.show(task)
        if task["status"] in ("SUCCESS", "FAILURE", "FAILED_UPSTREAM", "SKIPPED", "CANCELLED"):
            view.close()
            return exit_code_of(task)
        time.sleep(0.5)


def _cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel(client.get(args.ref)["id"])
    print(f"task {task['id']}: {task['status']}" + (
        " (cancelling)" if task["status"] not in ("CANCELLED",) else ""))
    return 0


def _retry(client: Client, args: argparse.Namespace) -> int:
    task = client.retry(client.get(args.ref)["id"])
    print(f"task {task['id']}: {task['status']}")
    return 0

