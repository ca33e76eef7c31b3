"""The ready queue (ready_queue.py) with the scheduler reading it, in memory: serving order
across pools, what a pass leaves queued, and a pool at its slot limit left unread."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from velda.models import Resources
from velda.ready_queue import ReadyQueue
from velda.scheduler import Capacity, Request, schedule


def queue_of(*requests: tuple[int, str, int]) -> ReadyQueue:
    """(task ID, pool, priority) each."""
    queue = ReadyQueue()
    for task_id, pool, priority in requests:
        queue.add(Request(task_id, pool, Resources(cpus=1), priority))
    return queue


def read(queue: ReadyQueue, limit: int | None = None) -> list[int]:
    with queue.scan() as scan:
        return [r.task_id for _, r in zip(range(limit or len(queue)), scan, strict=False)]


class Counted:
    """An iterable that counts what was read of it."""

    def __init__(self, items: Iterable[Request]) -> None:
        self.items, self.read = items, 0

    def __iter__(self) -> Iterator[Request]:
        for item in self.items:
            self.read += 1
            yield item


def test_a_scan_reads_every_pool_in_serving_order() -> None:
    queue = queue_of((1, "a", 0), (2, "b", 0), (3, "a", -1), (4, "c", 5), (5, "b", -1))
    assert read(queue) == [3, 5, 1, 2, 4]  # lower priority number first, then oldest


def test_what_a_scan_read_and_did_not_start_is_there_for_the_next() -> None:
    queue = queue_of((1, "a", 0), (2, "b", 0), (3, "a", 0))
    assert read(queue, 2) == [1, 2]
    queue.discard(1)  # it started
    assert read(queue) == [2, 3]
    assert len(queue) == 2


def test_a_skipped_pool_is_not_read_further_in_that_scan_only() -> None:
    queue = queue_of((1, "one", 0), (2, "one", 0), (3, "other", 0), (4, "one", 0))
    with queue.scan() as scan:
        seen = []
        for request in scan:
            seen.append(request.task_id)
            if request.pool == "one":
                scan.skip("one")
    assert seen == [1, 3]
    assert read(queue) == [1, 2, 3, 4]


def test_a_task_queued_again_is_read_once() -> None:
    queue = queue_of((1, "a", 0), (2, "a", 0))
    queue.discard(1)  # cancelled while queued: its entry stays in the heap for a while
    queue.add(Request(1, "a", Resources(cpus=1), 0))  # retried
    assert read(queue) == [1, 2]
    assert read(queue) == [1, 2]
    queue.discard(2)
    queue.add(Request(2, "a", Resources(cpus=1), -3))  # queued again, ahead of the rest
    assert read(queue) == [2, 1]


def a_pass(queue: ReadyQueue, slots: dict[str, int]) -> tuple[list[int], int]:
    """The tasks a scheduling pass with 4 CPUs free starts, and how many requests it read."""
    with queue.scan() as scan:
        counted = Counted(scan)
        placements = schedule(counted, Capacity(Resources(4, 0), [], slots), skip=scan.skip)
    return [p.task_id for p in placements], counted.read


def test_a_pass_does_not_read_the_queue_of_a_pool_at_its_limit() -> None:
    # 1,000 tasks wait for the one slot of pool "one", which a running task holds; a task of
    # another pool behind them starts at once, and the pass reads one of the 1,000 at most
    queue = queue_of(*[(i, "one", 0) for i in range(1, 1001)], (1001, "other", 0))
    started, looked_at = a_pass(queue, {"one": 0})
    assert started == [1001] and looked_at <= 2
    # the same when the pass itself takes the pool's last slot
    queue.discard(1001)
    started, looked_at = a_pass(queue, {"one": 1})
    assert started == [1] and looked_at <= 2
    assert len(queue) == 1000  # none of them lost: the start discards the one started
