"""A Ray pool next to the local pool and next to Ray's own APIs, on one Ray cluster.

Starts a one-node Ray cluster (2 CPUs, with its dashboard: the Jobs API needs it) and a private
velda server (a temporary VELDA_HOME) whose velda.toml has a Ray pool on that cluster, then
runs trivial tasks (`true`) five ways. Progress goes to stderr, one Markdown table to stdout:

    python bench/ray_bench.py [--quick]

Rows: velda's local pool `shell`; velda's Ray pool (1 CPU per task), its tasks submitted many
at once one request each (from 4 threads, a `Client` each) and then all in one `submit_many`
request; Ray's tasks API, a remote function that runs `true` in a subprocess (the floor under
the Ray pool: what the engine adds is the rest); Ray's tasks API running velda's node side
alone (`ray_node.run_attempt`, what the bridge submits for each attempt, here submitted by a
bare driver: it splits what a Ray pool adds into its node side and its server and bridge);
Ray's Job Submission API with `true` as the entrypoint (`--no-jobs` leaves it out; it is left
out by itself when the dashboard's agent does not come up). Columns: submit to start and submit
to done (medians of tasks run one at a time), and tasks per second when many are submitted at
once (from the first submit to the end of the last). A second table sets the Ray pool against
Ray's tasks API of the same run, as ratios next to their goals; a third says where the CPU of
each one's flood went, per task, by process (velda's server, the Ray driver: velda's bridge or,
for the two bare rows, the bench itself, Ray's workers without the commands they ran, Ray's own
daemons, and the bench as velda's client). "Start" is what each system records: velda's
`started_at - created_at` (for Ray, when the command really started on the node); for a Ray
task the time its function began, or for the node side alone when it started the command; for a
job, when its status left PENDING (polled every 5 ms).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
FINAL = {"SUCCESS", "FAILURE", "FAILED_UPSTREAM", "SKIPPED", "CANCELLED"}
OPEN = "PENDING,QUEUED,RUNNING,RUNNING_SUBTASKS"
START_TIMEOUT_S = 120
AGENT_TIMEOUT_S = 30
POLL_S = 0.005
SUBMITTERS = 4


@dataclass
class Row:
    name: str
    start_s: float  # median submit -> start
    done_s: float  # median submit -> done
    runs: int  # ... of this many, one at a time
    rate: float  # tasks/s, many at once
    flood: int  # ... this many
    cpu: dict[str, float] = field(default_factory=dict)  # CPU s per task of the flood, by part


@dataclass
class Sizes:
    one_by_one: int = 30
    flood: int = 1000  # a flood of bare Ray tasks lasts about a second: shorter ones are noise
    jobs_one_by_one: int = 10
    jobs_flood: int = 40


QUICK = Sizes(one_by_one=8, flood=40, jobs_one_by_one=4, jobs_flood=8)


# ---------------------------------------------------------------- the cluster (a child process)


@dataclass
class Cluster:
    address: str
    dashboard: str
    proc: subprocess.Popen[str]

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # Ray's daemons share its group


def start_cluster() -> Cluster:
    proc = subprocess.Popen([sys.executable, __file__, "--serve-cluster"], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ok "):
        proc.kill()
        raise SystemExit(f"the Ray cluster did not start ({line.strip() or 'no answer'})")
    address, dashboard = line.split()[1:]
    cluster = Cluster(address, dashboard, proc)
    wait_until(lambda: http_ok(f"{dashboard}/api/version"), START_TIMEOUT_S, "Ray dashboard")
    return cluster


def serve_cluster() -> None:
    """Runs in the child: a one-node cluster until stdin closes."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # Ray's chatter to stderr
    root = tempfile.mkdtemp(prefix="vrb-", dir="/tmp")  # short: Ray's socket paths
    temp_dir = os.path.join(root, "ray")
    os.mkdir(temp_dir)
    # ray.cluster_utils writes ray_current_cluster under $RAY_TMPDIR/ray whatever temp_dir
    # says; by default that is /tmp/ray, which exists only where Ray ran before.
    os.environ["RAY_TMPDIR"] = root
    from ray.cluster_utils import Cluster as RayCluster

    port = free_port()
    cluster = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 150 << 20, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": port, "temp_dir": temp_dir,
    })
    cluster.wait_for_nodes()
    answers.write(f"ok {cluster.address} http://127.0.0.1:{port}\n")
    answers.flush()
    sys.stdin.read()
    cluster.shutdown()
    shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- velda


@contextlib.contextmanager
def velda_server(address: str, work: Path) -> Iterator[Any]:
    home = work / "home"
    config = work / "velda.toml"
    config.write_text(f'[pools.ray]\nengine = "ray"\naddress = "{address}"\ncpus = 1\n')
    os.environ.update(VELDA_HOME=str(home), VELDA_CONFIG=str(config), VELDA_PORT="0")
    for name in ("VELDA_SERVER", "VELDA_TOKEN", "VELDA_TASK_ID"):
        os.environ.pop(name, None)
    from velda.client import Client

    try:
        yield Client()
    finally:
        subprocess.run([str(BIN / "velda"), "server", "stop"], capture_output=True, check=False)


def velda_row(client: Any, pool: str, sizes: Sizes, work: Path) -> Row:
    request = {"command": ["true"], "pool": pool, "cwd": str(work),
               "env": {"PATH": os.environ["PATH"]}}
    client.submit(**request)  # warm-up: the Ray pool's driver and a worker start here
    ids, dones = [], []
    for _ in range(sizes.one_by_one):
        submitted = time.monotonic()
        task = client.submit(**request)
        while task["status"] not in FINAL:
            time.sleep(POLL_S)
            task = client.get(task["id"])
        dones.append(time.monotonic() - submitted)
        ids.append(int(task["id"]))
    starts = stored_starts(work, ids)
    began = time.monotonic()
    wait_all(client, submit_each(request, sizes.flood))
    return Row(f"velda, pool `{pool}`", statistics.median(starts), statistics.median(dones),
               sizes.one_by_one, sizes.flood / (time.monotonic() - began), sizes.flood)


def submit_each(request: dict[str, Any], n: int, submitters: int = SUBMITTERS) -> list[str]:
    """n submits of `request`, one a request, from `submitters` threads with a `Client`
    (and so a kept connection) each: the way a script's `xargs -P` or a program's threads
    submit many tasks one by one. One submitter alone pays each submit's round trip in
    turn, which on two cores shared with Ray's workers, not the server, sets its pace."""
    from velda.client import Client

    def submit(count: int) -> list[str]:
        client = Client()
        return [client.submit(**request)["id"] for _ in range(count)]

    counts = [n // submitters + (i < n % submitters) for i in range(submitters)]
    with concurrent.futures.ThreadPoolExecutor(submitters) as pool:
        shares = list(pool.map(submit, counts))  # a submit that failed raises here
    return [i for share in shares for i in share]


def velda_batch_row(client: Any, pool: str, sizes: Sizes, work: Path) -> Row:
    """Many at once the way a program submits them: one `submit_many` request."""
    request = {"command": ["true"], "pool": pool, "cwd": str(work),
               "env": {"PATH": os.environ["PATH"]}}
    cpu = cpu_by_part(bench="client")
    began = time.monotonic()
    wait_all(client, [task["id"] for task in client.submit_many([request] * sizes.flood)])
    rate = sizes.flood / (time.monotonic() - began)
    return Row(f"velda, pool `{pool}`, one `submit_many`", math.nan, math.nan, 0, rate,
               sizes.flood, spent_per_task(cpu, cpu_by_part(bench="client"), sizes.flood))


def wait_all(client: Any, ids: list[str]) -> None:
    """Until every one of `ids` is final. They are the only tasks the bench's server has
    open, so one small list request every 20 ms tells: asking after each task in turn costs
    the server a request a task, two thirds as much CPU as running it on a Ray pool, which
    bare Ray's `ray.get` of a list does not pay."""
    while client.list_tasks(all=1, status=OPEN, page_size=1)["tasks"]:
        time.sleep(0.02)
    unfinished = [i for i in ids[-1:] if client.get(i)["status"] not in FINAL]
    assert not unfinished, f"task {unfinished} is not final"


PARTS = ("server", "driver", "workers", "daemons", "client")


def cpu_by_part(bench: str) -> dict[str, float]:
    """CPU seconds (user + system) so far of the processes on this machine, summed by their
    part: velda's server, the Ray driver (velda's bridge, or this bench for bare Ray), Ray's
    workers (without the commands they ran), Ray's own daemons, and this bench as `bench`."""
    tick = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(PARTS, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            command = raw.replace(b"\0", b" ").decode("utf-8", "replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it ended meanwhile
        part = bench if int(entry.name) == os.getpid() else _part_of(command)
        if part is not None:
            totals[part] += (int(fields[11]) + int(fields[12])) / tick
    return totals


def _part_of(command: str) -> str | None:
    if "velda.server" in command:
        return "server"
    if "bridge_main" in command:
        return "driver"
    if command.startswith("ray::"):
        return "workers"
    return "daemons" if "/ray/" in command else None


def spent_per_task(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """What each part spent per task between two counts (a process that ended meanwhile is
    left out: none of these does during a flood)."""
    return {part: max(0.0, after[part] - before[part]) / n for part in PARTS}


def stored_starts(work: Path, ids: list[int]) -> list[float]:
    """`started_at - created_at` of each task as the store keeps them (the API shows
    milliseconds: a median of those would be a whole number of them)."""
    db = sqlite3.connect(f"file:{work / 'home' / 'velda.db'}?mode=ro", uri=True)
    try:
        rows = db.execute(
            f"SELECT started_at - created_at FROM tasks WHERE id IN ({','.join('?' * len(ids))})",
            ids).fetchall()
    finally:
        db.close()
    return [float(row[0]) for row in rows]


# ---------------------------------------------------------------- Ray's own APIs


def ray_tasks_rows(address: str, sizes: Sizes) -> list[Row]:
    """Bare Ray tasks, then Ray tasks running velda's node side alone, from one driver."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        return [ray_tasks_row(ray, sizes), node_side_row(ray, sizes)]
    finally:
        ray.shutdown()


def ray_tasks_row(ray: Any, sizes: Sizes) -> Row:
    @ray.remote(num_cpus=1, max_retries=0)
    def run(argv: list[str]) -> tuple[float, int]:
        began = time.time()
        return began, subprocess.run(argv, check=False).returncode

    def one() -> float:
        began, _ = ray.get(run.remote(["true"]))
        return float(began)

    return _driver_row(ray, "Ray tasks API (`subprocess.run`)", lambda: run.remote(["true"]),
                       one, sizes)


def node_side_row(ray: Any, sizes: Sizes) -> Row:
    """What a Ray pool's attempt costs on its node, without velda's server and bridge: Ray
    tasks of `ray_node.run_attempt` (the function the bridge submits for each attempt),
    submitted by this bench as a bare Ray driver. The gap between this row and the Ray pool's
    is what the server and the bridge add; between it and bare Ray tasks, what the node side
    adds (the attempt's process group and pipes, its start datagram, the record it returns)."""
    from velda.engines import proc_tree, ray_node

    ray.cloudpickle.register_pickle_by_value(ray_node)
    ray.cloudpickle.register_pickle_by_value(proc_tree)
    with _bridge_stand_in() as back:
        spec = json.dumps({"argv": ["true"], "cwd": "/", "env": {"PATH": os.environ["PATH"]},
                           "terminal": None, "gpus": False, "back": back}).encode()
        attempt = ray.remote(ray_node.run_attempt).options(num_cpus=1, max_retries=0)

        def one() -> float:
            record = ray.get(attempt.remote(spec))
            starts = [payload["at"] for kind, payload in record["items"] if kind == "start"]
            assert starts, "a lone `true` streamed its record instead of returning it"
            return float(starts[0])

        return _driver_row(ray, "Ray tasks API running velda's node side (`run_attempt`)",
                           lambda: attempt.remote(spec), one, sizes)


@contextlib.contextmanager
def _bridge_stand_in() -> Iterator[list[Any]]:
    """Where run_attempt sends its start datagram (left unread) and, for an attempt that runs
    on past a few milliseconds (in a flood, one may), its record (read and dropped)."""
    datagrams = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    datagrams.bind(("127.0.0.1", 0))
    records = socket.create_server(("127.0.0.1", 0))

    def drain() -> None:
        while True:
            try:
                conn, _ = records.accept()
            except OSError:
                return
            with conn:
                while conn.recv(65536):
                    pass

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield ["127.0.0.1", records.getsockname()[1], datagrams.getsockname()[1], "bench", "-"]
    finally:
        records.shutdown(socket.SHUT_RDWR)  # wakes the accept
        records.close()
        datagrams.close()


def _driver_row(ray: Any, name: str, submit: Callable[[], Any], one: Callable[[], float],
                sizes: Sizes) -> Row:
    """A row of Ray tasks submitted by this bench as the driver: `one()` runs a task and
    returns when it began; `submit()` submits one and returns its ObjectRef."""
    one()  # warm-up
    starts, dones = [], []
    for _ in range(sizes.one_by_one):
        submitted = time.time()
        began = one()
        dones.append(time.time() - submitted)
        starts.append(began - submitted)
    cpu = cpu_by_part(bench="driver")
    began_flood = time.monotonic()
    ray.get([submit() for _ in range(sizes.flood)])
    rate = sizes.flood / (time.monotonic() - began_flood)
    spent = spent_per_task(cpu, cpu_by_part(bench="driver"), sizes.flood)
    return Row(name, statistics.median(starts), statistics.median(dones), sizes.one_by_one,
               rate, sizes.flood, spent)


def ray_jobs_row(dashboard: str, sizes: Sizes) -> Row:
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    def wait(job: str) -> None:
        wait_until(lambda: client.get_job_status(job) in ended, 120, f"job {job}")

    wait(submit_first_job(client))  # warm-up
    starts, dones = [], []
    for _ in range(sizes.jobs_one_by_one):
        submitted = time.monotonic()
        job = client.submit_job(entrypoint="true")
        while client.get_job_status(job) == JobStatus.PENDING:
            time.sleep(POLL_S)
        starts.append(time.monotonic() - submitted)
        wait(job)
        dones.append(time.monotonic() - submitted)
    began = time.monotonic()
    for job in [client.submit_job(entrypoint="true") for _ in range(sizes.jobs_flood)]:
        wait(job)
    return Row("Ray Job Submission API", statistics.median(starts), statistics.median(dones),
               sizes.jobs_one_by_one, sizes.jobs_flood / (time.monotonic() - began),
               sizes.jobs_flood)


def submit_first_job(client: Any) -> str:
    """The head's dashboard answers before its agent does: until then a submit fails with
    "No available agent"."""
    deadline = time.monotonic() + AGENT_TIMEOUT_S
    while True:
        try:
            return str(client.submit_job(entrypoint="true"))
        except RuntimeError as e:
            if "agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not ready within {timeout_s:g} s")
        time.sleep(POLL_S)


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def measure(sizes: Sizes, jobs: bool = True) -> list[Row]:
    print("starting a Ray cluster with its dashboard ...", file=sys.stderr)
    cluster = start_cluster()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="vrb-") as tmp:
            work = Path(tmp)
            with velda_server(cluster.address, work) as client:
                for pool in ("shell", "ray"):
                    print(f"velda pool {pool} ...", file=sys.stderr)
                    rows.append(velda_row(client, pool, sizes, work))
                print("velda pool ray, one batch ...", file=sys.stderr)
                rows.append(velda_batch_row(client, "ray", sizes, work))
            print("Ray tasks API, and velda's node side alone ...", file=sys.stderr)
            rows += ray_tasks_rows(cluster.address, sizes)
            if jobs:
                print("Ray Job Submission API ...", file=sys.stderr)
                try:
                    rows.append(ray_jobs_row(cluster.dashboard, sizes))
                except RuntimeError as e:  # the rows that matter most are measured
                    print(f"Ray Job Submission API: left out: {e}", file=sys.stderr)
    finally:
        cluster.stop()
    return rows


def main() -> None:
    if sys.argv[1:] == ["--serve-cluster"]:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every address on loopback
        serve_cluster()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tasks")
    parser.add_argument("--no-jobs", action="store_true", help="leave out the Jobs API row")
    args = parser.parse_args()
    rows = measure(QUICK if args.quick else Sizes(), jobs=not args.no_jobs)
    print_rows(rows)
    print()
    print_goals(rows[1], rows[3], rows[2])
    print()
    print_cpu([rows[2], rows[3], rows[4]])


def print_rows(rows: list[Row]) -> None:
    print("| `true` on a 2-CPU Ray node | runs | submit to start (median) | submit to done "
          "(median) | many at once |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        rate = f"{row.rate:.0f}" if row.rate >= 10 else f"{row.rate:.2f}"
        print(f"| {row.name} | {row.runs or '-'} | {ms(row.start_s)} | {ms(row.done_s)} | "
              f"{rate} tasks/s ({row.flood} tasks) |")


def print_goals(pool: Row, tasks: Row, batch: Row) -> None:
    """The Ray pool against bare Ray tasks of the same run (SPEC §9: remote engines)."""
    print("| velda's Ray pool vs Ray tasks API, same run | velda | Ray | ratio | goal | met |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, row in ((f"many at once, one submit each ({SUBMITTERS} submitters)", pool),
                      ("many at once, one `submit_many`", batch)):
        rate = row.rate / tasks.rate
        print(f"| {what} | {row.rate:.0f} tasks/s | {tasks.rate:.0f} tasks/s | "
              f"{rate:.2f}x | >= 0.5x | {'yes' if rate >= 0.5 else 'no'} |")
    start = pool.start_s / tasks.start_s
    print(f"| submit to start (median) | {ms(pool.start_s)} | {ms(tasks.start_s)} | "
          f"{start:.2f}x | <= 3x | {'yes' if start <= 3 else 'no'} |")


def print_cpu(rows: list[Row]) -> None:
    """Where the CPU of a flood goes: each part's CPU per task while it ran."""
    print("| CPU per task over the flood | velda's server | Ray driver | Ray workers | "
          "Ray's daemons | the bench's client | all |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        cells = [ms(row.cpu[part]) if row.cpu[part] else "—" for part in PARTS]
        print(f"| {row.name} | {' | '.join(cells)} | {ms(sum(row.cpu.values()))} |")


if __name__ == "__main__":
    main()
