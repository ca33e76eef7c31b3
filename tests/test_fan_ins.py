"""Fan-ins, paced (server/fan_ins.py): a dependent whose dependencies take long to read is
read again at most once a pace, and never left waiting; and through a real server, paced
dependents are decided exactly as the dependency rules say."""

from __future__ import annotations

import asyncio
import json
import sys

from velda.server.fan_ins import FanIns
from velda_cli import Velda


def test_a_slowly_read_dependent_is_stepped_once_after_its_pace() -> None:
    async def scenario() -> list[int]:
        stepped: list[int] = []
        fan_ins = FanIns(stepped.append, slow_s=0.001, pace_s=0.05)
        fan_ins.read(7, took=0.002)  # 5,000 upstreams' worth
        assert all(fan_ins.held(7) for _ in range(100))  # 100 upstreams end meanwhile
        assert stepped == []
        await asyncio.sleep(0.2)
        assert not fan_ins.held(7)  # its pace is over: read it now
        return stepped

    assert asyncio.run(scenario()) == [7]


def test_a_dependent_read_quickly_is_never_held() -> None:
    async def scenario() -> None:
        fan_ins = FanIns(lambda task_id: None, slow_s=0.001, pace_s=0.05)
        fan_ins.read(3, took=0.00005)  # a link of a chain
        assert not fan_ins.held(3)
        fan_ins.read(4, took=0.002)
        fan_ins.read(4, took=0.00005)  # read quickly since: no longer held
        assert not fan_ins.held(4)
        assert len(fan_ins) == 0

    asyncio.run(scenario())


def test_a_held_dependent_decided_meanwhile_is_not_stepped_again() -> None:
    async def scenario() -> list[int]:
        stepped: list[int] = []
        fan_ins = FanIns(stepped.append, slow_s=0.001, pace_s=0.05)
        fan_ins.read(9, took=0.002)
        assert fan_ins.held(9)
        fan_ins.forget(9)  # cancelled, say
        await asyncio.sleep(0.2)
        return stepped

    assert asyncio.run(scenario()) == []


def test_a_slow_pace_is_twenty_times_the_reading() -> None:
    async def scenario() -> None:
        fan_ins = FanIns(lambda task_id: None, slow_s=0.001, pace_s=0.05)
        fan_ins.read(5, took=0.01)  # 0.2 s of pace
        await asyncio.sleep(0.1)
        assert fan_ins.held(5)

    asyncio.run(scenario())


def _submit_many(velda: Velda, bodies: list[dict[str, object]]) -> list[str]:
    script = ("import json, sys, velda\n"
              "tasks = velda.Client().submit_many(json.load(sys.stdin))\n"
              "print(json.dumps([t['id'] for t in tasks]))\n")
    out = velda.run(sys.executable, "-c", script, input=json.dumps(bodies), check=True).stdout
    return [str(task_id) for task_id in json.loads(out)]


def test_paced_dependents_are_decided_by_the_dependency_rules(velda: Velda) -> None:
    """Every dependent paced (however fast this machine reads them): a fan-in of 200 runs
    once after all succeeded, one with a failed upstream fails upstream, and a chain's links
    each run after the one before."""
    velda.env["VELDA_FAN_IN_PACE_FROM_S"] = "0"
    gate = velda.vbatch("sleep", "1")
    ok = _submit_many(velda, [{"command": ["true"], "cwd": "/", "after": [gate]}] * 200)
    bad = _submit_many(velda, [{"command": ["true"], "cwd": "/", "after": [gate]}] * 99
                       + [{"command": ["false"], "cwd": "/", "after": [gate]}])
    after_ok = velda.vbatch("--after-success", ",".join(ok), "echo", "gathered")
    after_bad = velda.vbatch("--after-success", ",".join(bad), "echo", "never")
    chain = [velda.vbatch("--after-success", gate, "echo", "link 0")]
    for n in range(1, 4):
        chain.append(velda.vbatch("--after-success", chain[-1], "echo", f"link {n}"))
    assert velda.wait(after_ok)["status"] == "SUCCESS"
    assert velda.log(after_ok).stdout == "gathered\n"
    assert velda.wait(after_bad)["status"] == "FAILED_UPSTREAM"
    for n, task_id in enumerate(chain):
        assert velda.wait(task_id)["status"] == "SUCCESS"
        assert velda.log(task_id).stdout == f"link {n}\n"
    started = [velda.get(task_id)["started_at"] for task_id in chain]
    assert started == sorted(started)
