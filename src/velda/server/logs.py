"""Reading and following a task's log files, and streaming its changes.

Engines write each attempt's stdout and stderr to files; these generators read them from an
offset and, when following, keep reading until the task is final and the files are drained.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

from velda.models import Task
from velda.server.runtime import Runtime
from velda.server.views import task_detail

CHUNK = 1 << 20
POLL_S = 0.05
STREAMS = (("o", "stdout"), ("e", "stderr"))


def _read(path: Path, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""


async def stream_file(
    runtime: Runtime, task_id: int, attempt: int, stream: str, offset: int, follow: bool
) -> AsyncIterator[bytes]:
    path = runtime.attempt_dir(task_id, attempt) / stream
    version = runtime.notifier.version
    while True:
        task = runtime.store.get(task_id)
        data = _read(path, offset)
        if data:
            offset += len(data)
            yield data
            continue
        if not follow or task is None or _attempt_done(task, attempt):
            return
        version = await runtime.notifier.wait(version, POLL_S)


def _attempt_done(task: Task, attempt: int) -> bool:
    """No more output will come for this attempt."""
    return task.status.is_final() or task.attempt > attempt or task.finished_at is not None


def _frame(kind: str, data: bytes) -> bytes:
    return f"{kind} {len(data)}\n".encode() + data


async def multiplex(
    runtime: Runtime, task_id: int, attempt: int | None, follow: bool
) -> AsyncIterator[bytes]:
    """Both streams as frames (see docs/api.md), plus a status frame at every change, across
    attempts when following the latest one. The last frame is the task as it ended."""
    current = attempt or 1
    offsets = {"stdout": 0, "stderr": 0}
    last_seen: tuple[object, ...] | None = None
    status_last = False  # was the last frame a status frame?
    version = runtime.notifier.version
    while True:
        task = runtime.store.get(task_id)
        if task is None:
            return
        moved = False
        for kind, stream in STREAMS:
            data = _read(runtime.attempt_dir(task_id, current) / stream, offsets[stream])
            if data:
                offsets[stream] += len(data)
                moved, status_last = True, False
                yield _frame(kind, data)
        seen = (task.status, task.attempt, task.finished_at)
        ending = not moved and (not follow or task.status.is_final())
        if seen != last_seen or (ending and not status_last):
            last_seen, status_last = seen, True
            yield _frame("s", json.dumps(task_detail(task, runtime.store)).encode())
        if moved:
            continue
        if attempt is None and task.attempt > current:
            current, offsets = current + 1, {"stdout": 0, "stderr": 0}
            continue
        if ending:
            return
        version = await runtime.notifier.wait(version, POLL_S)


async def task_events(runtime: Runtime, task_id: int) -> AsyncIterator[bytes]:
    """Server-sent events: the task at every change of it or of its children counters."""
    last = None
    version = runtime.notifier.version
    while True:
        task = runtime.store.get(task_id)
        if task is None:
            return
        data = task_detail(task, runtime.store)
        if data != last:
            last = data
            yield f"event: task\ndata: {json.dumps(data)}\n\n".encode()
        if task.status.is_final():
            return
        version = await runtime.notifier.wait(version, 1.0)
