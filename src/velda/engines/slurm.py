"""The Slurm engine: each attempt of a task is one Slurm job, submitted with the Slurm CLI.

The server needs only the Slurm client commands on its PATH (sbatch, squeue, scancel, sinfo)
and a filesystem it shares with the nodes: the working directory and the attempt directories
under VELDA_HOME. Each attempt's batch script (`job.sh` in its attempt directory) runs the
local engine's status-file wrapper (status_file.py) with stdout and stderr opened straight
onto the attempt's log files, so the logs land byte for byte and the exact exit code or signal
is written to a file. Slurm without accounting forgets a job `MinJobAge` seconds after it ends;
the file does not.

The shards of one parent that start together are one job array, indexed by shard number; the
array's batch script (`array.sh`) runs the `job.sh` of the shard its array task stands for.

One poll loop per engine asks `squeue` once for all of its jobs. A job that started (RUNNING,
or its wrapper wrote `pid`) is reported running; a job that left the queue is reported from
its status file, or `lost` when none appears. The batch script also touches `heartbeat` every
few seconds: a RUNNING job whose heartbeat stops (its node died, or lost its filesystem) is
cancelled and reported lost, however long Slurm takes to notice.

Jobs are named `velda-ID.ATTEMPT` (an array `velda-PARENT.ATTEMPT.shards`), so that `adopt`
finds a job that was submitted just before the server died, before its handle was stored.

The batch script writes the name of its node to `node`; the engine reports the job running
once it knows that node's address (Slurm's NodeAddr, from sinfo), where the server reaches the
task's ports (`host_of`, forwarded ports) and its terminal. A task under a terminal runs under
terminal_host.py's keeper on its node, which publishes a TCP port and a token in the attempt
directory; `terminal()` sends the keys there. Its exit is reported once the keeper has copied
the last of the session into the log (it removes its file as it ends), so a follower sees all
of the output before the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velda.engines import terminal_host
from velda.engines.base import (
    EngineError,
    EngineEvents,
    Handle,
    Launch,
    NotStartedError,
    StartResult,
)
from velda.engines.slurm_cli import Accounted, SlurmCommands
from velda.engines.status_file import (
    PID,
    WRAPPER,
    exit_from_status,
    read_status,
    read_word,
    unusable_env,
    wrapper_started,
)
from velda.models import Exit, Pool, Reason, Resources

log = logging.getLogger("velda.engines.slurm")

POLL_S = 0.5
CHECK_TTL_S = 5.0
INVENTORY_TTL_S = 2.0  # pages that poll /pools, however many, ask sinfo this often at most
GONE_GRACE_S = 3.0  # a job gone from the queue may take this long to show its status file
HEARTBEAT_S = 5
NODE_TIMEOUT_S = 30.0  # default of the pool's `node_timeout`
KEEPER_WAIT_S = terminal_host.DRAIN_S + 1.0  # a terminal keeper's own deadline, and a margin
# States in which a job has not started yet, or runs; any other state (or none) means it ended.
WAITING = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                     "RESIZING", "SUSPENDED", "STOPPED"})
RUNNING = frozenset({"RUNNING"})
# Taken from Slurm in the job, never from the environment the task was submitted from (a
# `vbatch` inside a Slurm job must not hand its own job's variables on to a new job).
_SLURM_OWN = ("SLURM_", "CUDA_VISIBLE_DEVICES")


@dataclass
class _Job:
    task_id: str
    attempt: int
    attempt_dir: Path
    handle: Handle
    running: bool = False
    cancelled: bool = False
    gone_since: float | None = None
    beat: float | None = None  # the heartbeat file's mtime when last seen changing
    beat_seen: float = 0.0  # monotonic time of that
    host: str | None = None  # the address of its node, once it runs there
    status_seen: float | None = None  # monotonic time its status file was first seen


class SlurmEngine:
    """Engine of one pool whose tasks run as Slurm jobs (`engine = "slurm"` in velda.toml).

    Pool options read: `partition`, `mem` (`--mem`, e.g. "32G"), `time` (`--time` when the
    task has no timeout), `account`, `qos`, `sbatch_args` (a list passed on as is) and
    `node_timeout` (s, default 30: how long a running job's heartbeat may stop before it is
    reported lost). The pool's `cpus` and `gpus` become `--cpus-per-task` and `--gres=gpu:N`.
    """

    name = "slurm"
    places_work = True
    writes_log_index = False  # the server indexes the log files as they grow
    samples_here = False  # on the nodes; the wrapper's status file still gives the CPU totals
    gives_terminals = True  # through a keeper on the node (terminal_host.py `serve`)

    def __init__(self, pool: Pool, events: EngineEvents) -> None:
        self.pool = pool
        self.events = events
        timeout = pool.options.get("node_timeout")
        self.node_timeout_s = (float(timeout) if isinstance(timeout, int | float)
                               and not isinstance(timeout, bool) and timeout > 0
                               else NODE_TIMEOUT_S)  # a bad value is refused at submit
        conf = pool.options.get("slurm_conf")
        self.slurm = SlurmCommands(str(conf) if conf else None)
        self._checking = asyncio.Lock()
        self._checked: dict[object, float] = {}  # partition -> when sinfo last showed it
        self._inventory: dict[object, tuple[float, dict[str, Any]]] = {}  # partition -> (when, it)
        self._jobs: dict[str, _Job] = {}  # by job spec: "123", or "123_4" for an array task
        self._addresses: dict[str, str] = {}  # node name -> NodeAddr
        self._addresses_at = -math.inf  # when sinfo last gave them
        self._poller: asyncio.Task[None] | None = None

    def capacity(self) -> Resources:
        return Resources()  # Slurm places work itself

    async def check(self, pool: Pool) -> None:
        """The options are valid and slurmctld answers with the pool's partition; a good
        answer holds for CHECK_TTL_S, so a burst of submits asks sinfo once."""
        check_options(pool)
        partition = pool.options.get("partition")
        async with self._checking:
            if time.monotonic() - self._checked.get(partition, -math.inf) > CHECK_TTL_S:
                await self._check_partition(pool)
                self._checked[partition] = time.monotonic()

    async def _check_partition(self, pool: Pool) -> None:
        try:
            names = await self.slurm.partitions()
        except EngineError as e:
            raise EngineError(f"pool {pool.name}: {e}") from None
        partition = pool.options.get("partition")
        if partition and str(partition) not in names:
            raise EngineError(f"pool {pool.name}: Slurm has no partition '{partition}'"
                              f" (it has {', '.join(names) or 'none'})")

    def check_task(self, pool: Pool, cwd: str, shards: int | None, gang: bool) -> None:
        check_options(pool)
        if gang:
            raise EngineError(
                "gang: Slurm pools do not run gangs (all shards in one allocation); submit"
                " the shards without --gang (they become one job array), or use a local pool",
                "gang")

    async def inventory(self, pool: Pool) -> dict[str, Any]:
        """The partition's nodes with their CPUs and GPUs, in all and allocated, as sinfo
        said at most INVENTORY_TTL_S ago."""
        partition = pool.options.get("partition")
        when, known = self._inventory.get(partition, (-math.inf, {}))
        if time.monotonic() - when <= INVENTORY_TTL_S:
            return known
        try:
            nodes = await self.slurm.nodes(str(partition) if partition else None)
        except EngineError as e:
            raise EngineError(f"pool {pool.name}: {e}") from None
        known = {"nodes": [node.describe() for node in nodes]}
        self._inventory[partition] = (time.monotonic(), known)
        return known

    async def start(self, launch: Launch) -> Handle:
        name = f"velda-{launch.task_id}.{launch.attempt}"
        script = _write_job_script(launch)
        out = launch.attempt_dir / "slurm.out"
        job = await self._submit(launch, name, script, out, [])
        return self._watch(launch, job, name)

    async def start_many(self, launches: list[Launch]) -> list[StartResult]:
        results: dict[int, StartResult] = {}
        for group in _groups(launches):
            members = [launches[i] for i in group]
            handles: list[StartResult]
            try:
                handles = (await self._start_array(members) if len(members) > 1
                           else [await self.start(members[0])])
            except Exception as e:  # it ends the attempts of this submission and no other
                handles = [e] * len(members)
            results.update(zip(group, handles, strict=True))
        return [results[i] for i in range(len(launches))]

    async def terminal(self, handle: Handle, data: bytes, size: tuple[int, int] | None) -> None:
        """Keys for the keeper of the job's terminal on its node. Before the keeper is up
        this fails, and vrun offers the keys again (cli/terminal.py): none are lost."""
        job = self._jobs.get(str(handle.get("job")))
        if job is None:
            raise EngineError("its terminal is closed: the task has ended")
        published = terminal_host.read_published(job.attempt_dir)
        await self._locate(job)
        if published is None or job.host is None:
            raise EngineError("its terminal is not up yet")
        port, token = published
        if not await terminal_host.send_over_tcp(job.host, port, token, data, size):
            raise EngineError(f"its terminal at {job.host} port {port} does not answer")

    def host_of(self, handle: Handle) -> str:
        """The address of the job's node (NodeAddr), known once it is reported running."""
        job = self._jobs.get(str(handle.get("job")))
        if job is None or job.host is None:
            raise EngineError("the Slurm node of this attempt is not known yet")
        return job.host

    async def signal(self, handle: Handle, signum: int) -> None:
        job = handle.get("job")
        if isinstance(job, str):
            await self.slurm.scancel(f"--signal={signum}", "--full", job)

    async def cancel(self, handle: Handle, grace_s: float) -> None:
        spec = handle.get("job")
        if not isinstance(spec, str):
            return
        job = self._jobs.get(spec)
        if job is not None:
            job.cancelled = True
        if job is not None and not job.running:
            await self.slurm.scancel(spec)  # a pending job takes no signal
            return
        await self.slurm.scancel("--signal=CONT", "--full", spec)
        await self.slurm.scancel("--signal=TERM", "--full", spec)
        asyncio.get_running_loop().call_later(grace_s, self._kill_later, spec)

    async def adopt(self, task_id: str, attempt: int, handle: Handle, launch: Launch) -> None:
        code = read_status(launch.attempt_dir)
        if code is not None:
            self.events.exited(task_id, attempt, exit_from_status(code))
            return
        spec = handle.get("job")
        name = handle.get("name")
        if not isinstance(spec, str):
            spec, name = await self._find_by_name(launch)
        if spec is None:
            if (launch.attempt_dir / PID).exists():  # it ran, and Slurm forgot it
                self.events.exited(task_id, attempt, Exit(
                    None, None, Reason.LOST, "its Slurm job ended without an exit status"))
                return
            raise NotStartedError(task_id)
        self._watch(launch, spec, str(name), running=bool(handle.get("running")))
        await self._locate(self._jobs[spec])  # its forwarded ports work again at once

    async def lend_cpus(self, handle: Handle, on: bool) -> None:
        return None  # a Slurm allocation cannot be lent

    async def close(self) -> None:
        """Running jobs run on; the next server adopts them."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        self._poller = None
        self._jobs.clear()

    # --- submitting

    async def _start_array(self, launches: list[Launch]) -> list[StartResult]:
        first = launches[0]
        name = f"velda-{first.parent_id}.{first.attempt}.shards"
        lines = [f"{launch.shard_id}) exec /bin/sh {shlex.quote(str(_write_job_script(launch)))}"
                 " ;;" for launch in launches]
        script = first.attempt_dir / "array.sh"
        script.write_text(
            "#!/bin/sh\n# the shards of this job array, by array task id\n"
            'case "$SLURM_ARRAY_TASK_ID" in\n' + "\n".join(lines) + "\nesac\n"
            'echo "velda: no shard $SLURM_ARRAY_TASK_ID in this array" >&2\nexit 1\n')
        indexes = ",".join(str(launch.shard_id) for launch in launches)
        out = first.attempt_dir / "slurm-%a.out"
        job = await self._submit(first, name, script, out, [f"--array={indexes}"])
        return [self._watch(launch, f"{job}_{launch.shard_id}", name) for launch in launches]

    async def _submit(self, launch: Launch, name: str, script: Path, out: Path,
                      extra: list[str]) -> str:
        return await self.slurm.sbatch([
            f"--job-name={name}", f"--chdir={launch.cwd}", f"--output={out}",
            "--no-requeue", *sbatch_options(launch), *extra, str(script)])

    async def _find_by_name(self, launch: Launch) -> tuple[str | None, str | None]:
        """The job of an attempt whose handle was never stored, by the name it was given."""
        names = [f"velda-{launch.task_id}.{launch.attempt}"]
        if launch.parent_id is not None and launch.shard_id is not None:
            names.append(f"velda-{launch.parent_id}.{launch.attempt}.shards")
        return await self.slurm.find_by_name(names, launch.shard_id)

    # --- watching

    def _watch(self, launch: Launch, spec: str, name: str, running: bool = False) -> Handle:
        handle: Handle = {"job": spec, "name": name}
        job = _Job(launch.task_id, launch.attempt, launch.attempt_dir, handle, running=running)
        self._jobs[spec] = job
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll_loop())
        return handle

    async def _poll_loop(self) -> None:
        while self._jobs:
            await asyncio.sleep(POLL_S)
            try:
                states = await self.slurm.queue_states(list(self._jobs))
            except EngineError as e:  # slurmctld down: heartbeats still tell a dead node
                log.warning("%s", e)
                states = None
            ended: dict[str, str | None] = {}  # gone without a status file, and their state
            for spec, job in list(self._jobs.items()):
                try:
                    if await self._follow(spec, job, states):
                        ended[spec] = None if states is None else states.get(spec)
                except Exception:  # one job's trouble must not stop the watch of the others
                    log.exception("following Slurm job %s", spec)
            if ended:
                await self._end_without_status(ended)

    async def _follow(self, spec: str, job: _Job, states: dict[str, str] | None) -> bool:
        """Report what changed for one job; True when it ended without a status file (it
        left the queue, or squeue reports it ended, GONE_GRACE_S ago)."""
        code = read_status(job.attempt_dir)
        if code is not None:
            self._started(job)
            if self._drained(job):
                self._end(spec, job, exit_from_status(code))
            return False
        state = None if states is None else states.get(spec)
        if states is None or state in WAITING:
            return False
        if state in RUNNING:
            job.gone_since = None
            await self._locate(job)
            if job.host is not None:  # its ports and terminal can be reached from now on
                self._started(job)
            if self._heartbeat_stopped(job):
                await self.slurm.scancel("--signal=KILL", "--full", spec)
                self._end(spec, job, Exit(None, None, Reason.LOST, (
                    f"Slurm job {spec} stopped its heartbeat for {self.node_timeout_s:g} s"
                    " (its node is down or lost the shared filesystem)")))
            return False
        if (job.attempt_dir / PID).exists():
            self._started(job)
        now = time.monotonic()
        job.gone_since = job.gone_since or now
        return now - job.gone_since >= GONE_GRACE_S

    async def _end_without_status(self, ended: dict[str, str | None]) -> None:
        """End jobs that left no status file, from what squeue said or, for those it
        forgot, what sacct remembers (one call for all of them)."""
        accounted = await self.slurm.accounted([s for s, state in ended.items() if not state])
        for spec, state in ended.items():
            job = self._jobs.get(spec)
            if job is not None:
                self._end(spec, job, _exit_without_status(
                    spec, state, job.cancelled, accounted.get(spec)))

    async def _locate(self, job: _Job) -> None:
        """Learn the address of the job's node, from the name its batch script wrote."""
        if job.host is None:
            node = read_word(job.attempt_dir / "node")
            if node:
                job.host = await self._address_of(node)

    async def _address_of(self, node: str) -> str | None:
        """The node's NodeAddr, from sinfo (asked again for a node it did not list, at most
        every INVENTORY_TTL_S: None meanwhile); the node's name where sinfo cannot tell."""
        if node not in self._addresses:
            if time.monotonic() - self._addresses_at < INVENTORY_TTL_S:
                return None
            self._addresses_at = time.monotonic()
            try:
                self._addresses = await self.slurm.node_addresses()
            except EngineError as e:
                log.warning("%s", e)
        return self._addresses.get(node, node)

    @staticmethod
    def _drained(job: _Job) -> bool:
        """Whether the keeper of the job's terminal, if it has one, has ended (it removes
        its published file then), or had KEEPER_WAIT_S since the status appeared."""
        now = time.monotonic()
        job.status_seen = job.status_seen or now
        return (not (job.attempt_dir / terminal_host.PUBLISHED).exists()
                or now - job.status_seen >= KEEPER_WAIT_S)

    def _heartbeat_stopped(self, job: _Job) -> bool:
        """Whether the heartbeat file has not changed for node_timeout_s, by the server's
        own clock (a node's clock may differ)."""
        try:
            beat: float | None = (job.attempt_dir / "heartbeat").stat().st_mtime
        except OSError:
            beat = None
        now = time.monotonic()
        if beat != job.beat or not job.beat_seen:
            job.beat, job.beat_seen = beat, now
        return now - job.beat_seen > self.node_timeout_s

    def _started(self, job: _Job) -> None:
        if not job.running:
            job.running = True
            # its start on the node, not the poll that saw it (up to a poll's interval later)
            self.events.running(job.task_id, job.attempt, {**job.handle, "running": True},
                                wrapper_started(job.attempt_dir))

    def _end(self, spec: str, job: _Job, exit: Exit) -> None:
        if self._jobs.pop(spec, None) is not None:
            self.events.exited(job.task_id, job.attempt, exit)

    def _kill_later(self, spec: str) -> None:
        if spec in self._jobs:
            task = asyncio.get_running_loop().create_task(
                self.slurm.scancel("--signal=KILL", "--full", spec))
            task.add_done_callback(lambda t: t.exception())


def _exit_without_status(spec: str, state: str | None, cancelled: bool,
                         accounted: Accounted | None = None) -> Exit:
    """How a job ended that its wrapper could not tell (it never ran, or its node died):
    from squeue's last state, or from accounting."""
    if cancelled:
        return Exit.from_signal(signal.SIGKILL)
    if accounted is not None:
        state = accounted.state
    if state == "TIMEOUT":
        return Exit(None, signal.SIGKILL, Reason.TIMEOUT, "Slurm's time limit (--time) ran out")
    if accounted is not None and state in ("COMPLETED", "FAILED"):
        if accounted.signal:
            return Exit.from_signal(accounted.signal)
        return Exit.from_code(accounted.code)
    return Exit(None, None, Reason.LOST,
                f"Slurm job {spec} ended ({state or 'gone from squeue'}) without an exit status")


def _groups(launches: list[Launch]) -> list[list[int]]:
    """Indexes of launches submitted together: the shards of one parent and attempt with the
    same command, working directory and pool make one group; every other launch its own."""
    groups: dict[object, list[int]] = {}
    for i, launch in enumerate(launches):
        key: object = i
        if launch.parent_id is not None and launch.shard_id is not None:
            key = (launch.parent_id, launch.attempt, tuple(launch.argv), launch.cwd,
                   launch.pool.name)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


_TEXT_OPTIONS = ("partition", "account", "qos", "mem", "time", "slurm_conf")


def check_options(pool: Pool) -> None:
    """Refuse pool options sbatch could not take, naming the option."""
    options = pool.options
    for key in _TEXT_OPTIONS:
        value = options.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()
                                  or any(c.isspace() for c in value)):
            raise EngineError(f"pool {pool.name}: {key} must be a word, not {value!r}")
    extra = options.get("sbatch_args", [])
    if not isinstance(extra, list) or not all(isinstance(a, str) and a for a in extra):
        raise EngineError(f"pool {pool.name}: sbatch_args must be a list of strings,"
                          f" not {extra!r}")
    conf = options.get("slurm_conf")
    if isinstance(conf, str) and not os.path.isfile(conf):
        raise EngineError(f"pool {pool.name}: slurm_conf {conf}: no such file")
    timeout = options.get("node_timeout", NODE_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise EngineError(f"pool {pool.name}: node_timeout must be a number of seconds > 0,"
                          f" not {timeout!r}")


def sbatch_options(launch: Launch) -> list[str]:
    """What the pool and the task ask of Slurm, as sbatch options."""
    pool = launch.pool
    options = pool.options
    args = []
    for key in ("partition", "account", "qos", "mem"):
        if options.get(key):
            args.append(f"--{key}={options[key]}")
    if pool.resources.memory_mb and not options.get("mem"):
        args.append(f"--mem={pool.resources.memory_mb}M")
    if pool.resources.cpus > 0:
        args.append(f"--cpus-per-task={math.ceil(pool.resources.cpus)}")
    if pool.resources.gpus > 0:
        args.append(f"--gres=gpu:{pool.resources.gpus}")
    if launch.timeout_s is not None:
        args.append(f"--time={max(1, math.ceil(launch.timeout_s / 60))}")
    elif options.get("time"):
        args.append(f"--time={options['time']}")
    check_options(pool)
    extra = options.get("sbatch_args", [])
    assert isinstance(extra, list)  # check_options refused anything else
    return args + [str(arg) for arg in extra]


def _run_plain(launch: Launch, env: str, wrapper: list[str]) -> str:
    return (f"/usr/bin/env -- {env} {shlex.join(wrapper)} </dev/null"
            f" >>{shlex.quote(str(launch.stdout_path))}"
            f" 3>>{shlex.quote(str(launch.stderr_path))} 2>/dev/null\n")


def _run_under_terminal(launch: Launch, env: str, wrapper: list[str]) -> str:
    """The wrapper under terminal_host.py's keeper, copied beside the script (the node may
    have no velda installed), run by the task's own `python3`: the session goes into the
    stdout log, what the keeper itself has to say (python3 not found) into the stderr log."""
    assert launch.terminal is not None
    keeper = launch.attempt_dir / "terminal_host.py"
    shutil.copyfile(terminal_host.__file__, keeper)
    rows, cols = launch.terminal
    argv = ["python3", "-I", "-S", str(keeper), "serve", str(launch.attempt_dir), str(rows),
            str(cols), *wrapper]
    return (f"/usr/bin/env -- {env} {shlex.join(argv)} </dev/null"
            f" >>{shlex.quote(str(launch.stdout_path))}"
            f" 2>>{shlex.quote(str(launch.stderr_path))}\n")


def _task_env(launch: Launch) -> dict[str, str]:
    env = {k: v for k, v in launch.env.items() if not k.startswith(_SLURM_OWN)}
    if launch.server_home is not None:
        env["VELDA_HOME"] = str(launch.server_home)
    env["SLURM_EXPORT_ENV"] = "ALL"  # the task's own srun and sbatch pass its environment on
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise EngineError(unusable_env(env, ValueError(key)))
    return env


def _write_job_script(launch: Launch) -> Path:
    """The attempt's batch script: a heartbeat in the background, the name of its node in
    `node`, and the status-file wrapper in the task's environment (on top of what Slurm sets
    in the job) with the log files on fd 1 and 3, or under a terminal. Its traps keep it
    alive through the signals velda forwards to the command."""
    d = shlex.quote(str(launch.attempt_dir))
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in _task_env(launch).items())
    wrapper = ["/bin/sh", "-c", WRAPPER, "velda-task", str(launch.attempt_dir), launch.cwd,
               *launch.argv]
    run = (_run_plain(launch, env, wrapper) if launch.terminal is None
           else _run_under_terminal(launch, env, wrapper))
    text = (
        f"#!/bin/sh\n# velda task {launch.task_id}, attempt {launch.attempt}\n"
        "trap : INT TERM HUP QUIT USR1 USR2\n"
        'PATH=${PATH:-/usr/bin:/bin}  # for sleep, whatever sbatch was given\n'
        "( trap : INT TERM HUP QUIT USR1 USR2\n"
        f"  while :; do : > {d}/heartbeat; sleep {HEARTBEAT_S}; done\n"
        ") </dev/null >/dev/null 2>&1 &\n"
        "beat=$!\n"
        f'echo "${{SLURMD_NODENAME:-$(uname -n)}}" > {d}/node\n'
        f"{run}s=$?\n"
    )
    if launch.terminal is not None:  # its wrapper never ran: no status but the keeper's
        text += f"[ -e {d}/pid ] || echo $s > {d}/status\n"
    text += "kill -KILL $beat\nexit $s\n"
    script = launch.attempt_dir / "job.sh"
    try:
        script.write_bytes(os.fsencode(text))
    except UnicodeError as e:
        raise EngineError(f"cannot write the batch script: {e}") from e
    return script
