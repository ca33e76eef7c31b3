"""The budgets of SPEC §9, each measured next to a baseline or peer in the same run.

Starts private servers (a temporary VELDA_HOME each, VELDA_PORT=0), stops them at the end and
kills any task process they leave. Progress goes to stderr, one Markdown table to stdout:

    python bench/budgets.py [--quick] [--only 1,3]

Sections: 1 `vbatch true` wall time; 2 submit-to-start on an idle pool; 3 10,000 trivial tasks
through the API, one a request and 1,000 a request (`POST /api/v1/tasks:batch`); the same as a
task's children (a fan-out: alone, watched by `velda task watch`, and beside 16 tasks each
followed by `velda task log -f`), half as many with one task after all of them (a fan-in), and
as a shard set (`vbatch -N`); with where a slot's cycle goes, the two phases of a flood one a
request (its submits, then the queue draining), and the submit path alone (submits that wait on
a running task), next to its floors: the HTTP stack alone (http_floor.py) and a task's row alone
in the store, and what making a task's folder and log files costs where the homes are (TMPDIR);
4 1,000,000 tasks stored (CLI list, API list, server RSS, server start); 5 memory of supervising
a running task; 6 a task writing 1 GiB to stdout; 7 a scheduling pass and a submit with 10,000
tasks running on a synthetic engine, and a pass with 10,000 queued behind a pool at its
`capacity`. Uses hyperfine and tsp when installed (Debian packages `hyperfine`, `task-spooler`).

Command-line tools are timed as installed, with their bytecode cached (a private
PYTHONPYCACHEPREFIX); where this shell sets PYTHONDONTWRITEBYTECODE, §1 also shows that case.
The machine may be busy with other work: read each figure against its same-run baseline; the
"scaled" rows rescale a wall time by python -c pass here versus 10 ms on the reference machine.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import synthetic_engine  # bench/synthetic_engine.py: §7
from ui_bench import fill  # bench/ui_bench.py: the same 100,000-task store as the UI bench

from velda.engines.pids import start_time
from velda.engines.status_file import WRAPPER  # the local engine's per-task sh script
from velda.models import FINAL_STATES, Task, TaskStatus
from velda.store.sqlite import SqliteStore

BIN = Path(sys.executable).parent
VELDA, VBATCH, VRUN = (str(BIN / name) for name in ("velda", "vbatch", "vrun"))
FINAL = {s.value for s in FINAL_STATES}
FINAL_SQL = ",".join(f"'{s}'" for s in sorted(FINAL))
MB = 1024 * 1024
REFERENCE_PYTHON_S = 0.010  # python -c pass on the reference machine (notes/PERF.md)


@dataclass
class Sizes:
    cli_runs: int = 100  # §1 vbatch runs
    idle_tasks: int = 200  # §2
    flood_tasks: int = 10_000  # §3
    stored_tasks: int = 1_000_000  # §4
    list_runs: int = 20  # §4 velda task list runs
    sleepers: int = 50  # §5
    output_bytes: int = 1 << 30  # §6
    output_runs: int = 3  # §6
    synthetic_running: int = 10_000  # §7


QUICK = Sizes(30, 50, 2_000, 20_000, 10, 20, 256 * MB, 1, 2_000)


@dataclass
class Row:
    what: str
    velda: str
    baseline: str
    budget: str = "—"
    verdict: str = "—"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def verdict(ok: bool) -> str:
    return "pass" if ok else "OVER"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.{2 if seconds < 0.001 else 1}f} ms"


# --- a private server


@dataclass
class Endpoint:
    """A server that is not velda's (http_floor.py): where it answers, and its process."""

    host: str
    port: int
    pid: int
    token: str = ""


class Api:
    """One keep-alive HTTP/1.1 connection to a server, with its token. Reopened after a
    pause, before uvicorn's keep-alive timeout (5 s) closes it under a request."""

    IDLE_S = 3.0

    def __init__(self, server: Server | Endpoint) -> None:
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        self.headers = {
            "Authorization": f"Bearer {server.token}",
            "Content-Type": "application/json",
        }
        self.used = time.monotonic()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        if time.monotonic() - self.used > self.IDLE_S:
            self.conn.close()  # http.client connects again on the next request
        self.conn.request(method, path, body=data, headers=self.headers)
        response = self.conn.getresponse()
        raw = response.read()
        self.used = time.monotonic()
        if response.status >= 400:
            raise RuntimeError(f"{method} {path}: {response.status} {raw[:200]!r}")
        return json.loads(raw) if raw else None

    def timed(self, path: str, n: int, warm: int = 3) -> list[float]:
        """Seconds per GET of path, the first `warm` ones left out."""
        out = []
        for i in range(n + warm):
            start = time.perf_counter()
            self.call("GET", path)
            if i >= warm:
                out.append(time.perf_counter() - start)
        return out

    def close(self) -> None:
        self.conn.close()


class Server:
    """A velda server of its own VELDA_HOME under `root`."""

    def __init__(self, root: Path, name: str, config: str | None = None) -> None:
        self.home = root / name
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.env = {**os.environ, "VELDA_HOME": str(self.home), "VELDA_PORT": "0",
                    "TMPDIR": str(root)}
        for var in ("VELDA_SERVER", "VELDA_TOKEN", "VELDA_CONFIG"):
            self.env.pop(var, None)
        if config is not None:
            path = root / f"{name}.toml"
            path.write_text(config)
            self.env["VELDA_CONFIG"] = str(path)
        self.db_path = self.home / "velda.db"
        self._db: sqlite3.Connection | None = None
        self.host, self.port, self.pid, self.token = "127.0.0.1", 0, 0, ""

    def start(self) -> None:
        subprocess.run([VELDA, "server", "start"], env=self.env, check=True, capture_output=True)
        info = json.loads((self.home / "server.json").read_text())
        self.pid = info["pid"]
        self.port = int(info["url"].rsplit(":", 1)[1])
        self.token = (self.home / "token").read_text().strip()

    def stop(self) -> None:
        self.kill_tasks()
        if self._db is not None:
            self._db.close()
            self._db = None
        subprocess.run([VELDA, "server", "stop"], env=self.env, capture_output=True)

    def kill_tasks(self) -> None:
        """SIGKILL to the process group of every task of this home the store says runs."""
        if not self.db_path.exists():
            return
        query = f"SELECT handle FROM tasks WHERE handle IS NOT NULL AND status NOT IN ({FINAL_SQL})"
        for (text,) in self.sql(query):
            handle = json.loads(text)
            pid = handle.get("pid")
            if isinstance(pid, int) and start_time(pid) == handle.get("start"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)

    def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Read the store directly (read-only), without loading the server."""
        if self._db is None:
            self._db = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True)
        return self._db.execute(query, args).fetchall()

    def open_count(self) -> int:
        return int(self.sql(f"SELECT COUNT(*) FROM tasks WHERE status NOT IN ({FINAL_SQL})")[0][0])

    def wait_final(self, task_id: int, poll_s: float = 0.002, limit_s: float = 600) -> str:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            status = self.sql("SELECT status FROM tasks WHERE id=?", task_id)[0][0]
            if status in FINAL:
                return str(status)
            time.sleep(poll_s)
        raise TimeoutError(f"task {task_id} is not final after {limit_s} s")

    def wait_all_final(self, limit_s: float = 1800) -> None:
        deadline = time.monotonic() + limit_s
        while self.open_count():
            if time.monotonic() > deadline:
                raise TimeoutError(f"tasks still open after {limit_s} s")
            time.sleep(0.05)


@contextmanager
def running_server(root: Path, name: str, config: str | None = None) -> Iterator[Server]:
    server = Server(root, name, config)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system) of pid itself, and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / tick, (int(fields[13]) + int(fields[14])) / tick


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def submit_body(command: list[str], pool: str | None = None) -> dict[str, Any]:
    """What vbatch sends: the command, this environment and working directory."""
    body: dict[str, Any] = {"command": command, "env": dict(os.environ), "cwd": os.getcwd()}
    if pool:
        body["pool"] = pool
    return body


# --- timing whole commands


def command_medians(commands: dict[str, list[str]], runs: int, env: dict[str, str],
                    root: Path) -> dict[str, float]:
    """Median wall seconds of each command: hyperfine when installed, else timed here."""
    if shutil.which("hyperfine"):
        return _hyperfine(commands, runs, env, root)
    return {name: _own_median(argv, runs, env) for name, argv in commands.items()}


def _hyperfine(commands: dict[str, list[str]], runs: int, env: dict[str, str],
               root: Path) -> dict[str, float]:
    out = root / "hyperfine.json"
    argv = ["hyperfine", "-N", "--warmup", "5", "--runs", str(runs), "--style", "basic",
            "--export-json", str(out)]
    for name, command in commands.items():
        argv += ["-n", name, " ".join(command)]
    subprocess.run(argv, env=env, check=True, stdout=sys.stderr)
    results = json.loads(out.read_text())["results"]
    return {r["command"]: r["median"] for r in results}


def _own_median(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for i in range(runs + 5):
        start = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i >= 5:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- §1 vbatch true


def cached_bytecode(env: dict[str, str], root: Path) -> dict[str, str]:
    """env for timing CLI commands as installed: bytecode written once and reused (in a
    private PYTHONPYCACHEPREFIX), even where this shell sets PYTHONDONTWRITEBYTECODE."""
    out = {**env, "PYTHONPYCACHEPREFIX": str(root / "pycache")}
    out.pop("PYTHONDONTWRITEBYTECODE", None)
    return out


def scaled_row(what: str, seconds: float, python_s: float, budget_s: float) -> Row:
    """A wall time scaled by how much slower this machine starts Python than the reference."""
    scaled = seconds * REFERENCE_PYTHON_S / python_s
    return Row(f"  {what}, scaled to the reference machine", ms(scaled),
               "PERF.md: python -c pass 10 ms there", f"≤ {budget_s * 1000:.0f} ms",
               verdict(scaled <= budget_s))


def bench_vbatch(root: Path, sizes: Sizes) -> list[Row]:
    log(f"§1 vbatch true, {sizes.cli_runs} runs, warm server")
    with running_server(root, "s1") as server:
        env = {**cached_bytecode(server.env, root), "TS_SOCKET": str(root / "tsp.socket")}
        commands = {"vbatch": [VBATCH, "true"], "python": [sys.executable, "-c", "pass"]}
        tsp = shutil.which("tsp")
        if tsp:
            commands["tsp"] = [tsp, "true"]
        try:
            medians = command_medians(commands, sizes.cli_runs, env, root)
        finally:
            if tsp:
                subprocess.run([tsp, "-K"], env=env, capture_output=True)
        raw = None
        if os.environ.get("PYTHONDONTWRITEBYTECODE"):
            log("   again as this shell runs it: PYTHONDONTWRITEBYTECODE set, no bytecode cache")
            commands.pop("tsp", None)
            raw = command_medians(commands, sizes.cli_runs, server.env, root)
    peers = f"python -c pass {ms(medians['python'])}; "
    peers += f"tsp true {ms(medians['tsp'])}" if tsp else "tsp: not installed"
    ratio = medians["vbatch"] / medians["python"]
    rows = [
        Row("`vbatch true`, warm server (median wall)", ms(medians["vbatch"]), peers),
        Row("  against `python -c pass` in the same venv (ratio)", f"{ratio:.2f}×",
            f"python -c pass {ms(medians['python'])}", "≤ 2.5×", verdict(ratio <= 2.5)),
        scaled_row("the same", medians["vbatch"], medians["python"], 0.040),
    ]
    if raw:
        rows.append(Row("  the same with PYTHONDONTWRITEBYTECODE=1 (velda's .py compiled per run)",
                        ms(raw["vbatch"]), f"python -c pass {ms(raw['python'])}"))
    return rows


# --- §2 submit-to-start on an idle pool


def idle_submits(server: Server, n: int) -> tuple[list[float], list[float]]:
    """Submit n tasks one at a time, each once the last is final; per task the seconds from
    sending the POST to `started_at`, and from `created_at` to `started_at` (store floats)."""
    api = Api(server)
    sent_to_start, created_to_start = [], []
    for _ in range(n):
        sent = time.time()
        task_id = int(api.call("POST", "/api/v1/tasks", submit_body(["true"]))["id"])
        server.wait_final(task_id)
        created, started = server.sql(
            "SELECT created_at, started_at FROM tasks WHERE id=?", task_id)[0]
        sent_to_start.append(started - sent)
        created_to_start.append(started - created)
        time.sleep(0.02)  # let the server settle: each submit finds it idle
    api.close()
    return sent_to_start, created_to_start


def bench_submit_to_start(root: Path, sizes: Sizes) -> list[Row]:
    n = sizes.idle_tasks
    log(f"§2 submit-to-start, {n} tasks one at a time on an idle pool")
    with running_server(root, "s2") as server:
        idle_submits(server, 5)  # warm-up
        own, waited = cpu_seconds(server.pid)
        sent_to_start, created_to_start = idle_submits(server, n)
        own_after, waited_after = cpu_seconds(server.pid)
        api = Api(server)
        health = statistics.median(api.timed("/healthz", 200))
        api.close()
    sent_med, created_med = statistics.median(sent_to_start), statistics.median(created_to_start)
    return [
        Row("submit→start, idle pool: POST sent→`started_at` (median)", ms(sent_med),
            f"HTTP round trip GET /healthz {ms(health)}", "≤ 10 ms", verdict(sent_med <= 0.010)),
        Row("submit→start, idle pool: `created_at`→`started_at` (median)", ms(created_med),
            "—", "≤ 10 ms", verdict(created_med <= 0.010)),
        Row("  server CPU per task, idle pool: own + its task processes",
            f"{ms((own_after - own) / n)} + {ms((waited_after - waited) / n)}", "—"),
    ]


# --- §3 many trivial tasks through the API


def submit_many(server: Server | Endpoint, n: int, submitters: int,
                body: dict[str, Any] | None = None) -> None:
    """n submits of `body` (`true` by default), one a request, from `submitters` threads
    with a keep-alive connection each."""
    body = body or submit_body(["true"])

    def worker(count: int) -> None:
        api = Api(server)
        for _ in range(count):
            api.call("POST", "/api/v1/tasks", body)
        api.close()

    shares = [n // submitters + (1 if i < n % submitters else 0) for i in range(submitters)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def held_submits(root: Path, n: int, submitters: int) -> tuple[float, float]:
    """Submits accepted a second, one a request, when none of them can start (each waits on
    a task that sleeps): what the submit path alone takes, with no task running beside it;
    and the server's CPU seconds per submit."""
    with running_server(root, "s3h") as server:
        api = Api(server)
        blocker = api.call("POST", "/api/v1/tasks", submit_body(["sleep", "600"]))["id"]
        body = {**submit_body(["true"]), "after": [blocker]}
        measured = rate_and_cpu(server, n, submitters, body)
        api.call("POST", f"/api/v1/tasks/{blocker}/cancel")
        api.close()
    return measured


def rate_and_cpu(server: Server | Endpoint, n: int, submitters: int,
                 body: dict[str, Any] | None = None) -> tuple[float, float]:
    """Requests a second of submit_many, and the CPU seconds the server spent on each."""
    own = cpu_seconds(server.pid)[0]
    start = time.perf_counter()
    submit_many(server, n, submitters, body)
    elapsed = time.perf_counter() - start
    return n / elapsed, (cpu_seconds(server.pid)[0] - own) / n


def stack_floor(root: Path, n: int, submitters: int) -> tuple[float, float]:
    """The same submits, one a request, to velda's HTTP stack alone (http_floor.py): its
    requests a second and its CPU seconds per request."""
    port_file = root / "http_floor.port"
    floor = Path(__file__).with_name("http_floor.py")
    process = subprocess.Popen([sys.executable, str(floor), str(port_file)])
    try:
        wait_until(lambda: port_file.exists() or process.poll() is not None,
                   "the HTTP stack alone to listen")
        if process.poll() is not None:
            raise RuntimeError(f"{floor.name} exited with status {process.returncode}")
        endpoint = Endpoint("127.0.0.1", int(port_file.read_text()), process.pid)
        submit_many(endpoint, min(n, 200), submitters)  # imports and caches warm, as velda's
        return rate_and_cpu(endpoint, n, submitters)
    finally:
        process.terminate()
        process.wait()


def store_floor(root: Path, n: int) -> float:
    """Seconds per task of writing a submit's row alone, a transaction each, in velda's own
    store (a new SqliteStore): what a submit answered only once stored cannot do without."""
    store = SqliteStore(root / "floor.db")
    body = submit_body(["true"])
    started = time.perf_counter()
    for _ in range(n):
        task = Task(id=0, pool="shell", command=body["command"], cwd=body["cwd"],
                    env=body["env"], labels={"pool": "shell"}, created_at=time.time(),
                    status=TaskStatus.QUEUED)
        with store.transaction():
            store.insert(task)
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed / n


def xargs_baseline(n: int, wrapped_in: Path | None = None) -> tuple[float, float]:
    """Tasks/s of n × true through xargs -P2, and the CPU seconds per task of all of it;
    with `wrapped_in`, each `true` runs inside velda's own per-task /bin/sh wrapper, as the
    local engine starts it (the process floor of a velda task)."""
    if wrapped_in is None:
        script, args = 'seq "$1" | xargs -P2 -n1 true', [str(n)]
    else:  # the wrapper writes its pid and status in $3, and the task's stderr to fd 3
        script = 'exec 3>/dev/null; seq "$1" | xargs -P2 -n1 sh -c "$2" velda-task "$3" / true'
        args = [str(n), WRAPPER, str(wrapped_in)]
    cpu = children_cpu()
    started = time.perf_counter()
    subprocess.run(["sh", "-c", script, "sh", *args], check=True)
    return n / (time.perf_counter() - started), (children_cpu() - cpu) / n


BESIDE = 16  # tasks followed while a fan-out runs: a pipeline's `vrun`s, on a larger machine
SLOW_FILES_S = 0.0001  # tmpfs takes 0.015 ms, a quiet ext4 disk 0.02 to 0.06 ms


def making_files(root: Path, n: int = 1000) -> float:
    """Seconds to make a task's folder and its two log files under `root`, where the floods'
    homes are: what a task that prints asks of that file system besides velda's own work (one
    that prints nothing mostly gets the folder of one that ended: docs/architecture.md, "Spare
    attempt folders"). On tmpfs it takes some µs; on an ext4 disk that deleted many files in
    the last minutes it can take a millisecond (README, "Performance")."""
    folder = root / "s3-files"
    folder.mkdir()
    started = time.perf_counter()
    for i in range(n):
        attempt = folder / f"{i}.1"
        attempt.mkdir()
        for stream in ("stdout", "stderr"):
            os.close(os.open(attempt / stream, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    return (time.perf_counter() - started) / n


def submit_in_batches(server: Server, n: int, batch: int) -> None:
    """n × true through POST /api/v1/tasks:batch, `batch` tasks a request."""
    api = Api(server)
    body = submit_body(["true"])
    for start in range(0, n, batch):
        api.call("POST", "/api/v1/tasks:batch", {"tasks": [body] * min(batch, n - start)})
    api.close()


def flood(root: Path, name: str, n: int, submit: Callable[[Server], None]) -> dict[str, float]:
    """n × true submitted by `submit` to a new server: tasks/s accepted and end to end, and
    the server's CPU per task (its own, and its task processes')."""
    with running_server(root, name) as server:
        own, waited = cpu_seconds(server.pid)
        start = time.time()
        submit(server)
        posted = time.time() - start
        log(f"   all accepted in {posted:.1f} s; waiting for them to end")
        server.wait_all_final()
        end, succeeded = server.sql(
            "SELECT MAX(resolved_at), SUM(status='SUCCESS') FROM tasks")[0]
        own_after, waited_after = cpu_seconds(server.pid)
        running, turn = slot_cycle(server.sql("SELECT started_at, finished_at FROM tasks"))
        ran = server.sql("SELECT COUNT(*) FROM tasks WHERE resolved_at <= ?",
                         start + posted)[0][0]
    log(f"   {succeeded:,} succeeded")
    return {"accepted": n / posted, "rate": n / (end - start), "own": (own_after - own) / n,
            "waited": (waited_after - waited) / n, "running": running, "turn": turn,
            "posted": posted, "ran": ran,
            "drain": (n - ran) / (end - start - posted) if ran < n else 0.0}


FAN_OUT = """\
import sys
import velda

n, client = int(sys.argv[1]), velda.Client()
for start in range(0, n, 1000):
    client.submit_many([{"command": ["true"], "cwd": "/"}] * min(1000, n - start))
"""


def fan_out(root: Path, name: str, n: int, watched: bool = False, beside: int = 0) -> float:
    """Tasks a second of a fan-out: one task submits n × true as its children, 1,000 a
    request, and ends; `watched`: with `velda task watch` following it meanwhile; `beside`:
    that many other tasks running meanwhile, each followed by `velda task log -f`."""
    script = root / "s3-fan-out.py"
    script.write_text(FAN_OUT)
    body = submit_body([sys.executable, str(script), str(n)])
    # the followed tasks sleep on CPUs of their own, beside the machine's
    config = f"[local]\ncpus = {(os.cpu_count() or 1) + beside}\n" if beside else None
    with running_server(root, name, config) as server:
        followers = [follow_log(server, "sleep", "600") for _ in range(beside)]
        try:
            return n / until_final(server, body, watched)
        finally:
            for follower in followers:
                follower.terminate()
                follower.wait()


def follow_log(server: Server, *command: str) -> subprocess.Popen[bytes]:
    """`velda task log -f` of a new task running `command`, once it runs."""
    task = Api(server).call("POST", "/api/v1/tasks", submit_body(list(command)))["id"]
    while server.sql("SELECT status FROM tasks WHERE id=?", task)[0][0] != "RUNNING":
        time.sleep(0.01)
    return subprocess.Popen([VELDA, "task", "log", "-f", str(task)], env=server.env,
                            stdout=subprocess.DEVNULL)


def fan_in(root: Path, n: int, batch: int) -> float:
    """Tasks a second of n × true submitted `batch` a request, followed by one task that
    waits for all of them (`after_success` naming each ID), to that one's end."""
    with running_server(root, "s3i") as server:
        api = Api(server)
        started = time.time()
        ids = [task["id"] for start in range(0, n, batch) for task in api.call(
            "POST", "/api/v1/tasks:batch",
            {"tasks": [submit_body(["true"])] * min(batch, n - start)})["tasks"]]
        submitted = time.time() - started
        after_all = {**submit_body(["true"]), "after_success": [",".join(ids)]}
        return n / (submitted + until_final(server, after_all))


def shard_set(root: Path, n: int) -> float:
    """Tasks a second of `vbatch -N n true`: one submit."""
    with running_server(root, "s3n") as server:
        return n / until_final(server, {**submit_body(["true"]), "total_shards": n})


def until_final(server: Server, body: dict[str, Any], watched: bool = False) -> float:
    """Seconds from submitting `body` to the task's end (a parent's ends after its last
    child's), which must be a success; `watched`: followed meanwhile by `velda task watch`."""
    started = time.time()
    task = Api(server).call("POST", "/api/v1/tasks", body)["id"]
    watch = subprocess.Popen([VELDA, "task", "watch", str(task)], env=server.env,
                             stdout=subprocess.DEVNULL) if watched else None
    status = server.wait_final(task, poll_s=0.01)
    if watch is not None and watch.wait(timeout=60):
        raise RuntimeError(f"velda task watch {task} exited {watch.returncode}")
    if status != "SUCCESS":
        raise RuntimeError(f"task {task} ended {status}")
    return float(server.sql("SELECT resolved_at FROM tasks WHERE id=?", task)[0][0]) - started


def slot_cycle(rows: list[tuple[Any, ...]]) -> tuple[float, float]:
    """Where a slot's time goes in a flood, as the store's clock saw it (medians): from an
    attempt's start (committed before its spawn) to its exit committed, and from an exit
    committed to the next start committed (the server's turn)."""
    starts = sorted(started for started, _ in rows)
    ends = sorted(finished for _, finished in rows)
    turns = []
    for started in starts:
        before = bisect.bisect_right(ends, started)
        if before:
            turns.append(started - ends[before - 1])
    running = statistics.median(finished - started for started, finished in rows)
    return running, statistics.median(turns)


def bench_flood(root: Path, sizes: Sizes, submitters: int = 4, batch: int = 1000) -> list[Row]:
    n = sizes.flood_tasks
    files_s = making_files(root)
    log(f"§3 {n:,} × true through the API, {submitters} submitters")
    if files_s > SLOW_FILES_S:
        log(f"   making a task's folder and log files takes {ms(files_s)} here: this file "
            "system slows the first tasks of each flood and every task that prints (README, "
            "\"Performance\"); TMPDIR=/dev/shm measures without it")
    one = flood(root, "s3", n, lambda server: submit_many(server, n, submitters))
    log(f"   the same, {batch:,} tasks a request (POST /api/v1/tasks:batch)")
    bulk = flood(root, "s3b", n, lambda server: submit_in_batches(server, n, batch))
    log(f"   the same as one task's children (a fan-out), {batch:,} a request")
    fanned = fan_out(root, "s3f", n)
    log("   the same fan-out, with velda task watch following it")
    fanned_watched = fan_out(root, "s3w", n, watched=True)
    log(f"   the same fan-out, beside {BESIDE} other tasks each followed by velda task log -f")
    fanned_beside = fan_out(root, "s3l", n, beside=BESIDE)
    log(f"   {n // 2:,} × true, {batch:,} a request, and one task after all of them (a fan-in)")
    fanned_in = fan_in(root, n // 2, batch)
    log(f"   the same as one shard set (vbatch -N {n:,} true)")
    sharded = shard_set(root, n)
    log(f"   {n // 2:,} submits, one a request, that wait on a running task (none starts)")
    held, held_cpu = held_submits(root, n // 2, submitters)
    log(f"   {n // 2:,} the same to the HTTP stack alone; {n // 2:,} rows alone in the store")
    floor, floor_cpu = stack_floor(root, n // 2, submitters)
    row_s = store_floor(root, n // 2)
    log(f"   now {n:,} × true through xargs -P2, bare and wrapped")
    xargs_rate, xargs_cpu = xargs_baseline(n)
    wrapped_rate, wrapped_cpu = xargs_baseline(n, root)
    peer = (f"xargs -P2 {xargs_rate:,.0f}/s; each in velda's sh wrapper (terminal and "
            f"pool-user tasks) {wrapped_rate:,.0f}/s")
    cpu_peer = f"xargs -P2, all processes: {ms(xargs_cpu)}; wrapped {ms(wrapped_cpu)}"
    best = max(one["rate"], bulk["rate"])
    return [
        Row(f"{n:,} × `true` end to end through the API (tasks/s)", f"{one['rate']:,.0f}/s",
            peer, "≥ 1,000/s", verdict(one["rate"] >= 1000)),
        Row(f"  the same, submitted {batch:,} a request", f"{bulk['rate']:,.0f}/s", "—",
            "≥ 1,000/s", verdict(bulk["rate"] >= 1000)),
        Row(f"  the same as the children of one task that ends first (a fan-out), {batch:,} "
            "a request", f"{fanned:,.0f}/s", f"at the top level {bulk['rate']:,.0f}/s"),
        Row("    the same, followed by `velda task watch` meanwhile", f"{fanned_watched:,.0f}/s",
            "—"),
        Row(f"    the same, beside {BESIDE} other tasks followed by `velda task log -f`",
            f"{fanned_beside:,.0f}/s", "—"),
        Row(f"  {n // 2:,} of them, and one task after all of them (`--after-success` naming "
            "each)", f"{fanned_in:,.0f}/s", f"all {n:,}, with none after them "
            f"{bulk['rate']:,.0f}/s"),
        Row(f"  the same as one shard set (`vbatch -N {n:,} true`)", f"{sharded:,.0f}/s",
            f"at the top level {bulk['rate']:,.0f}/s"),
        Row("  end to end against xargs -P2 (ratio, the better of the two)",
            f"{best / xargs_rate:.2f}×", f"xargs -P2 {xargs_rate:,.0f}/s", "≥ 0.55×",
            verdict(best / xargs_rate >= 0.55)),
        Row(f"  submits accepted: one a request ({submitters} keep-alive submitters)",
            f"{one['accepted']:,.0f}/s", "—", "≥ 2,000/s", verdict(one["accepted"] >= 2000)),
        Row("    the flood's two phases: its submits, then the rest of the queue",
            f"{one['posted']:.1f} s ({one['ran']:,} ran meanwhile) + {one['drain']:,.0f}/s",
            "—"),
        Row("    the same when none of them starts (each waits on a running task)",
            f"{held:,.0f}/s", f"the HTTP stack alone {floor:,.0f}/s", "≥ 2,000/s",
            verdict(held >= 2000)),
        Row("    server CPU per submit, when none of them starts", ms(held_cpu),
            f"the HTTP stack alone {ms(floor_cpu)}; a task's row alone in the store "
            f"{ms(row_s)}"),
        Row(f"  submits accepted: {batch:,} a request (POST /api/v1/tasks:batch)",
            f"{bulk['accepted']:,.0f}/s", "—", "≥ 2,000/s", verdict(bulk["accepted"] >= 2000)),
        Row("  a slot's cycle: start to exit committed + exit to the next start (medians)",
            f"{ms(bulk['running'])} + {ms(bulk['turn'])}",
            f"xargs -P2, a cycle: {ms(2 / xargs_rate)}; wrapped {ms(2 / wrapped_rate)}"),
        Row("  server CPU per task: own + its task processes",
            f"{ms(one['own'])} + {ms(one['waited'])}", cpu_peer),
        Row(f"  the same, submitted {batch:,} a request",
            f"{ms(bulk['own'])} + {ms(bulk['waited'])}", "—"),
        Row("  making a task's folder and its two log files, where the homes are",
            ms(files_s), "—"),
    ]


# --- §4 a large store


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def idle_server_rss(root: Path) -> float:
    with running_server(root, "s4-empty") as server:
        api = Api(server)
        api.timed("/api/v1/tasks?page_size=50", 20)
        api.close()
        return rss_mb(server.pid)


def bench_large_store(root: Path, sizes: Sizes) -> list[Row]:
    n = sizes.stored_tasks
    empty_rss = idle_server_rss(root)
    log(f"§4 storing {n:,} tasks directly in SQLite")
    (root / "s4").mkdir(mode=0o700)
    started = time.perf_counter()
    fill(root / "s4" / "velda.db", n)
    log(f"   stored in {time.perf_counter() - started:.1f} s; starting the server")
    started = time.perf_counter()
    with running_server(root, "s4") as server:
        start_s = time.perf_counter() - started  # `velda server start`: open, recover, bind
        commands = {"list": [VELDA, "task", "list"], "python": [sys.executable, "-c", "pass"]}
        env = cached_bytecode(server.env, root)
        medians = command_medians(commands, sizes.list_runs, env, root)
        api = Api(server)
        page = statistics.median(api.timed("/api/v1/tasks?page_size=50", 50))
        health = statistics.median(api.timed("/healthz", 50))
        api.close()
        rss = rss_mb(server.pid)
    return [
        Row(f"`velda task list`, {n:,} stored (median wall)", ms(medians["list"]),
            f"python -c pass {ms(medians['python'])}", "≤ 100 ms",
            verdict(medians["list"] <= 0.100)),
        scaled_row("the same", medians["list"], medians["python"], 0.100),
        Row(f"list API first page, {n:,} stored (median, keep-alive)", ms(page),
            f"GET /healthz {ms(health)}", "≤ 300 ms", verdict(page <= 0.300)),
        Row(f"server RSS, {n:,} stored", f"{rss:.0f} MB",
            f"empty store {empty_rss:.0f} MB", "≤ 200 MB", verdict(rss <= 200)),
        Row(f"server start (`velda server start`), {n:,} stored", f"{start_s:.2f} s", "—",
            "≤ 3 s", verdict(start_s <= 3)),
    ]


# --- §5 memory of supervising a running task

SUPERVISION_CONFIG = "[local]\ncpus = 64\n"


def wait_until(done: Callable[[], bool], what: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {limit_s} s")
        time.sleep(0.05)


def task_leaders(server: Server, ids: list[int]) -> list[int]:
    """The pids of the tasks' process group leaders, once the server stored them all."""
    marks = ",".join("?" * len(ids))

    def handles() -> list[Any]:
        return server.sql(f"SELECT handle FROM tasks WHERE id IN ({marks})", *ids)

    wait_until(lambda: all(h for (h,) in handles()), "the tasks to start")
    return [int(json.loads(h)["pid"]) for (h,) in handles()]


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def bench_supervision(root: Path, sizes: Sizes) -> list[Row]:
    n = sizes.sleepers
    log(f"§5 memory of {n} running `sleep 60` tasks (pool cpu-1, [local] cpus = 64)")
    with running_server(root, "s5", SUPERVISION_CONFIG) as server:
        api = Api(server)
        api.timed("/api/v1/tasks", 5)  # warm the server's code paths before the RSS reading
        reaper = parent_of(server.pid)
        before = rss_mb(server.pid), rss_mb(reaper)
        body = submit_body(["sleep", "60"], "cpu-1")
        ids = [int(api.call("POST", "/api/v1/tasks", body)["id"]) for _ in range(n)]
        leaders = task_leaders(server, ids)
        bare = sum(Path(f"/proc/{pid}/cmdline").read_bytes() == b"sleep\x0060\x00"
                   for pid in leaders)
        growth = (rss_mb(server.pid) - before[0]) / n, (rss_mb(reaper) - before[1]) / n
        for task_id in ids:
            api.call("POST", f"/api/v1/tasks/{task_id}/cancel", {})
        server.wait_all_final(60)
        api.close()
    per_task = max(growth[0], 0) + max(growth[1], 0)
    return [
        Row("supervising a running task: processes velda adds to it",
            f"{(n - bare) / n:g} a task", f"{bare} of {n} tasks' leaders are the command itself",
            "—"),
        Row("  server and reaper RSS growth per running task", f"{per_task:.3f} MB",
            f"server {growth[0]:.3f} MB, reaper {growth[1]:.3f} MB", "≤ 2 MB",
            verdict(per_task <= 2)),
    ]


# --- §6 a task writing a lot to stdout


def size_text(size: int) -> str:
    return f"{size / (1 << 30):g} GiB" if size >= 1 << 30 else f"{size / MB:g} MiB"


def direct_to_file(command: list[str], path: Path) -> float:
    with open(path, "wb") as out:
        start = time.perf_counter()
        subprocess.run(command, stdout=out, check=True)
        elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def twice_to_files(command: list[str], root: Path) -> float:
    """The command's output written to two files (`| tee a > b`): what `vrun` into a file
    does with the task's log beside it."""
    first, second = root / "twice-a.out", root / "twice-b.out"
    script = 'second=$1; shift; "$@" | tee "$0" > "$second"'
    start = time.perf_counter()
    subprocess.run(["sh", "-c", script, str(first), str(second), *command], check=True)
    elapsed = time.perf_counter() - start
    first.unlink()
    second.unlink()
    return elapsed


def task_times(server: Server, task_id: int) -> float:
    """started→finished of the task's own command, then its stdout log is deleted."""
    status, started, finished = server.sql(
        "SELECT status, started_at, finished_at FROM tasks WHERE id=?", task_id)[0]
    if status != "SUCCESS":
        raise RuntimeError(f"task {task_id} ended {status}")
    (server.home / "logs" / f"{task_id}.1" / "stdout").unlink()
    return float(finished - started)


def unfollowed_task(server: Server, api: Api, command: list[str]) -> float:
    task_id = int(api.call("POST", "/api/v1/tasks", submit_body(command))["id"])
    server.wait_final(task_id, poll_s=0.01)
    return task_times(server, task_id)


def vrun_task(server: Server, command: list[str], out: Path | None) -> tuple[float, float]:
    """vrun's wall time, its stdout to `out` (None: /dev/null), and its task's
    started→finished."""
    with open(out or os.devnull, "wb") as stdout:
        start = time.perf_counter()
        subprocess.run([VRUN, *command], env=server.env, stdout=stdout, check=True)
        wall = time.perf_counter() - start
    if out is not None:
        out.unlink()
    task_id = int(server.sql("SELECT MAX(id) FROM tasks")[0][0])
    return wall, task_times(server, task_id)


def bench_big_output(root: Path, sizes: Sizes) -> list[Row]:
    size, runs = sizes.output_bytes, sizes.output_runs
    text = size_text(size)
    command = ["head", "-c", str(size), "/dev/zero"]
    log(f"§6 a task writing {text} to stdout, {runs} run(s) of each, interleaved")
    keys = ("direct", "twice", "alone", "null", "file", "task")
    times: dict[str, list[float]] = {k: [] for k in keys}
    with running_server(root, "s6") as server:
        api = Api(server)
        for _ in range(runs):
            times["direct"].append(direct_to_file(command, root / "direct.out"))
            times["twice"].append(twice_to_files(command, root))
            times["alone"].append(unfollowed_task(server, api, command))
            wall, task = vrun_task(server, command, None)
            times["null"].append(wall)
            times["task"].append(task)
            times["file"].append(vrun_task(server, command, root / "vrun.out")[0])
        api.close()
    floors = {"direct": f"`head -c {text} /dev/zero > file`",
              "twice": "the same into two files, `| tee a > b`"}

    def row(what: str, key: str, against: str = "direct") -> Row:
        t, floor = statistics.median(times[key]), statistics.median(times[against])
        return Row(what, f"{t:.2f} s ({t / floor:.2f}×)", f"{floors[against]} {floor:.2f} s",
                   "≤ 1.2×", verdict(t <= 1.2 * floor))

    return [
        row(f"{text} to stdout: task started→finished, nobody following", "alone"),
        row(f"{text} to stdout: `vrun` wall, its stdout → /dev/null", "null"),
        row("  task started→finished under that `vrun`", "task"),
        # the task's log and vrun's file: the GiB is written twice
        row(f"{text} to stdout: `vrun` wall, its stdout → a file", "file", "twice"),
    ]


# --- the table


# --- §7 the server's own work with many tasks running (a synthetic engine)


def bench_synthetic(root: Path, sizes: Sizes) -> list[Row]:
    n = sizes.synthetic_running
    log(f"§7 {n:,} tasks running on a synthetic engine (in-process runtime, real store)")
    (root / "s7").mkdir(mode=0o700)
    r = synthetic_engine.run(root / "s7", n)
    running = f"{r['running']:,.0f} running"
    return [
        Row(f"one scheduling pass, {running} (median)", ms(r["pass_busy"]),
            f"nothing running {ms(r['pass_idle'])}", "≤ 5 ms", verdict(r["pass_busy"] <= 0.005)),
        Row(f"submit in the server, {running} (median)", ms(r["submit_busy"]),
            f"nothing running {ms(r['submit_idle'])}", "unchanged",
            verdict(r["submit_busy"] <= 1.5 * r["submit_idle"])),
        Row(f"one scheduling pass, {r['queued']:,.0f} queued behind a pool at its `capacity` "
            "(median)", ms(r["pass_backlog"]), f"nothing running {ms(r['pass_idle'])}",
            "≤ 5 ms", verdict(r["pass_backlog"] <= 0.005)),
    ]


SECTIONS: dict[int, Callable[[Path, Sizes], list[Row]]] = {
    1: bench_vbatch,
    2: bench_submit_to_start,
    3: bench_flood,
    4: bench_large_store,
    5: bench_supervision,
    6: bench_big_output,
    7: bench_synthetic,
}


def table(rows: list[Row]) -> str:
    head = Row("what", "velda", "baseline / peer (same run)", "budget (SPEC §9)", "pass/over")
    cells = [[r.what, r.velda, r.baseline, r.budget, r.verdict] for r in [head, *rows]]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cs, widths, strict=True)) + " |"
             for cs in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def run_section(number: int, root: Path, sizes: Sizes) -> list[Row]:
    started = time.perf_counter()
    try:
        rows = SECTIONS[number](root, sizes)
    except Exception as e:  # one broken section must not hide the others' figures
        log(f"§{number} failed:\n{traceback.format_exc()}")
        return [Row(f"§{number} failed", f"{type(e).__name__}: {e}", "—")]
    log(f"   §{number} took {time.perf_counter() - started:.0f} s")
    return rows


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller counts (a minute or two)")
    p.add_argument("--only", default="1,2,3,4,5,6,7", help="sections to run, like 1,3")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    sizes = QUICK if args.quick else Sizes()
    numbers = [int(n) for n in args.only.split(",") if n.strip()]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="velda-budgets-") as tmp:
        for number in numbers:
            rows += run_section(number, Path(tmp), sizes)
    print(table(rows))
    return 1 if any(r.verdict == "OVER" or r.what.endswith("failed") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
