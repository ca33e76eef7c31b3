"""vrun: run a command as a task and stream its output as if it ran here (SPEC §3.1)."""

from __future__ import annotations

import argparse
import signal
import sys

from velda.cli import terminal
from velda.cli.common import connect, how_it_ended, run_command, say, show_notice
from velda.cli.follow import Follower, StatusPrinter, wait_for
from velda.cli.submit import EPILOG_VRUN, check_command, parser, request_of
from velda.client import Client, VeldaError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from velda.cli.port_forward import Forwarding


def main(argv: list[str] | None = None) -> int:
    p = parser("vrun", "Run a command as a tracked task and stream its output.", EPILOG_VRUN)
    p.add_argument("--tty", choices=("auto", "yes", "no"), default="auto",
                   help="run it under a terminal: auto (default) when vrun's stdin and stdout "
                   "are terminals; with one and no command, your shell on the pool")
    p.add_argument("-p", "--publish", action="append", default=[], metavar="PORT[:LOCAL]",
                   help="reach the task's PORT at http://127.0.0.1:LOCAL here while vrun "
                   "runs (repeatable; LOCAL 0: any free port)")
    args = p.parse_args(argv)
    with_terminal = terminal.wanted(args.tty, args.total_shards)
    if with_terminal and not args.command and args.total_shards is None:
        args.command = [terminal.user_shell()]
    check_command(p, args)
    request = request_of(p, args, blocking=True)
    if with_terminal:
        rows, cols = terminal.size()
        request["terminal"] = {"rows": rows, "cols": cols}
    ports = _published(p, args.publish)  # bound before the submit: a port in use makes no task
    try:
        return run_command(lambda: _vrun(request, args.quiet, with_terminal, ports))
    finally:
        if ports is not None:
            ports.close()


def _published(p: argparse.ArgumentParser, texts: list[str]) -> Forwarding | None:
    if not texts:
        return None
    from velda.cli.port_forward import publish  # websockets and threads: only with -p

    return publish(p, texts)


def _vrun(
    request: dict[str, object], quiet: bool, with_terminal: bool, ports: Forwarding | None = None
) -> int:
    forwarder = _Forwarder()  # first: a signal while the server starts waits for the task
    client = connect(quiet)
    task = client.submit(**request)
    show_notice(quiet, "vrun", task)
    task_id = task["id"]
    forwarder.found(client, task_id)
    if ports is not None:
        ports.start(client, task_id, wait_for_start=True)
    printer = _EndPrinter(quiet)
    if with_terminal:
        return _follow_at_terminal(client, task_id, printer)
    follower = Follower(client, task_id, printer)
    return wait_for(follower, lambda n: _interrupt(client, task_id, n, quiet))


def _follow_at_terminal(client: Client, task_id: str, printer: _EndPrinter) -> int:
    """The task's session to this terminal, what is typed here to the task's terminal."""
    relay = terminal.Relay(client, task_id)

    def on_status(task: dict[str, object]) -> None:
        if task["status"] not in ("PENDING", "QUEUED", "RUNNING"):
            relay.restore()  # before a line of vrun's own, and before the shell's prompt
        printer(task)

    relay.start()
    try:
        follower = Follower(client, task_id, on_status, streams=("stdout",))
        return wait_for(follower, lambda n: _interrupt(client, task_id, n, printer.quiet))
    finally:
        relay.close()


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


# As srun does: these signals sent to vrun go to its task, and vrun follows the task to its
# end and exits with its code. So `timeout 60 vrun ...` or `kill vrun` stops the task.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class _Forwarder:
    """Sends FORWARDED signals to the task; one that comes before the task exists waits for
    it. A signal ignored when vrun started (`nohup vrun`) stays ignored, as SIGINT does."""

    def __init__(self) -> None:
        self.client: Client | None = None
        self.task_id: str | None = None
        self.early: list[int] = []
        for signum in FORWARDED:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._received)

    def found(self, client: Client, task_id: str) -> None:
        self.client, self.task_id = client, task_id
        for signum in self.early:
            self._send(signum)

    def _received(self, signum: int, frame: object) -> None:
        if self.task_id is None:
            self.early.append(signum)
        else:
            self._send(signum)

    def _send(self, signum: int) -> None:
        assert self.client is not None and self.task_id is not None
        try:
            self.client.signal(self.task_id, signum)
        except VeldaError:  # not running (yet): a signal that would end it cancels it
            if signum in (signal.SIGTERM, signal.SIGHUP):
                self.client.cancel(self.task_id)


class _EndPrinter(StatusPrinter):
    """vrun stays silent, as if the command ran here, unless the task never ran or ended by
    something its output does not tell (a timeout, a cancel, a loss): then one line."""

    def __call__(self, task: dict[str, object]) -> None:
        if self.quiet or task["status"] == self.status:
            return
        self.status = str(task["status"])
        if task["status"] in ("FAILED_UPSTREAM", "SKIPPED"):
            print(f"vrun: task {task['id']} ended {task['status']}", file=sys.stderr)
        elif task["status"] in ("SUCCESS", "FAILURE", "CANCELLED"):
            ended = how_it_ended(task)
            if ended:
                print(f"vrun: task {task['id']} {ended}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
