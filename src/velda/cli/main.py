"""velda: inspect tasks, manage pools and the server (SPEC §3.2)."""

from __future__ import annotations

import argparse

from velda.cli import server, task
from velda.cli.common import help_formatter, run_command

EPILOG = """examples:
  velda task list                     top-level tasks, newest first
  velda task log train -f             follow a task's output
  velda task watch pipeline           live progress of a fan-out
  velda pool list                     pools with capacity and use
  velda server status -o json
  velda ui                            open the web UI, logged in
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="velda", description="Inspect and control velda tasks, pools and the server.",
        epilog=EPILOG, formatter_class=help_formatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    task.add_parsers(sub)
    server.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"task": task.run, "server": server.run_server, "pool": server.run_pool,
                "ui": server.run_ui}
    return run_command(lambda: handlers[args.command](args))


if __name__ == "__main__":
    raise SystemExit(main())
