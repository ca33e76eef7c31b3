"""Reading and following a task's log files, and streaming its changes.

Engines write each attempt's stdout and stderr to files; these generators read them from an
offset and, when following, keep reading until the task is final and the files are drained.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path

from velda.logindex import CODE, file_size
from velda.models import Task
from velda.server.combined import Combined
from velda.server.runtime import Runtime
from velda.server.views import task_detail

CHUNK = 1 << 20
POLL_S = 0.05
# A task under a terminal echoes what its user types: its output is looked for more often, so
# that a key comes back in a few milliseconds (bench/terminal_bench.py); one session, one file.
TERMINAL_POLL_S = 0.005
# A follower on the server's machine reads the bytes from the log files itself (`here`): its
# frames say where they are, so a stream of them is looked at again this often while it flows.
HERE_POLL_S = 0.005
# A task's event stream (`velda task watch`) reads the task again at most this often.
EVENTS_PACE_S = 0.05
STREAMS = (("o", "stdout"), ("e", "stderr"))


def _read(path: Path, offset: int, size: int = CHUNK) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError:  # not written yet, or an offset past what the OS can seek to
        return b""


async def stream_file(
    runtime: Runtime, task_id: int, attempt: int, stream: str, offset: int, follow: bool
) -> AsyncIterator[bytes]:
    path = runtime.attempt_dir(task_id, attempt) / stream
    with runtime.notifier.watching(task_id) as watch:
        while True:
            task = runtime.store.get(task_id)
            data = _read(path, offset)
            if data:
                offset += len(data)
                yield data
                continue
            if not follow or task is None or _attempt_done(task, attempt):
                return
            await watch.wait(POLL_S)


async def stream_combined(
    runtime: Runtime, task_id: int, attempt: int, offset: int, follow: bool, framed: bool
) -> AsyncIterator[bytes]:
    """Both streams as one, in the order they were written (server/combined.py), from byte
    `offset` of that merged stream; framed, each piece says its stream (see docs/api.md)."""
    task = runtime.store.get(task_id)
    done = task is None or _attempt_done(task, attempt)
    combined, left = Combined.at(runtime.attempt_dir(task_id, attempt), offset, done)
    try:
        async for stream, data in _merged(runtime, combined, task_id, attempt, left, follow):
            offset, left = offset + len(data), 0  # data comes only once the skip is done
            yield _frame(CODE[stream], data) if framed else data
        if not left:
            combined.remember(offset)  # the next poll of the page starts here
    finally:
        combined.close()


def combined_length(runtime: Runtime, task: Task, attempt: int) -> int:
    combined = Combined(runtime.attempt_dir(task.id, attempt))
    return combined.length(_attempt_done(task, attempt))


async def _merged(
    runtime: Runtime, combined: Combined, task_id: int, attempt: int, offset: int, follow: bool
) -> AsyncIterator[tuple[str, bytes]]:
    with runtime.notifier.watching(task_id) as watch:
        while True:
            task = runtime.store.get(task_id)
            done = task is None or _attempt_done(task, attempt)
            offset = combined.skip(offset, done)
            pieces = [] if offset else combined.read(to_end=done)
            for piece in pieces:
                yield piece
            if pieces:
                continue
            if done or not follow:
                return
            await watch.wait(POLL_S)


def _attempt_done(task: Task, attempt: int) -> bool:
    """No more output will come for this attempt."""
    return task.status.is_final() or task.attempt > attempt or task.finished_at is not None


def _frame(kind: str, data: bytes) -> bytes:
    return f"{kind} {len(data)}\n".encode() + data


async def multiplex(
    runtime: Runtime, task_id: int, attempt: int | None, follow: bool,
    resume: tuple[int, int, int] | None = None, here: bool = False,
) -> AsyncIterator[bytes]:
    """Both streams as frames (see docs/api.md), plus a status frame at every change, across
    attempts when following the latest one. The last frame is the task as it ended.

    `resume` (attempt, stdout offset, stderr offset) starts where a broken stream stopped; a
    client that asks for it also gets an `a` frame each time the stream moves to the next
    attempt, so that it can tell where to resume next time, and a last `z` frame.

    `here`: the client runs on this machine and reads the log files itself. Output frames
    then say where the new bytes are (`O`, `E`: offset, length, file) instead of carrying
    them: relaying a GiB through the server and the loopback took more CPU than the task that
    wrote it (docs/architecture.md, "Live output and messages")."""
    async for frame in _multiplex(runtime, task_id, attempt, follow, resume, here):
        yield frame
    if resume:
        yield _frame("z", b"")  # the end: a stream that stops before it was cut


def _new_output(
    runtime: Runtime, task_id: int, attempt: int, offsets: dict[str, int], here: bool
) -> list[bytes]:
    """Frames of what both streams of the attempt gained since `offsets` (which move on):
    the bytes, or, for a client that reads the files itself (`here`), where they are."""
    frames = []
    for kind, stream in STREAMS:
        path, start = runtime.attempt_dir(task_id, attempt) / stream, offsets[stream]
        if here:
            end = max(start, file_size(path))
            if end > start:
                frames.append(_frame(kind.upper(), _where(path, start, end)))
        else:
            data = _read(path, start)
            end = start + len(data)
            if data:
                frames.append(_frame(kind, data))
        offsets[stream] = end
    return frames


def _where(path: Path, start: int, end: int) -> bytes:
    """`OFFSET LENGTH PATH`, the path whole: the client may not share our cwd."""
    return f"{start} {end - start} ".encode() + os.fsencode(path.absolute())


async def _multiplex(
    runtime: Runtime, task_id: int, attempt: int | None, follow: bool,
    resume: tuple[int, int, int] | None, here: bool,
) -> AsyncIterator[bytes]:
    current = resume[0] if resume else attempt or 1
    offsets = {"stdout": resume[1], "stderr": resume[2]} if resume else {"stdout": 0, "stderr": 0}
    last_seen: tuple[object, ...] | None = None
    status_last = False  # was the last frame a status frame?
    with runtime.notifier.watching(task_id) as watch:
        while True:
            task = runtime.store.get(task_id)
            if task is None:
                return
            frames = _new_output(runtime, task_id, current, offsets, here)
            moved = bool(frames)
            for frame in frames:
                status_last = False
                yield frame
            seen = (task.status, task.attempt, task.finished_at)
            ending = not moved and (not follow or task.status.is_final())
            if seen != last_seen or (ending and not status_last):
                last_seen, status_last = seen, True
                yield _frame("s", json.dumps(task_detail(task, runtime.store)).encode())
            if moved:
                if here:  # the client reads what these frames name: give the writer a moment
                    await watch.wait(HERE_POLL_S)
                continue
            if attempt is None and task.attempt > current:
                current, offsets = current + 1, {"stdout": 0, "stderr": 0}
                if resume:
                    yield _frame("a", str(current).encode())
                continue
            if ending:
                return
            poll = POLL_S if task.terminal is None else TERMINAL_POLL_S
            await watch.wait(poll)


async def task_events(
    runtime: Runtime, task_id: int, subtree: bool = False
) -> AsyncIterator[bytes]:
    """Server-sent events: the task at every change of it or of its children counters (with
    `subtree`, also the counts of its whole subtree). Changes that come faster than
    EVENTS_PACE_S (a fan-out's children ending by the thousand) are read together, once
    per EVENTS_PACE_S, or once per 20 times what the last reading took: a stream never
    takes more than a twentieth of the server."""
    last = None
    version = runtime.notifier.version
    while True:
        began = time.monotonic()
        task = runtime.store.get(task_id)
        if task is None:
            return
        data = task_detail(task, runtime.store)
        if subtree:
            data["subtree"] = asdict(runtime.store.subtree_counts(task_id))
        next_read = began + max(EVENTS_PACE_S, 20 * (time.monotonic() - began))
        if data != last:
            last = data
            yield f"event: task\ndata: {json.dumps(data)}\n\n".encode()
        if task.status.is_final():
            return
        version = await runtime.notifier.wait(version, 1.0)
        await asyncio.sleep(next_read - time.monotonic())
