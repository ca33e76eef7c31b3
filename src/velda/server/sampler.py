"""Keeps the chunk index (velda/logindex.py) of running local attempts.

A local task writes straight into its log files, with no server process in between, so the
server learns when each stream grew by looking: every 50 ms, from the event loop, it stats the
two files of each running attempt and appends a record for each one that grew. That is two
stat() calls per running attempt per pass and one small write when a file grew (the index is
created at the first growth: a task that writes nothing has none); attempts that are not
running cost nothing. The order it keeps is exact between streams that write more than
50 ms apart, and within one pass stdout comes first.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from velda.logindex import STREAMS, last_sizes, open_index, record
from velda.server.paced import PacedPasses

INTERVAL_S = 0.05
MAX_SHARE = 0.05  # of the event loop's time that sampling may take


class _Watched:
    def __init__(self, attempt_dir: Path, fresh: bool) -> None:
        self.dir = attempt_dir
        self.paths = [(stream, str(attempt_dir / stream)) for stream in STREAMS]
        # an adopted attempt continues its index
        self.sizes = dict.fromkeys(STREAMS, 0) if fresh else last_sizes(attempt_dir)
        self.fd: int | None = None  # opened at the first growth: a silent task has no index

    def sample(self, at: float) -> None:
        for stream, path in self.paths:
            try:
                size = os.stat(path).st_size
            except FileNotFoundError:
                continue
            if size > self.sizes[stream]:
                if self.fd is None:
                    self.fd = open_index(self.dir)
                self.sizes[stream] = size
                record(self.fd, stream, size, at)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)


class ChunkSampler:
    def __init__(self, now: Callable[[], float] = time.time, interval: float = INTERVAL_S):
        self.now = now
        self._watched: dict[Path, _Watched] = {}
        self._passes = PacedPasses(interval, MAX_SHARE, self.sample_all,
                                   lambda: bool(self._watched))

    def watch(self, attempt_dir: Path, fresh: bool = False) -> None:
        """`fresh`: no index of it was written before."""
        if attempt_dir not in self._watched:
            self._watched[attempt_dir] = _Watched(attempt_dir, fresh)
            self._passes.start()

    def unwatch(self, attempt_dir: Path) -> None:
        """The attempt ended: one last record for what it wrote since the last pass."""
        watched = self._watched.pop(attempt_dir, None)
        if watched is None:
            return
        try:
            watched.sample(self.now())
        except OSError:
            pass  # no index: the combined view falls back to file order
        watched.close()

    def sample_all(self) -> float:
        """One pass; how long it took (seconds)."""
        start = time.perf_counter()
        at = self.now()
        for watched in list(self._watched.values()):
            try:
                watched.sample(at)
            except OSError:
                pass
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop without final records: the attempts keep running, the next server goes on."""
        self._passes.stop()
        for watched in self._watched.values():
            watched.close()
        self._watched.clear()
