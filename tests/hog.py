"""A task that uses a known amount of CPU and memory, and reading back what velda measured of
it (`usage` in the task's JSON): for the usage tests of local pools (test_usage.py) and of
Ray pools (test_ray_pools.py)."""

from __future__ import annotations

import json
import time

from velda_cli import Velda

MB = 1024 * 1024

HOG = """
import sys, time
megabytes, seconds = int(sys.argv[1]), float(sys.argv[2])
block = bytearray(megabytes * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
start = time.process_time()
while time.process_time() - start < seconds:
    pass
print(round(time.process_time() - start, 3))
"""


def hog_command(velda: Velda, megabytes: int, seconds: float) -> list[str]:
    """A command that holds that many megabytes of memory (touched) and spins until it has
    used that many CPU seconds (not wall seconds: a busy machine must not make it use less),
    then prints the CPU seconds it spun."""
    script = velda.cwd / "hog.py"
    script.write_text(HOG)
    return ["python3", str(script), str(megabytes), str(seconds)]


def usage(velda: Velda, ref: str) -> dict[str, object]:
    """The task's `usage`; empty while nothing is measured yet (it has not started)."""
    task = json.loads(velda.run("velda", "task", "get", ref, "-o", "json", check=True).stdout)
    return dict(task["usage"] or {})


def wait_for(velda: Velda, ref: str, samples: int, timeout: float = 30) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        found = usage(velda, ref)
        if int(str(found.get("samples", 0))) >= samples:
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
