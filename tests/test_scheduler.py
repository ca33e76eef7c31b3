"""The scheduler's pure decisions, in memory."""

from __future__ import annotations

from velda.models import Resources
from velda.scheduler import Capacity, Request, schedule


def cap(cpus: float, gpus: int = 0, **kw: object) -> Capacity:
    return Capacity(Resources(cpus, gpus), list(range(gpus)), **kw)  # type: ignore[arg-type]


def req(task_id: int, cpus: float = 1, gpus: int = 0, **kw: object) -> Request:
    return Request(task_id, kw.pop("pool", "p"), Resources(cpus, gpus), **kw)  # type: ignore[arg-type]


def started(queue: list[Request], capacity: Capacity) -> list[int]:
    return [p.task_id for p in schedule(queue, capacity)]


def test_fills_free_capacity_in_order() -> None:
    assert started([req(1), req(2), req(3)], cap(2)) == [1, 2]


def test_hands_out_distinct_gpus() -> None:
    placements = schedule([req(1, gpus=1), req(2, gpus=2), req(3, gpus=1)], cap(8, 3))
    assert [(p.task_id, p.allocation.gpu_ids) for p in placements] == [(1, (0,)), (2, (1, 2))]


def test_a_big_task_reserves_so_small_ones_cannot_starve_it() -> None:
    # 1 CPU free: the cpu-2 task at the head cannot start; the cpu-1 task behind it must not
    # take that CPU, or a stream of small tasks would starve the big one forever.
    assert started([req(1, cpus=2), req(2, cpus=1)], cap(1)) == []
    # with room for both, both start
    assert started([req(1, cpus=2), req(2, cpus=1)], cap(3)) == [1, 2]


def test_oversubscribed_free_starts_nothing_until_positive() -> None:
    # a blocked task took its CPUs back while others ran on them: free is below zero
    assert started([req(1), req(2, cpus=0.5)], cap(-1)) == []
    assert started([req(1), req(2)], cap(1)) == [1]


def test_a_task_that_does_not_fit_is_named_as_reserving() -> None:
    reserving: list[int] = []
    placements = schedule([req(1, cpus=2), req(2, cpus=1)], cap(1), reserving)
    assert placements == [] and reserving == [1]
    # nothing free: nothing held back, nobody named
    reserving = []
    assert schedule([req(1, cpus=2)], cap(0), reserving) == [] and reserving == []


def test_gpus_stay_distinct_when_cpus_are_plenty() -> None:
    placements = schedule([req(1, gpus=1), req(2, gpus=1)], cap(8, 1))
    assert [(p.task_id, p.allocation.gpu_ids) for p in placements] == [(1, (0,))]


def test_gang_starts_all_or_nothing() -> None:
    gang = [req(i, gang=7) for i in (1, 2, 3)]
    assert started(gang, cap(2)) == []
    assert started(gang, cap(3)) == [1, 2, 3]


def test_gang_waiting_blocks_later_small_tasks() -> None:
    gang = [req(i, gang=7) for i in (1, 2, 3)]
    assert started([*gang, req(4)], cap(2)) == []


def test_pool_slots_limit_a_pool_and_not_the_others() -> None:
    queue = [req(1, pool="one"), req(2, pool="one"), req(3, pool="other")]
    assert started(queue, cap(4, pool_slots={"one": 1})) == [1, 3]


def test_a_gang_waiting_for_slots_holds_them_against_later_tasks() -> None:
    queue = [req(1, pool="two", gang=5), req(2, pool="two", gang=5), req(3, pool="two")]
    assert started(queue, cap(4, pool_slots={"two": 1})) == []
