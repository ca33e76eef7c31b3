"""What tasks use, as the CLI shows it: `velda task get`'s usage lines, the CPU and MEMORY
cells of `-o wide`, and `velda task top`, a live table of running tasks by CPU and memory."""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False  # typing is not imported at run time: it slows every command
if TYPE_CHECKING:
    from typing import Any

    from velda.client import Client

TOP_COLUMNS = ["id", "name", "pool", "cpu%", "cpu", "memory", "procs", "duration"]
_CLEAR = "\x1b[H\x1b[2J"


def size(n: int | None) -> str:
    """Bytes as people read them: 512 B, 210.0 MB, 1.5 GB."""
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KB"
    for bigger in ("MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def cpu_cell(usage: dict[str, Any] | None) -> str:
    if not usage:
        return "-"
    seconds = f"{usage['cpu_s']:.1f}s"
    if usage.get("final") or usage.get("cpu_percent") is None:
        return seconds
    return f"{seconds} {usage['cpu_percent']:.0f}%"


def memory_cell(usage: dict[str, Any] | None) -> str:
    """Memory now while it runs, the peak once it ended."""
    if not usage:
        return "-"
    if usage.get("final"):
        return f"peak {size(usage.get('peak_memory_bytes'))}"
    return size(usage.get("memory_bytes"))


def usage_lines(task: dict[str, Any]) -> list[str]:
    """`velda task get`'s lines on what the task (and, for a parent, its subtree) used."""
    lines = []
    usage = task.get("usage")
    if usage:
        cpu = (f"cpu {usage['cpu_s']:.2f} s (user {usage['cpu_user_s']:.2f},"
               f" system {usage['cpu_system_s']:.2f})")
        if usage.get("cpu_percent") is not None:
            over = "over its run" if usage.get("final") else "now"
            cpu += f", {usage['cpu_percent']:.0f}% of a CPU {over}"
        memory = f"memory peak {size(usage.get('peak_memory_bytes'))}"
        if not usage.get("final") and usage.get("memory_bytes") is not None:
            memory = f"memory {size(usage['memory_bytes'])} ({memory})"
        lines.append(f"usage: {cpu}; {memory}")
        lines += [f"gpu {g['index']}: {g['utilization_percent']}% busy, memory"
                  f" {size(g['memory_bytes'])} (peak {size(g.get('peak_memory_bytes'))})"
                  for g in usage.get("gpus") or []]
    subtree = task.get("subtree_usage")
    if subtree and subtree.get("attempts"):
        lines.append(f"subtree: cpu {subtree['cpu_s']:.2f} s in {subtree['attempts']}"
                     f" attempt(s); largest memory peak {size(subtree['peak_memory_bytes'])}")
    return lines


def top_rows(client: Client) -> list[dict[str, Any]]:
    """The running tasks, busiest first (by CPU %, then memory)."""
    tasks: list[dict[str, Any]] = []
    token = None
    while True:
        page = client.list_tasks(status="RUNNING", all="1", page_size=1000, page_token=token)
        tasks += page["tasks"]
        token = page["next_page_token"]
        if not token:
            break
    rows = []
    for task in tasks:
        usage = task.get("usage") or {}
        rows.append({**task, "cpu%": _percent(usage.get("cpu_percent")),
                     "cpu": f"{usage['cpu_s']:.1f}s" if usage else "-",
                     "memory": size(usage.get("memory_bytes")) if usage else "-",
                     "procs": usage.get("processes"),
                     "_order": (usage.get("cpu_percent") or 0, usage.get("memory_bytes") or 0)})
    rows.sort(key=lambda r: r["_order"], reverse=True)
    return rows


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def top(client: Client, interval: float, once: bool, limit: int) -> int:
    """Print the table, then (unless `once`) again every `interval` seconds until Ctrl-C."""
    from velda.cli.output import table

    live = not once and sys.stdout.isatty()
    try:
        while True:
            rows = top_rows(client)
            text = table(rows[:limit], TOP_COLUMNS) if rows else "no task is running"
            more = f"\n({len(rows) - limit} more)" if len(rows) > limit else ""
            stamp = time.strftime("%H:%M:%S")
            print((_CLEAR if live else "") + f"{stamp}  {len(rows)} running\n{text}{more}",
                  flush=True)
            if once:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
