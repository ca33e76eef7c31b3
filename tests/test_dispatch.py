"""What the local dispatch counts as free while tasks come and go: CPUs, GPUs, pool slots, and
the CPUs a blocked task lends. In memory, no engine processes."""

from __future__ import annotations

from velda.config import Config
from velda.models import Allocation, Pool, Resources
from velda.server.blocked import Blocked
from velda.server.dispatch import LocalDispatch


class Machine:
    name, places_work = "local", False

    def capacity(self) -> Resources:
        return Resources(cpus=8, gpus=2)


def dispatch(blocked: Blocked) -> LocalDispatch:
    etl = Pool("etl", "local", Resources(cpus=1), capacity=2)
    config = Config(pools={"etl": etl})
    return LocalDispatch(Machine(), blocked, lambda: config)  # type: ignore[arg-type]


def test_what_running_tasks_hold_is_not_free_until_they_end() -> None:
    d = dispatch(Blocked(lambda task_id, on: None))
    d.hold(1, Allocation(cpus=1), "etl")
    d.hold(2, Allocation(cpus=2, gpu_ids=(0,)), "gpu-1")
    d.hold(3, Allocation(cpus=1), "etl")
    free = d.free_capacity()
    assert (free.free.cpus, free.free.gpus, free.free_gpus) == (4, 1, [1])
    assert free.pool_slots == {"etl": 0}
    assert d.release(2) and not d.release(2)
    d.release(1)
    free = d.free_capacity()
    assert (free.free.cpus, free.free_gpus, free.pool_slots) == (7, [0, 1], {"etl": 1})
    d.release(3)
    assert d.free_capacity().free == Resources(cpus=8, gpus=2)


def test_holding_again_counts_once() -> None:
    d = dispatch(Blocked(lambda task_id, on: None))
    d.hold(1, Allocation(cpus=2, gpu_ids=(1,)), "etl")
    d.hold(1, Allocation(cpus=2, gpu_ids=(1,)), "etl")  # adopted again after a restart
    free = d.free_capacity()
    assert (free.free.cpus, free.free_gpus, free.pool_slots) == (6, [0], {"etl": 1})


def test_a_blocked_task_lends_its_cpus_but_keeps_its_gpus() -> None:
    blocked = Blocked(lambda task_id, on: None)
    d = dispatch(blocked)
    d.hold(1, Allocation(cpus=4, gpu_ids=(0,)), "gpu-1")
    d.hold(2, Allocation(cpus=2), "cpu-2")
    blocked.submitted(99, 1)  # task 1 waits in a vrun for its child 99
    free = d.free_capacity()
    assert (free.free.cpus, free.free_gpus) == (6, [1])
    blocked.ended(99)
    assert d.free_capacity().free.cpus == 2
