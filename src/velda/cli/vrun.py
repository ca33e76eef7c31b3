"""vrun: run a command as a task and stream its output as if it ran here (SPEC §3.1)."""

from __future__ import annotations

import signal
import sys

from velda.cli.common import connect, run_command, say
from velda.cli.follow import Follower, StatusPrinter, wait_for
from velda.cli.submit import EPILOG_VRUN, check_command, parser, request_of
from velda.client import Client


def main(argv: list[str] | None = None) -> int:
    p = parser("vrun", "Run a command as a tracked task and stream its output.", EPILOG_VRUN)
    args = p.parse_args(argv)
    check_command(p, args)
    request = request_of(p, args, blocking=True)
    return run_command(lambda: _vrun(request, args.quiet))


def _vrun(request: dict[str, object], quiet: bool) -> int:
    client = connect()
    task = client.submit(**request)
    if task.get("notice"):
        say(quiet, f"vrun: notice: {task['notice']}")
    task_id = task["id"]
    printer = _EndPrinter(quiet)
    follower = Follower(client, task_id, printer)
    return wait_for(follower, lambda n: _interrupt(client, task_id, n, quiet))


def _interrupt(client: Client, task_id: str, count: int, quiet: bool) -> bool:
    """First Ctrl-C: SIGINT to the task. Second: cancel it. We keep following its end."""
    if count == 1:
        try:
            client.signal(task_id, signal.SIGINT)
        except Exception:  # not running yet: cancel instead
            client.cancel(task_id)
    else:
        say(quiet, f"vrun: cancelling task {task_id}")
        client.cancel(task_id)
    return False


class _EndPrinter(StatusPrinter):
    """vrun stays silent, as if the command ran here, unless the task never ran."""

    def __call__(self, task: dict[str, object]) -> None:
        if task["status"] in ("FAILED_UPSTREAM", "SKIPPED") and not self.quiet:
            print(f"vrun: task {task['id']} ended {task['status']}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
