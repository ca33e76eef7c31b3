"""Attempt folders made ahead: those of the next queued local tasks, by a helper process.

A local start makes its attempt's folder and two log files: the folder in the server, the
files in the spawned child while the server waits for it to exec. On a disk that is the
largest part of a start after the exec itself: three new inodes, tens of µs on ext4, and
hundreds after many files were deleted in the last minutes (README, "Performance"); more on
a network file system. The server's one thread does nothing else meanwhile. So while tasks
wait in the local queue, a helper process (folder_maker.py, the server's child) makes those
of the next `AHEAD` to start, on another core, while the server starts the ones before them.

Only where it pays: on tmpfs a folder takes a few µs, less than the helper's share of the
CPU costs the tasks beside it, so the helper is asked only while the folders the server made
itself took `SLOW_S` or more (the median of the last `_SAMPLES`: a start the kernel preempted
in its `mkdir` says nothing of the file system; `VELDA_FOLDERS_AHEAD_FROM_S` sets another
bound, 0 for always).

Not while folders of ended attempts are on offer (engines/spare_folders.py): a start renames
one of those, which makes no new inode at all.

A start does not rely on it: it makes whatever is still missing (the folder if it is not
there, the files with O_CREAT), so a helper that falls behind or is gone costs time and
nothing else. A file it made is empty, made as the server would (0700 folder, 0600 files);
making it again is harmless. A task cancelled while it was among the next `AHEAD` keeps its
folder of empty files, which nothing reads.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from velda.config import env_seconds
from velda.engines.reaper import server_link
from velda.ready_queue import ReadyQueue
from velda.server import launches

log = logging.getLogger("velda.server")

AHEAD = 32  # folders made ahead of the local queue's head; refilled when half are used
SLOW_S = 20e-6  # a folder that takes this long to make is worth making ahead
_SAMPLES = 15  # folders the server made itself, timed


class FoldersAhead:
    """The server's side: which queued tasks have their folder asked for, and the pipe to
    the helper (started at the first refill)."""

    def __init__(self, home: Path, ahead: int = AHEAD, slow_s: float | None = None) -> None:
        self.home = home
        self.ahead = ahead
        self.slow_s = env_seconds("VELDA_FOLDERS_AHEAD_FROM_S", SLOW_S) \
            if slow_s is None else slow_s
        self.asked: set[int] = set()  # queued tasks whose folder the helper was asked for
        self.made_in: deque[float] = deque(maxlen=_SAMPLES)  # seconds, the latest folders
        self.slow = self.slow_s <= 0  # they took slow_s or more (the median)
        self._helper: subprocess.Popen[bytes] | None = None
        self._pipe: int | None = None
        self._gone = False  # it could not start, or went: starts make their own folders

    def made(self, seconds: float) -> None:
        """The server made an attempt's folder itself, in `seconds`."""
        self.made_in.append(seconds)
        self.slow = sorted(self.made_in)[len(self.made_in) // 2] >= self.slow_s

    def refill(self, queue: ReadyQueue) -> None:
        """Ask for the folders of the next `ahead` tasks of `queue`, once fewer than half of
        those asked for are still queued (the others started, or were cancelled), where
        folders are slow to make."""
        self.asked = {t for t in self.asked if t in queue}
        if (self._gone or not self.slow or len(self.asked) >= self.ahead // 2
                or len(queue) <= len(self.asked)):
            return
        with queue.scan() as ordered:
            new = [r.task_id for r in itertools.islice(ordered, self.ahead)
                   if r.task_id not in self.asked]
        if new and self._send(b"".join(b"%s\n" % self._folder_of(t) for t in new)):
            self.asked.update(new)

    def _folder_of(self, task_id: int) -> bytes:
        """A queued task's first attempt folder (a task queued again for a retry has that
        one already: asking for it again changes nothing, and its start makes its own)."""
        return os.fsencode(launches.attempt_dir(self.home, task_id, 1))

    def _send(self, lines: bytes) -> bool:
        """False where the helper is gone, or so far behind that its pipe is full."""
        try:
            if self._pipe is None:
                self._start()
            assert self._pipe is not None
            os.write(self._pipe, lines)
            return True
        except BlockingIOError:
            return False  # the starts make these themselves
        except OSError as e:
            log.warning("no attempt folders made ahead from now on: %s", e)
            self._gone = True
            return False

    def _start(self) -> None:
        """The helper, in a session of its own (a Ctrl-C of a foreground server is not its
        to hear: it ends when its stdin closes), named to the reaper as no task of ours."""
        reading, writing = os.pipe()
        try:
            self._helper = subprocess.Popen(
                [sys.executable, "-m", "velda.server.folder_maker"], stdin=reading,
                stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        except BaseException:
            os.close(writing)
            raise
        finally:
            os.close(reading)
        os.set_blocking(writing, False)
        self._pipe = writing
        link = server_link()
        if link is not None:
            link.helper(self._helper.pid)

    def close(self) -> None:
        """The helper ends once it has read what was sent (its stdin closed)."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._helper is not None:
            try:
                self._helper.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._helper.kill()
                self._helper.wait()
