"""Queued tasks in serving order: lower priority number first, then submit order (task ID).

A scheduling pass reads it only as far as it needs: with 10,000 tasks queued and two free
CPUs, a pass looks at a handful of them, not at all of them.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from contextlib import contextmanager

from velda.scheduler import Request


class ReadyQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, int]] = []
        self._requests: dict[int, Request] = {}

    def add(self, request: Request) -> None:
        self._requests[request.task_id] = request
        heapq.heappush(self._heap, (request.priority, request.task_id))

    def discard(self, task_id: int) -> None:
        """Entries left in the heap are dropped lazily when a scan meets them."""
        self._requests.pop(task_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def __contains__(self, task_id: int) -> bool:
        return task_id in self._requests

    def requests(self) -> list[Request]:
        return list(self._requests.values())

    @contextmanager
    def scan(self) -> Iterator[Iterator[Request]]:
        """Requests in order, read lazily; those still queued afterwards are put back."""
        seen: list[tuple[int, int]] = []

        def ordered() -> Iterator[Request]:
            while self._heap:
                entry = heapq.heappop(self._heap)
                request = self._requests.get(entry[1])
                if request is None or request.priority != entry[0]:
                    continue
                seen.append(entry)
                yield request

        try:
            yield ordered()
        finally:
            for entry in seen:
                if entry[1] in self._requests:
                    heapq.heappush(self._heap, entry)
