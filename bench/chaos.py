"""kill -9 of the server during a fan-out: is every submission made exactly once, every log
line delivered once, and every vrun's exit code its task's?

    python bench/chaos.py [--trials 20] [--children 200] [--seed S]

Each trial has a private VELDA_HOME (VELDA_PORT=0) and runs, at the same time:
- a parent `vbatch` whose script submits --children children with `xargs -P4 vbatch`, then
  follows a task of its own with `vrun` (its output and exit status go to files);
- three top-level `vrun`s whose tasks print numbered lines on stdout and stderr and exit with
  a chosen code;
- two `--after-success` dependents, of the parent and of the first dependent.
The server is killed with SIGKILL once or twice at random moments, each in the first 8 s: on
the 2-core machine a trial without a kill has every task final 7 s after its start, so a kill
later than that would find the work done. Its
clients start it again themselves; one second after each kill the bench runs one `velda`
command too, as a user would (nothing else may be left to start it). Every task's command
appends a line to a file of its own, so a task that ran twice shows.

Progress goes to stderr (Ctrl-C or SIGTERM stops after cleaning up and prints the table of
the trials done); one Markdown table of totals over all trials goes to stdout. The goal is
zeros everywhere except the first three columns, where created = attempted = ran once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from velda.cli.common import exit_code_of
from velda.models import FINAL_STATES

BIN = Path(sys.executable).parent
FINAL = {s.value for s in FINAL_STATES}
VRUNS = 3
LINES = 300  # lines on each of stdout and stderr of a vrun task
SETTLE_S = 120.0  # how long after the last kill every task must be final


@dataclass
class Counts:
    attempted: int = 0  # submissions the trial made (parent, children, vruns, dependents)
    created: int = 0  # tasks in the store
    ran_once: int = 0
    ran_twice: int = 0  # or more
    children_missing: int = 0
    lines_lost: int = 0
    lines_repeated: int = 0
    exit_mismatch: int = 0  # vrun exit codes that differ from their task's
    not_final: int = 0  # tasks not final SETTLE_S after the last kill
    parent_failed: int = 0  # a parent that did not end SUCCESS
    kills: int = 0

    def add(self, other: Counts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Trial:
    def __init__(self, root: Path, children: int, rng: random.Random) -> None:
        self.root, self.children, self.rng = root, children, rng
        self.home, self.runs, self.out = root / "home", root / "runs", root / "out"
        for d in (self.runs, self.out):
            d.mkdir(parents=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VELDA_")}
        self.env.update(VELDA_HOME=str(self.home), VELDA_PORT="0", PYTHONUNBUFFERED="1",
                        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.counts = Counts()
        self.vruns: list[subprocess.Popen[str]] = []
        self.codes = [rng.choice([0, 3, 7]) for _ in range(VRUNS)]

    def cli(self, *argv: str, check: bool = True) -> str:
        result = subprocess.run(argv, env=self.env, cwd=self.root, capture_output=True,
                                text=True, timeout=300, stdin=subprocess.DEVNULL)
        if check and result.returncode:
            raise RuntimeError(f"{argv} exited {result.returncode}: {result.stderr.strip()}")
        return result.stdout.strip()

    # --- what the trial runs

    def parent_script(self) -> str:
        inner = f"echo run >> {self.runs}/pv; seq 1 {LINES}"
        return (
            f"set -e; echo run >> {self.runs}/fan\n"
            f"seq 1 {self.children} | xargs -P4 -I{{}} vbatch -q --name c{{}} "
            f"bash -c 'echo run >> {self.runs}/c$1' _ {{}} > /dev/null\n"
            f"set +e; vrun -q bash -c '{inner}' > {self.out}/pv.stdout\n"
            f"echo $? > {self.out}/pv.code\n"
        )

    def vrun_script(self, k: int) -> str:
        return (f"echo run >> {self.runs}/v{k}; for i in $(seq 1 {LINES}); do echo out $i; "
                f"echo err $i >&2; sleep 0.01; done; exit {self.codes[k]}")

    def start(self) -> list[subprocess.Popen[str]]:
        self.cli("vbatch", "-q", "--name", "warm-up", "true")  # the server, before the clock
        self.cli("vbatch", "-q", "--name", "fan", "bash", "-c", self.parent_script())
        for k, after in enumerate(["fan", "dep0"]):
            self.cli("vbatch", "-q", "--name", f"dep{k}", "--after-success", after,
                     "bash", "-c", f"echo run >> {self.runs}/dep{k}")
        self.counts.attempted = 1 + self.children + VRUNS + 2 + 1  # + the vrun in the parent
        self.vruns = [
            subprocess.Popen(
                ["vrun", "-q", "--name", f"v{k}", "bash", "-c", self.vrun_script(k)],
                env=self.env, cwd=self.root, stdin=subprocess.DEVNULL, text=True,
                stdout=open(self.out / f"v{k}.stdout", "w"),  # noqa: SIM115
                stderr=open(self.out / f"v{k}.stderr", "w"),  # noqa: SIM115
            )
            for k in range(VRUNS)
        ]
        return self.vruns

    # --- the chaos

    def server_pid(self) -> int | None:
        try:
            return int(json.loads((self.home / "server.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    def kill(self, started: float, at: float) -> None:
        time.sleep(max(0.0, started + at - time.monotonic()))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # a server restarting: kill it once it runs
            pid = self.server_pid()
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid)
                self.counts.kills += 1
                break
            time.sleep(0.02)
        time.sleep(1.0)
        self.cli("velda", "task", "list", check=False)  # as a user would, next

    def settle(self, vruns: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
        deadline = time.monotonic() + SETTLE_S
        tasks = self.tasks()
        while time.monotonic() < deadline:
            tasks = self.tasks()
            open_tasks = [t for t in tasks if t["status"] not in FINAL]
            if not open_tasks and all(p.poll() is not None for p in vruns):
                break
            time.sleep(0.25)
        for p in vruns:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return tasks

    def tasks(self) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.home / 'velda.db'}?mode=ro", uri=True, timeout=30)
        try:
            db.row_factory = sqlite3.Row
            rows = db.execute(
                "SELECT id, parent_id, name, status, exit_code, signal, started_at FROM tasks"
            ).fetchall()
        finally:
            db.close()
        return [dict(r) for r in rows]

    # --- what we count

    def count(self, tasks: list[dict[str, Any]], vruns: list[subprocess.Popen[str]]) -> None:
        c = self.counts
        tasks = [t for t in tasks if t["name"] != "warm-up"]
        c.created = len(tasks)
        c.not_final = sum(t["status"] not in FINAL for t in tasks)
        fan = next((t for t in tasks if t["name"] == "fan" and t["parent_id"] is None), None)
        c.parent_failed = int(fan is None or fan["status"] != "SUCCESS")
        names = {t["name"] for t in tasks if fan and t["parent_id"] == fan["id"]}
        c.children_missing = sum(f"c{i}" not in names for i in range(1, self.children + 1))
        for f in self.runs.iterdir():
            lines = len(f.read_text().splitlines())
            c.ran_once += lines == 1
            c.ran_twice += lines > 1
        by_name = {t["name"]: t for t in tasks if t["parent_id"] is None}
        for k, proc in enumerate(vruns):
            self.compare(f"v{k}.stdout", [f"out {i}" for i in range(1, LINES + 1)])
            self.compare(f"v{k}.stderr", [f"err {i}" for i in range(1, LINES + 1)])
            task = by_name.get(f"v{k}")
            c.exit_mismatch += task is None or proc.returncode != exit_code_of(task)
        self.compare("pv.stdout", [str(i) for i in range(1, LINES + 1)])
        inner = next((t for t in tasks if fan and t["parent_id"] == fan["id"]
                      and t["name"] is None), None)
        code = (self.out / "pv.code").read_text().strip() if (
            self.out / "pv.code").exists() else "none"
        c.exit_mismatch += inner is None or code != str(exit_code_of(inner))

    def compare(self, name: str, expected: list[str]) -> None:
        path = self.out / name
        got = Counter(path.read_text().splitlines() if path.exists() else [])
        want = Counter(expected)
        self.counts.lines_lost += sum((want - got).values())
        self.counts.lines_repeated += sum((got - want).values())

    def clean_up(self) -> None:
        """Followers first (they would start the server again), then tasks, then the server."""
        for proc in self.vruns:
            proc.kill()
            proc.wait()
        for pid_file in (self.home / "logs").glob("*/pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        self.cli("velda", "server", "stop", check=False)


def run_trial(root: Path, children: int, rng: random.Random) -> Counts:
    trial = Trial(root, children, rng)
    try:
        vruns = trial.start()
        started = time.monotonic()
        # the first kill while the vruns stream and the children are submitted; in half the
        # trials a second one in the same span, where the work of a trial is still going on
        moments = [rng.uniform(0.3, 8.0)] + [rng.uniform(0.3, 8.0)] * rng.choice([0, 1])
        moments.sort()
        for at in moments:
            trial.kill(started, at)
        trial.count(trial.settle(vruns), vruns)
    finally:
        trial.clean_up()
    return trial.counts


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_gone(pid: int) -> None:
    while _alive(pid):
        time.sleep(0.01)


HEADER = ["trials", "kills", "submissions attempted", "tasks created", "ran once",
          "ran twice", "children missing", "log lines lost", "log lines repeated",
          "vrun exit != task", "not final after 120 s", "parent not SUCCESS"]


def table(trials: int, total: Counts) -> str:
    row = [trials, total.kills, total.attempted, total.created, total.ran_once,
           total.ran_twice, total.children_missing, total.lines_lost, total.lines_repeated,
           total.exit_mismatch, total.not_final, total.parent_failed]
    return "\n".join([
        "| " + " | ".join(HEADER) + " |",
        "|" + "---:|" * len(HEADER),
        "| " + " | ".join(map(str, row)) + " |",
    ])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--children", type=int, default=200)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--keep", action="store_true", help="keep the homes of failed trials")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    total, done = Counts(), 0
    print(f"seed {seed}", file=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # run in the background, SIGINT is ignored
    try:
        for n in range(1, args.trials + 1):
            total.add(one_trial(n, args, rng))
            done = n
    except KeyboardInterrupt:  # Ctrl-C: the table of the trials done so far
        print(f"interrupted after {done} trials", file=sys.stderr)
    print(table(done, total))
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def one_trial(n: int, args: argparse.Namespace, rng: random.Random) -> Counts:
    root = Path(tempfile.mkdtemp(prefix="velda-chaos-"))
    began = time.monotonic()
    try:
        counts = run_trial(root, args.children, rng)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    bad = (counts.ran_twice or counts.children_missing or counts.lines_lost
           or counts.lines_repeated or counts.exit_mismatch or counts.not_final
           or counts.parent_failed or counts.created != counts.attempted)
    print(f"trial {n}: {time.monotonic() - began:.0f} s, {counts}"
          + (f" (kept {root})" if bad and args.keep else ""), file=sys.stderr, flush=True)
    if not (bad and args.keep):
        shutil.rmtree(root, ignore_errors=True)
    return counts


if __name__ == "__main__":
    raise SystemExit(main())
