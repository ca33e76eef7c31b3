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
           "  velda task log 42 -f --stderr    # follow stderr until it ends\n"
           "  velda task log 42 --combined     # both, in the order they were written",
    "get": "velda task get train -o json",
    "list": "velda task list                 # top-level tasks, newest first\n"
            "  velda task list pipeline --status FAILURE   # children of 'pipeline'",
    "search": "velda task search -l team=ml -l stage=train --status FAILURE",
    "watch": "velda task watch pipeline       # live progress of its subtree",
    "cancel": "velda task cancel pipeline      # and everything under it",
    "retry": "velda task retry pipeline       # re-run only what failed",
    "top": "velda task top                  # running tasks by CPU and memory, live\n"
           "  velda task top --once -n 5       # the 5 busiest, once",
    "port-forward": "velda task port-forward notebook 8888    # its port 8888 at "
                    "http://127.0.0.1:8888\n"
                    "  velda task port-forward 42 8888:9000     # ... at http://127.0.0.1:9000\n"
                    "  velda task port-forward 42 6006:0        # ... at a free port, printed\n"
                    "  vrun -p 8888 jupyter lab --ip 0.0.0.0    # forward while vrun runs\n\n"
                    "It forwards until the task stops running, or Ctrl-C. A task on a Ray node "
                    "must listen\non the node's address (0.0.0.0), not only on 127.0.0.1: the "
                    "server connects from outside.",
}


TASK_EPILOG = """examples:
  velda task list                     top-level tasks, newest first
  velda task get train                one task; -o json for every field
  velda task log train -f             follow its stdout and stderr until it ends
  velda task watch pipeline           progress of a fan-out until it ends
  velda task cancel pipeline          cancel it and everything under it
  velda task retry pipeline           re-run only what failed
  velda task top                      running tasks by CPU and memory, like top
  velda task port-forward nb 8888     its port 8888 at http://127.0.0.1:8888 here

CHILDREN(OK/FAILED/ALL) in tables counts a task's own children (not theirs): OK succeeded,
FAILED failed or could not run because what they waited for failed, ALL is every child, so
the rest were cancelled, skipped, or still run or wait (-o json has each count).
"""


def add_parsers(sub: Any) -> None:
    task = sub.add_parser(
        "task", help="inspect and control tasks",
        description="Inspect and control tasks. A REF is a task ID, a name (the newest of\n"
                    "that name among the caller's siblings) or a path like pipeline/train.",
        epilog=TASK_EPILOG, formatter_class=help_formatter,
    )
    verbs = task.add_subparsers(dest="verb", required=True, metavar="VERB")
    _log_parser(verbs)
    get = _output_options(_verb(verbs, "get", "show one task"))
    get.add_argument("ref", metavar="REF")
    get.add_argument("--show-env", action="store_true",
                     help="environment values unmasked (secret-looking ones are masked); "
                          "needs the server token, not a task's")
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
    top = _verb(verbs, "top", "a live table of running tasks by CPU and memory")
    top.add_argument("--once", action="store_true", help="print the table once and exit")
    top.add_argument("-n", "--max-rows", type=int, default=30, metavar="N",
                     help="show the N busiest (default 30)")
    top.add_argument("-d", "--delay", type=float, default=2.0, metavar="S",
                     help="seconds between refreshes (default 2)")
    forward = _verb(verbs, "port-forward",
                    "reach a port the task listens on at http://127.0.0.1:LOCAL here")
    forward.add_argument("ref", metavar="REF")
    forward.add_argument("ports", metavar="PORT[:LOCAL]",
                         help="the task's port, and the local one (default: the same; 0: any "
                              "free one)")


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
    p.add_argument("--stderr", action="store_true",
                   help="only stderr, written to stderr: to pipe it, add 2>&1 "
                        "(velda task log 42 --stderr 2>&1 | tail)")
    p.add_argument("--combined", action="store_true",
                   help="stdout and stderr as one stream, in the order they were written, "
                        "all on stdout")
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
        "cancel": _cancel, "retry": _retry, "top": _top, "port-forward": _port_forward,
    }[args.verb]
    return handler(client, args)


def _print(data: Any, args: argparse.Namespace) -> None:
    text = render(data, args.output, TABLE, args.header)
    if text:
        print(text)


def _get(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.ref)
    if args.show_env:
        task = client.call("GET", f"/api/v1/tasks/{task['id']}?show_env=1")
    _print(task, args)
    if task.get("reason_detail") and args.output in ("table", "wide"):
        print(f"{task['reason']}: {task['reason_detail']}")
    waiting = task.get("waiting_for")
    if waiting and args.output in ("table", "wide"):
        print(f"waiting: {waiting['message']}")
    if args.output in ("table", "wide"):
        from velda.cli.usage import usage_lines

        for line in usage_lines(task):
            print(line)
    return 0


def _top(client: Client, args: argparse.Namespace) -> int:
    from velda.cli.usage import top

    if args.max_rows < 1 or args.delay <= 0:
        print("velda task top: -n must be at least 1 and -d more than 0", file=sys.stderr)
        return 2
    return top(client, args.delay, args.once, args.max_rows)


def _port_forward(client: Client, args: argparse.Namespace) -> int:
    from velda.cli.port_forward import run

    return run(client, args.ref, args.ports)


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
    if getattr(args, "combined", False):
        return _log_combined(client, task["id"], args)
    streams = _chosen_streams(args)
    if args.follow:
        from velda.cli.follow import Follower, wait_for

        follower = Follower(client, task["id"], None, streams, args.attempt)
        return wait_for(follower, lambda n: True)  # the task's exit code, as vrun's
    for stream in streams:
        data = client.logs(task["id"], stream, args.attempt)
        if args.tail is not None:
            data = _tail(data, args.tail)
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.buffer.write(data)
        out.flush()
    return 0


def _log_combined(client: Client, task_id: str, args: argparse.Namespace) -> int:
    chunks = client.log_chunks(task_id, "combined", args.attempt, follow=args.follow)
    out = sys.stdout.buffer
    if args.tail is not None:
        out.write(_tail(b"".join(chunks), args.tail))
    else:
        for data in chunks:
            out.write(data)
            out.flush()
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
    """Follows the task's event stream: from inside a task, watching a child is waiting for
    it, and the server counts the stream as such."""
    from velda.cli.follow import StatusPrinter
    from velda.cli.progress import ProgressView

    task_id = client.get(args.ref)["id"]
    view = ProgressView(sys.stdout)
    printer, waiting = StatusPrinter(quiet=False), _WaitingPrinter()
    while True:
        try:
            for task in client.events(task_id, subtree=True):
                final = task["status"] in _FINAL
                if not final:
                    printer(task)
                    waiting(task)
                if task.get("subtree", {}).get("total"):
                    view.show(task)
                if final:  # the last progress first, then how it ended: the final line last
                    view.close()
                    printer(task)
                    return exit_code_of(task)
        except OSError:
            pass
        time.sleep(0.5)  # the stream broke (the server restarted, say): follow it again


_FINAL = ("SUCCESS", "FAILURE", "FAILED_UPSTREAM", "SKIPPED", "CANCELLED")


class _WaitingPrinter:
    """`task 12: waiting: needs 2 CPUs; ...` on stderr each time the reason changes."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, task: dict[str, Any]) -> None:
        waiting = task.get("waiting_for")
        message = waiting.get("message") if isinstance(waiting, dict) else None
        if message and message != self.last:
            print(f"task {task['id']}: waiting: {message}", file=sys.stderr, flush=True)
        self.last = message


def _cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel(client.get(args.ref)["id"])
    if task.get("already_ended"):
        print(f"task {task['id']} already ended {task['status']}")
        return 0
    print(f"task {task['id']}: {task['status']}" + (
        " (cancelling)" if task["status"] not in ("CANCELLED",) else ""))
    return 0


def _retry(client: Client, args: argparse.Namespace) -> int:
    task = client.retry(client.get(args.ref)["id"])
    print(f"task {task['id']}: {task['status']}")
    return 0

