"""Pure placement decisions for engines whose capacity velda counts (the local engine).

No I/O, no clocks: the server hands in the queue and what is free, and gets back placements.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from velda.models import Allocation, Resources


@dataclass(frozen=True)
class Request:
    """A queued task asking for capacity."""

    task_id: int
    pool: str
    need: Resources
    priority: int = 0
    gang: int | None = None  # tasks with the same gang id start together or not at all


@dataclass
class Capacity:
    """What is free now. `free.cpus` may be below zero: tasks that stopped waiting took their
    CPUs back while others ran on them; nothing more starts until it is positive again."""

    free: Resources
    free_gpus: list[int]
    pool_slots: dict[str, int] = field(default_factory=dict)  # pool -> tasks it may still start


@dataclass(frozen=True)
class Placement:
    task_id: int
    allocation: Allocation


def schedule(
    queue: Iterable[Request], capacity: Capacity, reserving: list[int] | None = None,
    skip: Callable[[str], None] = lambda pool: None,
) -> list[Placement]:
    """Decide which queued tasks start now.

    Order rules:
    1. `queue` is already ordered: lower priority number first, then oldest first. It is read
       lazily, and no further than needed: once nothing is free, the rest of the queue is not
       looked at.
    2. A task (or a whole gang: shards queue next to each other) starts if it fits in what is
       free and not reserved. CPUs of tasks blocked waiting for their children are free here
       already: the server leaves them out of what is used.
    3. A task that does not fit reserves what is free, up to its need, so that a stream of
       smaller tasks behind it cannot starve it; its ID is added to `reserving`, if given. One
       held back by its pool's slot limit (`capacity` in velda.toml) holds that pool's
       remaining slots the same way, and takes nothing from other pools.
    4. `skip(pool)` is told of each pool with no slot left in this pass: the queue may leave
       out the rest of its requests, which would be refused (ready_queue.py does, so that a
       long queue behind a full pool costs a pass nothing).
    """
    placements: list[Placement] = []
    reserved = Resources()
    slots = dict(capacity.pool_slots)
    for pool in [pool for pool, left in slots.items() if left <= 0]:
        skip(pool)
    for group in _gangs(queue):
        if not _slots_left(group, slots):
            for request in group:
                slots[request.pool] = 0
                skip(request.pool)
            continue
        total = _sum(r.need for r in group)
        room = capacity.free - reserved
        if total.fits_in(room) and total.gpus <= len(capacity.free_gpus):
            placements += [_take(r, capacity, slots, skip) for r in group]
        else:
            held = _clamp_non_negative(room).clamp(total)
            if reserving is not None and (held.cpus > 1e-9 or held.gpus):
                reserving.append(group[0].task_id)
            reserved = reserved + held
        if _nothing_left(capacity.free - reserved):
            break
    return placements


def _nothing_left(room: Resources) -> bool:
    return room.cpus <= 1e-9 and room.gpus <= 0


def _gangs(queue: Iterable[Request]) -> Iterator[list[Request]]:
    """Consecutive requests of one gang form one group; every other request is alone."""
    group: list[Request] = []
    for request in queue:
        if group and (request.gang is None or request.gang != group[0].gang):
            yield group
            group = []
        group.append(request)
    if group:
        yield group


def _take(request: Request, capacity: Capacity, slots: dict[str, int],
          skip: Callable[[str], None]) -> Placement:
    capacity.free = capacity.free - request.need
    gpu_ids = tuple(capacity.free_gpus[: request.need.gpus])
    del capacity.free_gpus[: request.need.gpus]
    _use_slot(request, slots, skip)
    return Placement(request.task_id, Allocation(request.need.cpus, gpu_ids))


def _slots_left(group: list[Request], slots: dict[str, int]) -> bool:
    wanted: dict[str, int] = {}
    for r in group:
        wanted[r.pool] = wanted.get(r.pool, 0) + 1
    return all(slots.get(pool, n) >= n for pool, n in wanted.items())


def _use_slot(request: Request, slots: dict[str, int], skip: Callable[[str], None]) -> None:
    """A slot of its pool, where the pool has a limit: the pool's last one, and the rest of
    its queue is skipped."""
    if request.pool in slots:
        slots[request.pool] -= 1
        if slots[request.pool] <= 0:
            skip(request.pool)


def _sum(needs: Iterable[Resources]) -> Resources:
    total = Resources()
    for need in needs:
        total = total + need
    return total


def _clamp_non_negative(r: Resources) -> Resources:
    return Resources(max(r.cpus, 0.0), max(r.gpus, 0))
