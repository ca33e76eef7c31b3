"""The Ray engine on a local two-node Ray cluster (tests/ray_cluster.py), driven directly.

Progress goes to stderr, one Markdown table to stdout:

    python bench/ray_bench.py [--quick]

Rows: submit-to-running and submit-to-exit of `true` (median of N, one at a time); N trivial
tasks submitted at once; a task writing M MiB to stdout next to the same command writing to a
file; memory of the engine's bridge process (the Ray driver).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ray_cluster import start_cluster  # noqa: E402 - tests/ray_cluster.py
from velda.engines.base import Handle, Launch  # noqa: E402
from velda.engines.ray import RayEngine  # noqa: E402
from velda.models import Exit, Pool, Resources  # noqa: E402


class Events:
    def __init__(self) -> None:
        self.started: dict[str, float] = {}
        self.ended: dict[str, tuple[float, Exit]] = {}

    def running(self, task_id: str, attempt: int, handle: Handle) -> None:
        self.started[task_id] = time.monotonic()

    def exited(self, task_id: str, attempt: int, exit: Exit) -> None:
        self.ended[task_id] = (time.monotonic(), exit)


class Bench:
    def __init__(self, address: str, work: Path) -> None:
        self.events = Events()
        self.pool = Pool("ray", "ray", Resources(cpus=1), {"address": address})
        self.engine = RayEngine(self.pool, self.events)
        self.work = work
        self.count = 0

    def launch(self, argv: list[str]) -> Launch:
        self.count += 1
        task_dir = self.work / str(self.count)
        task_dir.mkdir()
        return Launch(str(self.count), 1, argv, str(self.work), {"PATH": os.environ["PATH"]},
                      self.pool, (), task_dir, task_dir / "stdout", task_dir / "stderr")

    async def run(self, launches: list[Launch]) -> float:
        started = time.monotonic()
        for launch in launches:
            await self.engine.start(launch)
        while not all(launch.task_id in self.events.ended for launch in launches):
            await asyncio.sleep(0.002)
        return time.monotonic() - started

    async def latency(self, n: int) -> tuple[float, float]:
        to_running, to_exit = [], []
        for _ in range(n):
            launch = self.launch(["true"])
            started = time.monotonic()
            await self.run([launch])
            to_running.append(self.events.started[launch.task_id] - started)
            to_exit.append(self.events.ended[launch.task_id][0] - started)
        return statistics.median(to_running), statistics.median(to_exit)

    async def output(self, mib: int) -> tuple[float, float]:
        launch = self.launch(["head", "-c", f"{mib}M", "/dev/zero"])
        elapsed = await self.run([launch])
        assert launch.stdout_path.stat().st_size == mib << 20
        started = time.monotonic()
        subprocess.run(f"head -c {mib}M /dev/zero > {self.work}/to-file", shell=True, check=True)
        return elapsed, time.monotonic() - started


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


async def measure(address: str, quick: bool) -> list[tuple[str, str]]:
    n, flood, mib = (10, 50, 50) if quick else (50, 500, 500)
    with tempfile.TemporaryDirectory() as work:
        bench = Bench(address, Path(work))
        await bench.engine.check(bench.pool)
        rows = []
        print("latency ...", file=sys.stderr)
        running, ended = await bench.latency(n)
        rows.append((f"submit to running, `true` (median of {n})", f"{running * 1000:.1f} ms"))
        rows.append((f"submit to exit, `true` (median of {n})", f"{ended * 1000:.1f} ms"))
        print("flood ...", file=sys.stderr)
        elapsed = await bench.run([bench.launch(["true"]) for _ in range(flood)])
        rows.append((f"{flood} trivial tasks at once", f"{flood / elapsed:.0f} tasks/s"))
        print("output ...", file=sys.stderr)
        ray_s, file_s = await bench.output(mib)
        rows.append((f"{mib} MiB to stdout (vs to a file)",
                     f"{ray_s:.2f} s = {mib / ray_s:.0f} MiB/s ({file_s:.2f} s, "
                     f"{ray_s / file_s:.1f}x)"))
        bridge = bench.engine._bridge
        if bridge is not None:
            rows.append(("bridge (Ray driver) RSS", f"{rss_mb(bridge.proc.pid):.0f} MB"))
        await bench.engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks, less output")
    args = parser.parse_args()
    print("starting a two-node Ray cluster ...", file=sys.stderr)
    cluster = start_cluster()
    try:
        rows = asyncio.run(measure(cluster.address, args.quick))
    finally:
        cluster.stop()
    print("| Ray engine | measured |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
