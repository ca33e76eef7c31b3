"""Queued tasks in serving order: lower priority number first, then submit order (task ID).

A scheduling pass reads it only as far as it needs: with 10,000 tasks queued and two free
CPUs, a pass looks at a handful of them, not at all of them. Each pool has a heap of its own,
merged as the pass reads, so that a pool the pass has no slot left for (`capacity` in
velda.toml) is left out whole: 10,000 tasks queued behind a pool that runs one at a time
cost a pass nothing while the machine has CPUs free for others.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from contextlib import contextmanager

from velda.scheduler import Request

Entry = tuple[int, int]  # (priority, task ID): a request's place in its pool's heap


class ReadyQueue:
    def __init__(self) -> None:
        self._heaps: dict[str, list[Entry]] = {}  # pool -> its queued tasks, as a heap
        self._requests: dict[int, Request] = {}

    def add(self, request: Request) -> None:
        self._requests[request.task_id] = request
        heapq.heappush(self._heaps.setdefault(request.pool, []),
                       (request.priority, request.task_id))

    def discard(self, task_id: int) -> None:
        """Entries left in a heap are dropped lazily when a scan meets them."""
        self._requests.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._requests

    def requests(self) -> list[Request]:
        return list(self._requests.values())

    @contextmanager
    def scan(self) -> Iterator[Scan]:
        """Requests in order, read lazily; those still queued afterwards are put back."""
        scan = Scan(self._heaps, self._requests)
        try:
            yield scan
        finally:
            scan.put_back()


class Scan:
    """One reading of the queue: every pool's requests merged in serving order. `skip(pool)`
    leaves out the rest of a pool's requests; what was read stays read until `put_back`."""

    def __init__(self, heaps: dict[str, list[Entry]], requests: dict[int, Request]) -> None:
        self._heaps, self._requests = heaps, requests
        self._heads: list[tuple[int, int, str]] = []  # the head of each pool still read
        self._read: set[int] = set()  # task IDs
        self._skipped: set[str] = set()
        for pool in list(heaps):
            self._push_head(pool)

    def __iter__(self) -> Iterator[Request]:
        while self._heads:
            priority, task_id, pool = heapq.heappop(self._heads)
            if pool in self._skipped:
                continue
            heapq.heappop(self._heaps[pool])  # that head: nothing else changes it meanwhile
            self._push_head(pool)
            if task_id in self._read:  # queued again after a discard: its older entry
                continue
            self._read.add(task_id)
            yield self._requests[task_id]

    def skip(self, pool: str) -> None:
        """The rest of `pool` is not read in this scan."""
        self._skipped.add(pool)

    def put_back(self) -> None:
        """What was read and is still queued goes back to its pool's heap."""
        for task_id in self._read:
            request = self._requests.get(task_id)
            if request is not None:
                heapq.heappush(self._heaps.setdefault(request.pool, []),
                               (request.priority, task_id))

    def _push_head(self, pool: str) -> None:
        """The pool's first entry still queued joins the merge; those no longer queued (or
        queued again otherwise) are dropped on the way."""
        heap = self._heaps[pool]
        while heap:
            priority, task_id = heap[0]
            request = self._requests.get(task_id)
            if request is not None and (request.priority, request.pool) == (priority, pool):
                heapq.heappush(self._heads, (priority, task_id, pool))
                return
            heapq.heappop(heap)
        del self._heaps[pool]
