"""Pure placement decisions for engines whose capacity velda counts (the local engine).

No I/O, no clocks: the server hands in the queue and what is free, and gets back placements.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from velda.models import Allocation, Resources


@dataclass(frozen=True)
class Request:
    """A queued task asking for capacity. `ancestors` lists its ancestors, nearest first."""

    task_id: int
    pool: str
    need: Resources
    priority: int = 0
    ancestors: tuple[int, ...] = ()
    gang: int | None = None  # tasks with the same gang id start together or not at all


@dataclass
class Capacity:
    free: Resources
    free_gpus: list[int]
    lendable: dict[int, float] = field(default_factory=dict)  # blocked task -> CPUs it can lend
    pool_slots: dict[str, int] = field(default_factory=dict)  # pool -> tasks it may still start


@dataclass(frozen=True)
class Placement:
    task_id: int
    allocation: Allocation


def schedule(queue: Iterable[Request], capacity: Capacity) -> list[Placement]:
    """Decide which queued tasks start now.

    Order rules:
    1. `queue` is already ordered: lower priority number first, then oldest first. It is read
       lazily, and no further than needed: once nothing is free and nothing can be borrowed,
       the rest of the queue is not looked at.
    2. A task whose ancestor is blocked waiting for it (a `vrun` inside the ancestor) first
       borrows the ancestor's CPUs; this is what keeps orchestrating scripts from deadlocking.
    3. Otherwise a task (or a whole gang: shards queue next to each other) starts if it fits
       in what is free and not reserved.
    4. A task that does not fit reserves what is free, up to its need, so that a stream of
       smaller tasks behind it cannot starve it. One held back by its pool's slot limit
       (`capacity` in velda.toml) holds that pool's remaining slots the same way, and takes
       nothing from other pools.
    """
    placements: list[Placement] = []
    reserved = Resources()
    slots = dict(capacity.pool_slots)
    for group in _gangs(queue):
        if len(group) == 1 and (borrowed := _borrow(group[0], capacity, slots)):
            placements.append(borrowed)
            continue
        if not _slots_left(group, slots):
            for request in group:
                slots[request.pool] = 0
            continue
        total = _sum(r.need for r in group)
        room = capacity.free - reserved
        if total.fits_in(room) and total.gpus <= len(capacity.free_gpus):
            placements += [_take(r, capacity, slots) for r in group]
        else:
            reserved = reserved + _clamp_non_negative(room).clamp(total)
        if _nothing_left(capacity.free - reserved, capacity):
            break
    return placements


def _nothing_left(room: Resources, capacity: Capacity) -> bool:
    return room.cpus <= 1e-9 and room.gpus <= 0 and not any(
        v > 1e-9 for v in capacity.lendable.values()
    )


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


def _borrow(request: Request, capacity: Capacity, slots: dict[str, int]) -> Placement | None:
    if request.need.gpus or not _slots_left([request], slots):
        return None
    for ancestor in request.ancestors:
        if capacity.lendable.get(ancestor, 0.0) >= request.need.cpus - 1e-9:
            capacity.lendable[ancestor] -= request.need.cpus
            _use_slot(request, slots)
            return Placement(request.task_id, Allocation(request.need.cpus, (), ancestor))
    return None


def _take(request: Request, capacity: Capacity, slots: dict[str, int]) -> Placement:
    capacity.free = capacity.free - request.need
    gpu_ids = tuple(capacity.free_gpus[: request.need.gpus])
    del capacity.free_gpus[: request.need.gpus]
    _use_slot(request, slots)
    return Placement(request.task_id, Allocation(request.need.cpus, gpu_ids, None))


def _slots_left(group: list[Request], slots: dict[str, int]) -> bool:
    wanted: dict[str, int] = {}
    for r in group:
        wanted[r.pool] = wanted.get(r.pool, 0) + 1
    return all(slots.get(pool, n) >= n for pool, n in wanted.items())


def _use_slot(request: Request, slots: dict[str, int]) -> None:
    if request.pool in slots:
        slots[request.pool] -= 1


def _sum(needs: Iterable[Resources]) -> Resources:
    total = Resources()
    for need in needs:
        total = total + need
    return total


def _clamp_non_negative(r: Resources) -> Resources:
    return Resources(max(r.cpus, 0.0), max(r.gpus, 0))
