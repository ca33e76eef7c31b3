"""What sampling the usage of running tasks costs the server (server/usage.py).

Starts N real process trees like a local task's (a session led by a `sh` that runs a
`sleep`, as the status-file wrapper runs a command) and times the server's sampling pass over
them: walking each tree through /proc and appending one sample line per attempt. Next to it,
in the same run, the pass that keeps the log chunk index of as many attempts
(server/sampler.py), the other per-task work the server does while tasks run. Prints one
Markdown table: the median pass, the cost per running task per pass, and the server CPU per
running task per second at the sampling interval (what issue-level budgets compare).

    python bench/usage_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
from pathlib import Path

from velda.server.sampler import INTERVAL_S as CHUNK_INTERVAL_S
from velda.server.sampler import ChunkSampler
from velda.server.usage import INTERVAL_S, UsageSampler


def start_trees(root: Path, n: int) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """n sessions of two processes each, with their attempt directories."""
    trees = []
    for i in range(n):
        attempt_dir = root / f"{i}.1"
        attempt_dir.mkdir()
        for stream in ("stdout", "stderr"):
            (attempt_dir / stream).write_bytes(b"")
        proc = subprocess.Popen(["sh", "-c", "sleep 600; true"], start_new_session=True)
        trees.append((proc, attempt_dir))
    return trees


def stop_trees(trees: list[tuple[subprocess.Popen[bytes], Path]]) -> None:
    for proc, _ in trees:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def median_pass_ms(sample_all: object, rounds: int) -> float:
    assert callable(sample_all)
    return 1000 * statistics.median(sample_all() for _ in range(rounds))


def measure(n: int, rounds: int) -> tuple[float, float]:
    """(usage pass, chunk-index pass) over n running trees, in ms."""
    with tempfile.TemporaryDirectory() as tmp:
        trees = start_trees(Path(tmp), n)
        try:
            usage, chunks = UsageSampler(), ChunkSampler()
            for proc, attempt_dir in trees:
                usage.watch(attempt_dir, proc.pid)
                chunks.watch(attempt_dir)
            usage_ms = median_pass_ms(usage.sample_all, rounds)
            chunk_ms = median_pass_ms(chunks.sample_all, rounds)
            usage.close()
            chunks.close()
        finally:
            stop_trees(trees)
    return usage_ms, chunk_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks and rounds")
    args = parser.parse_args()
    sizes, rounds = ((10, 100), 10) if args.quick else ((10, 100, 500), 30)
    print(f"| running tasks | usage pass (every {INTERVAL_S:g} s) | per task per pass "
          f"| server CPU per running task per second | chunk-index pass (every "
          f"{CHUNK_INTERVAL_S * 1000:g} ms), same run | its CPU per task per second |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in sizes:
        usage_ms, chunk_ms = measure(n, rounds)
        per_task_us = 1000 * usage_ms / n
        usage_cpu = per_task_us / INTERVAL_S  # µs of CPU per task per second
        chunk_cpu = 1000 * chunk_ms / n / CHUNK_INTERVAL_S
        print(f"| {n} | {usage_ms:.2f} ms | {per_task_us:.0f} µs | {usage_cpu:.0f} µs/s "
              f"({usage_cpu / 1e4:.3f}% of a core) | {chunk_ms:.2f} ms "
              f"| {chunk_cpu:.0f} µs/s |")


if __name__ == "__main__":
    main()
