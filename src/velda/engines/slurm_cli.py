"""The Slurm commands the Slurm engine runs, and what their output means.

Everything velda asks of Slurm goes through its client commands (`sbatch`, `squeue`, `sacct`,
`scancel`, `sinfo`), found on the server's PATH, with the pool's `slurm_conf` as SLURM_CONF
when it has one (a server may talk to several clusters). Each call has a time limit, so a hung
`slurmctld` is an error naming it, never a hung server. The queries are batched: one `squeue`
(and at most one `sacct`) for all of a pool's jobs per poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

from velda.engines.base import EngineError

log = logging.getLogger("velda.engines.slurm")

CLI_TIMEOUT_S = 30.0
# All that sbatch gets of the server's environment, and so all a job inherits of it (Slurm's
# default --export=ALL); the job script sets the task's own environment on top. Not
# --export=NONE: with it Slurm builds the job's environment on the node as a login does, which
# delayed each job's start by up to a second (bench/slurm_bench.py).
_SBATCH_ENV = ("PATH", "SLURM_CONF", "HOME", "USER", "LOGNAME", "LANG")


@dataclass(frozen=True)
class Node:
    """One node of a partition, as `sinfo` reports it."""

    name: str
    state: str
    cpus: int
    cpus_allocated: int
    gpus: int
    gpus_allocated: int

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "state": self.state, "cpus": self.cpus,
                "cpus_allocated": self.cpus_allocated, "gpus": self.gpus,
                "gpus_allocated": self.gpus_allocated}


@dataclass(frozen=True)
class Accounted:
    """An ended job as `sacct` remembers it: its state and its exit code and signal."""

    state: str
    code: int
    signal: int


class SlurmCommands:
    def __init__(self, slurm_conf: str | None = None) -> None:
        self.env = {**os.environ, "SLURM_CONF": slurm_conf} if slurm_conf else None
        base = self.env or os.environ
        self.sbatch_env = {key: base[key] for key in _SBATCH_ENV if key in base}
        self.accounting = True  # until sacct says this cluster keeps none

    async def run(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        """A Slurm command's exit status, stdout, and the last line of its stderr."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, env=env or self.env)
        except OSError as e:
            raise EngineError(f"cannot run {argv[0]}: {e.strerror} (is the Slurm client on"
                              " the server's PATH?)") from e
        try:
            out, err = await asyncio.wait_for(proc.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 1, "", f"{argv[0]}: no answer within {CLI_TIMEOUT_S:g} s"
        lines = err.decode(errors="replace").strip().splitlines()
        return proc.returncode or 0, out.decode(errors="replace"), lines[-1] if lines else ""

    async def sbatch(self, args: Sequence[str]) -> str:
        """Submit a batch job; its job id."""
        rc, out, err = await self.run("sbatch", "--parsable", *args, env=self.sbatch_env)
        if rc != 0:
            raise EngineError(f"sbatch: {err}")
        return out.strip().split(";")[0]

    async def scancel(self, *args: str) -> None:
        rc, _, err = await self.run("scancel", *args)
        if rc != 0:
            log.warning("scancel %s: %s", " ".join(args), err)

    async def partitions(self) -> list[str]:
        rc, out, err = await self.run("sinfo", "-h", "-o", "%P")
        if rc != 0:
            raise EngineError(f"slurmctld is not reachable: {err}")
        return [name.rstrip("*") for name in out.split()]

    async def nodes(self, partition: str | None) -> list[Node]:
        """The nodes of a partition (of the default one when None), with CPUs and GPUs in
        all and allocated."""
        where = ["-p", partition] if partition else []
        rc, out, err = await self.run(
            "sinfo", "-h", "-N", *where,
            "-O", "NodeList:|,StateCompact:|,CPUsState:|,Gres:|,GresUsed:|")
        if rc != 0:
            raise EngineError(f"slurmctld is not reachable: {err}")
        return [_parse_node(line) for line in out.splitlines() if line.count("|") >= 5]

    async def node_addresses(self) -> dict[str, str]:
        """node name -> the address Slurm reaches it at (NodeAddr), for every node; one sinfo."""
        rc, out, err = await self.run("sinfo", "-h", "-N", "-o", "%N|%o")
        if rc != 0:
            raise EngineError(f"slurmctld is not reachable: {err}")
        pairs = (line.strip().split("|") for line in out.splitlines() if line.count("|") == 1)
        return {name: address for name, address in pairs if name and address}

    async def queue_states(self, specs: Sequence[str]) -> dict[str, str]:
        """job spec ("123", or "123_4" for an array task) -> state, for those of `specs`
        Slurm still knows; one squeue call."""
        jobs = sorted({spec.split("_")[0] for spec in specs})
        rc, out, err = await self.run("squeue", "-h", "-r", "-t", "all", "-o", "%F|%K|%T",
                                      "-j", ",".join(jobs))
        if rc != 0 and "Invalid job id" not in err:  # a lone job id Slurm already forgot
            raise EngineError(f"squeue: {err}")
        return dict(_parse_queue_line(line) for line in out.splitlines()
                    if line.count("|") == 2)

    async def accounted(self, specs: Sequence[str]) -> dict[str, Accounted]:
        """What accounting remembers of ended jobs that squeue forgot; one sacct call, and
        none once sacct said that this cluster keeps no accounting."""
        if not specs or not self.accounting:
            return {}
        rc, out, err = await self.run("sacct", "-n", "-P", "-X", "-o", "JobID,State,ExitCode",
                                      "-j", ",".join(sorted(set(specs))))
        if rc != 0:
            if "accounting storage is disabled" in err:
                self.accounting = False
            else:
                log.warning("sacct: %s", err)
            return {}
        return dict(_parse_accounted(line) for line in out.splitlines() if line.count("|") == 2)

    async def find_by_name(self, names: Sequence[str],
                           shard: int | None) -> tuple[str | None, str | None]:
        """The job spec and name of the first job named names[0], or of the array task
        `shard` of a job named one of the others; (None, None) when Slurm has none."""
        rc, out, err = await self.run("squeue", "-h", "-r", "-t", "all", "-o", "%F|%K|%T|%j",
                                      f"--name={','.join(names)}")
        if rc != 0:
            raise EngineError(f"squeue: {err}")
        for line in out.splitlines():
            job, index, _, name = line.strip().split("|", 3)
            if name == names[0]:
                return job, name
            if shard is not None and index == str(shard):
                return f"{job}_{index}", name
        return None, None


def _parse_queue_line(line: str) -> tuple[str, str]:
    job, index, state = line.strip().split("|")
    return (job if index in ("N/A", "") else f"{job}_{index}"), state


def _parse_accounted(line: str) -> tuple[str, Accounted]:
    """`123_4|COMPLETED|0:0` -> ("123_4", ...): ExitCode is "code:signal"."""
    job, state, exit_code = line.strip().split("|")
    code, _, signum = exit_code.partition(":")
    return job, Accounted(state.split()[0], _int(code), _int(signum))


def _parse_node(line: str) -> Node:
    """`n1|mix|1/1/0/2|gpu:fake:1|gpu:fake:1(IDX:0)|`: CPUs are allocated/idle/other/total."""
    name, state, cpus, gres, used = line.strip().split("|")[:5]
    allocated, _, _, total = (cpus.split("/") + ["0"] * 4)[:4]
    return Node(name, state, _int(total), _int(allocated), _gpus(gres), _gpus(used))


def _gpus(gres: str) -> int:
    """The GPU count in a Gres string like `gpu:fake:2(S:0-1),shard:4` or `(null)`."""
    count = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) > 1:
            count += _int(parts[-1])
    return count


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0
