"""velda on a Slurm pool next to bare `sbatch` of the same jobs, on one real Slurm cluster.

Starts the two-node test cluster of tests/slurm_cluster.py (root: it runs in a network
namespace) and, inside that namespace, a private velda server (a temporary VELDA_HOME) whose
pool `batch` is the cluster's partition (1 CPU per task). Then, in the same run, the same
jobs go both ways. Progress goes to stderr, one Markdown table to stdout:

    sudo python bench/slurm_bench.py [--quick]

Rows: submit to start, the median over jobs run one at a time: from just before the submit
(velda: the API's POST; bare: running `sbatch --parsable`) to the moment the job's command
ran on its node, which it writes itself (`date +%s.%N`), since Slurm keeps start times to the
second. Then many trivial jobs (`true`) submitted at once: from the first submit to the end
of the last (velda: every task final; bare: none left in `squeue`), as jobs per second. The
ratio is velda's time over bare Slurm's: velda's added cost, against its 1.2× promise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test cluster and the CLI driver

from velda.client import Client  # noqa: E402

POLL_S = 0.01
TIMEOUT_S = 300
PROMISE = 1.2
POOL = '[pools.batch]\nengine = "slurm"\npartition = "debug"\ncpus = 1\n'
SBATCH = ["sbatch", "--parsable", "--partition=debug", "--cpus-per-task=1",
          "--output=/dev/null", "--error=/dev/null"]


@dataclass
class Sizes:
    one_by_one: int = 20
    flood: int = 200


QUICK = Sizes(one_by_one=5, flood=40)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_until(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {TIMEOUT_S} s")
        time.sleep(POLL_S)


def started_at(marker: Path) -> float:
    wait_until(lambda: marker.exists() and marker.read_text().strip() != "", f"{marker}")
    return float(marker.read_text())


# ---------------------------------------------------------------- inside the namespace


def bare_start_s(work: Path, i: int) -> float:
    marker = work / f"bare-{i}"
    before = time.time()
    subprocess.run([*SBATCH, "--wrap", f"date +%s.%N > {marker}"], check=True,
                   capture_output=True)
    return started_at(marker) - before


def bare_flood_s(n: int) -> float:
    before = time.monotonic()
    jobs = [subprocess.run([*SBATCH, "--wrap", "true"], check=True, capture_output=True,
                           text=True).stdout.strip() for _ in range(n)]

    def none_left() -> bool:
        queue = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(jobs)],
                               capture_output=True, text=True).stdout
        return not queue.strip()

    wait_until(none_left, "bare jobs gone from squeue")
    return time.monotonic() - before


def velda_start_s(client: Client, work: Path, i: int) -> float:
    marker = work / f"velda-{i}"
    before = time.time()
    client.submit(command=["sh", "-c", f"date +%s.%N > {marker}"],
                  pool="batch", cwd=str(work))
    return started_at(marker) - before


def velda_flood_s(client: Client, work: Path, n: int) -> float:
    before = time.monotonic()
    ids = [client.submit(command=["true"], pool="batch",
                         cwd=str(work))["id"] for _ in range(n)]
    first = int(ids[0])

    def all_final() -> bool:
        page = client.list_tasks(all="1", status="SUCCESS",
                                 page_size=1000)
        return sum(1 for t in page["tasks"] if int(t["id"]) >= first) >= n

    wait_until(all_final, "velda tasks final")
    return time.monotonic() - before


def measure_inside(work: Path, sizes: Sizes) -> dict[str, float]:
    client = Client()
    client.submit(command=["true"], pool="batch", cwd=str(work))  # warm: sinfo, the engine
    results: dict[str, list[float]] = {"bare": [], "velda": []}
    say(f"submit to start, {sizes.one_by_one} jobs one at a time each way")
    for i in range(sizes.one_by_one):  # interleaved, so that drift hits both alike
        results["bare"].append(bare_start_s(work, i))
        results["velda"].append(velda_start_s(client, work, i))
    say(f"{sizes.flood} jobs of `true` at once, bare sbatch")
    bare_flood = bare_flood_s(sizes.flood)
    say(f"{sizes.flood} tasks of `true` at once, velda")
    velda_flood = velda_flood_s(client, work, sizes.flood)
    return {"bare_start": statistics.median(results["bare"]),
            "velda_start": statistics.median(results["velda"]),
            "bare_flood": bare_flood, "velda_flood": velda_flood}


# ---------------------------------------------------------------- outside: the cluster


def run_inside(prefix: list[str], env: dict[str, str], root: Path, sizes: Sizes
               ) -> dict[str, float]:
    from velda_cli import Velda

    velda = Velda(root / "home", root / "work", prefix=prefix)
    velda.env.update(SLURM_CONF=env["SLURM_CONF"])
    velda.configure(POOL)
    velda.run("velda", "server", "start", check=True)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, __file__, "--inside", str(root / "work"),
             str(sizes.one_by_one), str(sizes.flood)],
            env=velda.env, capture_output=True, text=True, timeout=4 * TIMEOUT_S)
        sys.stderr.write(result.stderr)
        if result.returncode != 0:
            raise RuntimeError(f"the measuring half failed ({result.returncode})")
        return dict(json.loads(result.stdout))
    finally:
        velda.shutdown()


def table(r: dict[str, float], sizes: Sizes) -> str:
    start_ratio = r["velda_start"] / r["bare_start"]
    flood_ratio = r["velda_flood"] / r["bare_flood"]

    def verdict(ratio: float) -> str:
        return f"{ratio:.2f}× ({'within' if ratio <= PROMISE else 'above'} {PROMISE}×)"

    return "\n".join([
        "| what | velda on Slurm | bare sbatch, same run | ratio |",
        "| --- | --- | --- | --- |",
        f"| submit to start (median of {sizes.one_by_one}) | {1000 * r['velda_start']:.0f} ms "
        f"| {1000 * r['bare_start']:.0f} ms | {verdict(start_ratio)} |",
        f"| {sizes.flood} × `true` at once | {sizes.flood / r['velda_flood']:.1f} jobs/s "
        f"({r['velda_flood']:.1f} s) | {sizes.flood / r['bare_flood']:.1f} jobs/s "
        f"({r['bare_flood']:.1f} s) | {verdict(flood_ratio)} |",
    ])


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--inside":
        work, one_by_one, flood = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
        print(json.dumps(measure_inside(work, Sizes(one_by_one, flood))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs")
    args = parser.parse_args()
    sizes = QUICK if args.quick else Sizes()
    from slurm_cluster import SlurmCluster, missing_tools, searchable_tmpdir

    absent = missing_tools()
    if absent or os.geteuid() != 0:
        sys.exit(f"slurm_bench: needs root and {', '.join(absent) or 'slurm-wlm, munge'}"
                 " (scripts/test.sh installs them)")
    root = Path(tempfile.mkdtemp(prefix="vslurm-bench-", dir=searchable_tmpdir()))
    root.chmod(0o755)  # munged's socket below must be reachable by all
    cluster = SlurmCluster()
    try:
        say("starting the two-node Slurm cluster")
        cluster.start(root / "cluster")
        results = run_inside(cluster.prefix, cluster.env, root, sizes)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(table(results, sizes))


if __name__ == "__main__":
    main()
