"""The progress of a parent's subtree: a redrawn bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import shutil
from typing import Any, TextIO

BAR_WIDTH = 30


def summary(counts: dict[str, int]) -> str:
    done = counts["succeeded"] + counts["failed"]
    return (
        f"{done}/{counts['total']} done: {counts['succeeded']} succeeded, "
        f"{counts['failed']} failed, {counts['running']} running, {counts['queued']} queued"
    )


def bar(counts: dict[str, int], width: int = BAR_WIDTH) -> str:
    total = max(counts["total"], 1)
    ok = round(width * counts["succeeded"] / total)
    bad = round(width * counts["failed"] / total)
    run = round(width * counts["running"] / total)
    ok, bad = min(ok, width), min(bad, width - min(ok, width))
    run = min(run, width - ok - bad)
    return "[" + "#" * ok + "x" * bad + ">" * run + "." * (width - ok - bad - run) + "]"


class ProgressView:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last: str | None = None

    def show(self, task: dict[str, Any]) -> None:
        counts = task["subtree"]
        text = summary(counts)
        if text == self.last:
            return
        self.last = text
        if self.tty:
            columns = shutil.get_terminal_size().columns
            line = f"{bar(counts)} {text}"[: columns - 1]
            self.out.write("\r\x1b[K" + line)
        else:
            self.out.write(f"task {task['id']}: {text}\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.last is not None:
            self.out.write("\n")
            self.out.flush()
