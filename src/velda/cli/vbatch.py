"""vbatch: queue a command as a task; print its ID (SPEC §3.1)."""

from __future__ import annotations

import sys

from velda.cli.common import connect, run_command, say
from velda.cli.submit import EPILOG_VBATCH, check_command, parser, request_of


def main(argv: list[str] | None = None) -> int:
    p = parser("vbatch", "Queue a command as a task and print its ID.", EPILOG_VBATCH,
               follow=True)
    args = p.parse_args(argv)
    check_command(p, args)
    request = request_of(p, args, blocking=args.follow)
    return run_command(lambda: _vbatch(request, args.follow, args.quiet))


def _vbatch(request: dict[str, object], follow: bool, quiet: bool) -> int:
    client = connect()
    task = client.submit(**request)
    if task.get("notice"):
        say(quiet, f"vbatch: notice: {task['notice']}")
    print(task["id"], flush=True)
    say(quiet, client.web_url(task["id"]))
    if not follow:
        return 0
    from velda.cli.follow import Follower, StatusPrinter, wait_for  # threading: only for -f

    printer = StatusPrinter(quiet)
    follower = Follower(client, task["id"], printer)
    return wait_for(follower, lambda n: _detach(client, task["id"]))


def _detach(client: object, task_id: str) -> bool:
    """Ctrl-C: on a terminal ask whether to cancel; otherwise leave the task running."""
    if sys.stdin.isatty() and sys.stderr.isatty():
        print(f"\nCancel the task {task_id}? [y/N] ", end="", file=sys.stderr, flush=True)
        try:
            answer = sys.stdin.readline().strip().lower()
        except KeyboardInterrupt:
            answer = ""
        if answer in ("y", "yes"):
            client.cancel(task_id)  # type: ignore[attr-defined]
            print(f"task {task_id}: cancelling", file=sys.stderr)
            return False
    print(f"detached; task {task_id} keeps running", file=sys.stderr)
    return True


if __name__ == "__main__":
    raise SystemExit(main())
