"""A real two-node Slurm cluster on loopback, for the tests (tests/conftest.py starts one).

Slurm's daemons bind 0.0.0.0 with no option to change it, so they run in a network namespace
of their own: `lo` up plus one /32 address (with `lo` alone, Slurm fails in getaddrinfo). A
`sleep` started by `unshare -n` holds the namespace; every client (sbatch, squeue, a velda
server that calls them) must run inside it, through `prefix`. munged runs outside: its Unix
socket is a file, reachable from any namespace. Everything lives under the directory given
to `start()`; nothing is read from or written to /etc/slurm, /etc/munge or /run.

    cluster = SlurmCluster()
    cluster.start(tmp_dir)
    subprocess.run([*cluster.prefix, "sbatch", "--wrap", "true"], env=cluster.env)
    cluster.kill_node("n2")      # SIGKILL that node's slurmd (its jobs' steps run on)
    cluster.restart_node("n2")   # start it again; returns once sinfo shows it idle
    cluster.stop()               # every process in the namespace, the daemons, the holder

Needs root (a network namespace). As a script, for developers:
`python tests/slurm_cluster.py DIR` starts one, prints its prefix and env, and stops on Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

NODES = ("n1", "n2")
TOOLS = ("slurmctld", "slurmd", "munged", "nsenter", "unshare", "ip")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol", "sacct")
START_TIMEOUT_S = 30
NAMESPACE_ADDRESS = "10.254.254.1/32"

# Both nodes are this machine (each slurmd on its own port). SlurmdParameters=config_overrides
# keeps the CPUs declared here on a machine with fewer, instead of draining the node.
SLURM_CONF = """\
ClusterName=velda-test
SlurmctldHost=localhost(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket={root}/munge-run/munge.socket.2
CredType=cred/munge
SlurmUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=10
SlurmctldTimeout=10
MessageTimeout=5
InactiveLimit=0
KillWait=2
MinJobAge=300
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
GresTypes=gpu
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=4 \
RealMemory=4000 Gres=gpu:fake:1 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
"""

# A fake GPU per node: jobs that ask --gres=gpu:1 see CUDA_VISIBLE_DEVICES=0.
GRES_CONF = """\
AutoDetect=off
NodeName=n[1-2] Name=gpu Type=fake Count=1 File=/dev/null
"""


def searchable_tmpdir() -> Path:
    """Where a cluster's directory may go: munged refuses a socket below a directory that
    others cannot enter, and a private TMPDIR (0700, as CI gives each run) is one. Then the
    system's /tmp (1777) is used; the fixture removes what it made there."""
    tmp = Path(tempfile.gettempdir()).resolve()
    if all(os.stat(d).st_mode & 0o001 for d in (tmp, *tmp.parents)):
        return tmp
    return Path("/tmp")


def missing_tools() -> list[str]:
    """The commands the cluster needs that are not installed here (empty when all are)."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


class SlurmCluster:
    """One slurmctld, a slurmd per node in NODES, and their munged."""

    def __init__(self) -> None:
        self.root = Path()
        self.prefix: list[str] = []
        self.env: dict[str, str] = {}
        self._holder: subprocess.Popen[bytes] | None = None
        self._daemons: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, root: Path) -> None:
        """Start the cluster under `root` and return once every node is idle; on failure,
        stop what was started and raise with the daemons' log tails."""
        self.root = root
        try:
            self._write_files()
            self._start_munged()
            self._start_namespace()
            self._spawn("slurmctld", ["slurmctld", "-D"], netns=True)
            for node in NODES:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node], netns=True)
            self._wait_idle()
        except BaseException:
            self.stop()
            raise

    def kill_node(self, node: str) -> None:
        """SIGKILL a node's slurmd, as a crashed machine would leave it: slurmctld marks the
        node down after SlurmdTimeout."""
        proc = self._daemons.pop(f"slurmd-{node}")
        proc.kill()
        proc.wait()

    def restart_node(self, node: str) -> None:
        """Start a node's slurmd again after kill_node and return once sinfo shows it idle
        (ReturnToService=2 brings a node that was down back by itself)."""
        self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node], netns=True)
        _wait_for(lambda: self._sinfo().get(node) == "idle", f"{node} idle again in sinfo", self)

    def write_clients(self, bin_dir: Path, namespaced: bool = True) -> None:
        """Scripts named like the Slurm client commands that run the real ones against this
        cluster, from inside its namespace (or, namespaced=False, from outside, where no
        slurmctld answers): with `bin_dir` first on PATH, code that calls `sbatch` finds it."""
        bin_dir.mkdir(parents=True, exist_ok=True)
        enter = " ".join(self.prefix) + " " if namespaced else ""
        for tool in CLIENTS:
            path = bin_dir / tool
            path.write_text(f"#!/bin/sh\nexport SLURM_CONF={self.env['SLURM_CONF']}\n"
                            f'exec {enter}/usr/bin/{tool} "$@"\n')
            path.chmod(0o755)

    def stop(self) -> None:
        """Kill every process in the namespace (daemons, job steps, clients), then the holder
        and munged. Safe to call twice, or after a failed start."""
        if self._holder is not None:
            killed = self._namespace_pids()
            for pid in killed:
                _kill(pid)
            _wait_gone(killed)
            self._holder.kill()
            self._holder.wait()
        for proc in self._daemons.values():
            proc.kill()  # a no-op for one already reaped
            proc.wait()
        self._daemons.clear()
        self._holder = None

    def logs(self, lines: int = 15) -> str:
        """The tail of every daemon's log and output (where it writes before its log file
        opens), to explain a cluster that did not come up."""
        parts = []
        for path in sorted((self.root / "log").iterdir()):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    # ------------------------------------------------------------ start-up steps

    def _write_files(self) -> None:
        for sub in ("munge", "munge-run", "state", "spool", "run", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket whose directories are not searchable by all; mkdtemp's 0700
        # would do that. Its key directory, on the contrary, must be private.
        self.root.chmod(0o755)
        (self.root / "munge-run").chmod(0o755)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        (self.root / "slurm.conf").write_text(SLURM_CONF.format(root=self.root))
        (self.root / "gres.conf").write_text(GRES_CONF)
        self.env = {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def _start_munged(self) -> None:
        r = self.root
        self._spawn("munged", [
            "munged", "--foreground", f"--socket={r}/munge-run/munge.socket.2",
            f"--key-file={r}/munge/munge.key", f"--log-file={r}/log/munged.log",
            f"--pid-file={r}/munge-run/munged.pid", f"--seed-file={r}/munge/munged.seed",
        ], netns=False)
        _wait_for(lambda: (r / "munge-run" / "munge.socket.2").exists(), "munged's socket", self)

    def _start_namespace(self) -> None:
        script = (f"ip link set lo up && ip addr add {NAMESPACE_ADDRESS} dev lo"
                  " && echo ready && exec sleep infinity")
        self._holder = subprocess.Popen(["unshare", "-n", "--", "sh", "-c", script],
                                        stdout=subprocess.PIPE, start_new_session=True)
        assert self._holder.stdout is not None
        if self._holder.stdout.readline() != b"ready\n":
            raise RuntimeError("could not set up the Slurm test cluster's network namespace")
        self.prefix = ["nsenter", "-t", str(self._holder.pid), "-n", "--"]

    def _spawn(self, name: str, argv: list[str], netns: bool) -> None:
        out = open(self.root / "log" / f"{name}.out", "wb")  # noqa: SIM115 - the child keeps it
        with out:
            self._daemons[name] = subprocess.Popen(
                [*(self.prefix if netns else []), *argv], env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def _wait_idle(self) -> None:
        def idle() -> bool:
            states = self._sinfo()
            return all(states.get(node) == "idle" for node in NODES)

        _wait_for(idle, "both nodes idle in sinfo", self)

    def _sinfo(self) -> dict[str, str]:
        """node -> state, as sinfo reports it (empty while slurmctld does not answer)."""
        result = subprocess.run([*self.prefix, "sinfo", "-h", "-N", "-o", "%N %t"],
                                env=self.env, capture_output=True, text=True, timeout=10)
        return dict(line.split() for line in result.stdout.splitlines() if line.strip())

    def _namespace_pids(self) -> list[int]:
        """Every process in the holder's network namespace but the holder itself: nsenter
        passes the namespace on to slurmstepd, the jobs and anything a test ran there."""
        assert self._holder is not None
        try:
            ours = os.readlink(f"/proc/{self._holder.pid}/ns/net")
        except OSError:
            return []
        if ours == os.readlink("/proc/self/ns/net"):
            return []  # the holder died before unshare: never kill the host's processes
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != self._holder.pid:
                try:
                    if os.readlink(entry / "ns" / "net") == ours:
                        pids.append(int(entry.name))
                except OSError:
                    continue  # gone meanwhile
        return pids


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_gone(pids: list[int], timeout_s: float = 5) -> None:
    """Wait until they are dead: SIGKILL takes effect asynchronously. A zombie counts as dead
    (our own children are reaped by stop(), orphaned job steps by init)."""
    deadline = time.monotonic() + timeout_s
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(ready: Callable[[], bool], what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        dead = [name for name, p in cluster._daemons.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not after {START_TIMEOUT_S} s"
            raise RuntimeError(f"the Slurm test cluster did not come up ({what}: {why})\n"
                               + cluster.logs())
        time.sleep(0.2)


def main(root: Path) -> None:
    absent = missing_tools()
    if absent:
        sys.exit(f"missing: {' '.join(absent)} (apt-get install slurm-wlm munge iproute2)")
    # SIGTERM (kill, a closed terminal) stops it as Ctrl-C does, so no daemon outlives it.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = SlurmCluster()
    started = time.monotonic()
    cluster.start(root)
    print(f"slurm test cluster up in {time.monotonic() - started:.1f} s; Ctrl-C stops it")
    print(f"export SLURM_CONF={shlex.quote(cluster.env['SLURM_CONF'])}")
    print(f"prefix: {shlex.join(cluster.prefix)}   e.g. {shlex.join(cluster.prefix)} sinfo")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/slurm_cluster.py DIR")
    main(Path(sys.argv[1]).resolve())
