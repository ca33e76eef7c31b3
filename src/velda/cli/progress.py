"""The progress of a parent's subtree: a redrawn bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import shutil
from typing import Any, TextIO

BAR_WIDTH = 30


def summary(counts: dict[str, int]) -> str:
    """`4/5 done: 2 succeeded, 1 failed, 1 cancelled, 1 running, 0 queued`; cancelled and
    skipped are named only when there are some."""
    ended = [("succeeded", counts["succeeded"]), ("failed", counts["failed"])]
    ended += [(k, counts.get(k, 0)) for k in ("cancelled", "skipped") if counts.get(k)]
    done = sum(n for _, n in ended)
    parts = [f"{n} {what}" for what, n in ended]
    parts += [f"{counts['running']} running", f"{counts['queued']} queued"]
    return f"{done}/{counts['total']} done: " + ", ".join(parts)


# one mark per state, in this order: succeeded, skipped, failed, cancelled, running
_MARKS = (("succeeded", "#"), ("skipped", "~"), ("failed", "x"), ("cancelled", "-"),
          ("running", ">"))


def bar(counts: dict[str, int], width: int = BAR_WIDTH) -> str:
    total = max(counts["total"], 1)
    out, left = "", width
    for key, mark in _MARKS:
        n = min(round(width * counts.get(key, 0) / total), left)
        out, left = out + mark * n, left - n
    return "[" + out + "." * left + "]"


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
