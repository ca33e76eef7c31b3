"""What runs on a Ray node: one attempt of a velda task, inside a Ray worker.

The bridge (ray_bridge.py) registers this module to be pickled by value, so a node needs ray
and the standard library only, no velda install: nothing here may import velda but
proc_tree.py, which the bridge registers by value too.

`run_attempt` is a plain Ray task. It starts the argv in a new session with pipes for stdout
and stderr, in the submitter's cwd (`workdir = "shared"`) or in a fresh copy of it unpacked
from a tarball the bridge put in the object store (`workdir = "upload"`), and records what
happens: a "start" record, the output in chunks, usage samples. A command that ends within
_HOLD_S (most short ones) sends nothing on the way: its whole record comes back as the task's
return value, with the exit status. One that runs on (or writes more than _HOLD_BYTES) opens
a TCP connection to the bridge (`back`: its address and the attempt's token) and streams its
record there as it happens, in frames; the return value then carries the exit status only.
Either way the start is announced at once by a datagram. (A streaming-generator task would
do all this at about half the rate of a plain task.) A small TCP control port lets the
bridge signal the process group (Ray's own `cancel` cannot deliver a chosen signal, and with
`force=False` it does not interrupt a process wait). A `/bin/sh` guard kills the process
group when the worker goes away, even by SIGKILL. A worker keeps its control port and its
guard for all the attempts it runs: started once, they cost a short command nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import tarfile
from collections.abc import Generator, Iterator
from typing import Any

from velda.engines.proc_tree import sample_line, tree_figures

_READ_SIZE = 96 * 1024  # a chunk stays under Ray's 100 KiB inline limit: no object store
_PIPE_SIZE = 1024 * 1024
_LINGER_S = 0.005
_DRAIN_S = 1.0  # how long the pipes may stay open after the command exits
_LEND_WAIT_S = 0.05  # while lending, output is read between waits this long
USAGE_INTERVAL_S = 1.0  # as the server samples local attempts (server/usage.py)
_HOLD_S = 0.01  # an attempt that ends sooner reports everything with its exit
_HOLD_BYTES = 256 * 1024  # ... if it wrote no more than this
FRAME_KINDS = ("start", "stdout", "stderr", "usage")  # on the connection to the bridge
FRAME_HEADER = "!BI"  # struct: kind (index in FRAME_KINDS), payload length


def run_attempt(spec: bytes, archive: bytes | None = None) -> dict[str, Any]:
    """Runs the attempt `spec` (JSON: argv, cwd, env, terminal, gpus, back: one argument, as
    each argument of a Ray task costs its submit a serialization) and returns {"exit":
    status, "items": [(kind, payload), ...] not sent to the bridge, "streamed": whether a
    connection to the bridge was opened}. The record is ("start", info), then
    ("stdout"|"stderr", bytes) chunks with ("usage", line) samples of what it uses among
    them; the exit status carries its CPU totals ("cpu": [user, system] seconds). With a
    terminal [rows, cols], the command runs on a pseudo-terminal of that size: its whole
    session comes as "stdout", and the control port types into it. `gpus`: the task asked
    Ray for GPUs. `back` is [host, TCP port, UDP port, key, token] of the bridge: the start
    is announced at once by a datagram (a hint that spares a short attempt's start the wait
    for its return value; the record carries it too)."""
    import shutil

    attempt = json.loads(spec)
    copy = _unpack(archive) if archive is not None else None
    channel = _Channel(attempt["back"])
    record = _run_in(attempt["argv"], copy or attempt["cwd"], attempt["env"],
                     attempt["terminal"], attempt["gpus"])
    try:
        for kind, payload in record:
            if kind == "exit":
                return channel.close(payload)
            if kind == "hold":
                channel.open()
            else:
                channel.put(kind, payload)
        raise RuntimeError("the attempt ended without an exit status")
    finally:
        record.close()  # its own `finally` ends the attempt's process group
        channel.shut()
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)


class _Channel:
    """Where an attempt's record goes: kept here while the attempt is short, so that it comes
    back with the exit status in the task's return value (no connection at all), else sent
    to the bridge over TCP as it happens."""

    def __init__(self, back: list[Any]) -> None:
        self.back = back
        self.held: list[tuple[str, Any]] = []
        self.held_bytes = 0
        self.sock: socket.socket | None = None
        self.unreachable = False  # the bridge could not be reached: all comes back at the end

    def put(self, kind: str, payload: Any) -> None:
        if kind == "start" and self.sock is None:
            self.announce(payload)
        if self.sock is None:
            self.held.append((kind, payload))
            self.held_bytes += len(payload) if isinstance(payload, bytes) else 0
            if self.held_bytes > _HOLD_BYTES:
                self.open()
            return
        data = (json.dumps(payload).encode() if kind == "start"
                else payload if isinstance(payload, bytes) else str(payload).encode())
        self.sock.sendall(struct.pack(FRAME_HEADER, FRAME_KINDS.index(kind), len(data)) + data)

    def announce(self, start: dict[str, Any]) -> None:
        host, _, port, key, token = self.back
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(json.dumps({"key": key, "token": token, "start": start}).encode(),
                     (host, port))

    def open(self) -> None:
        """From now on the record goes to the bridge at once (what was kept goes first). If
        the bridge cannot be reached, it stays here and comes back with the exit."""
        if self.sock is not None or self.unreachable:
            return
        host, port, _, key, token = self.back
        try:
            sock = socket.create_connection((host, port), timeout=30)
            sock.settimeout(None)  # a slow bridge holds the command back, as a full pipe does
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(json.dumps({"key": key, "token": token}).encode() + b"\n")
        except OSError:
            self.unreachable = True
            return
        self.sock = sock
        held, self.held = self.held, []
        for kind, payload in held:
            self.put(kind, payload)

    def close(self, status: dict[str, Any]) -> dict[str, Any]:
        """The return value: the exit status, and what was not sent."""
        streamed = self.sock is not None
        self.shut()
        return {"exit": status, "items": self.held, "streamed": streamed}

    def shut(self) -> None:
        """Close the connection: its end tells the bridge that it has all that was sent."""
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None


def _run_in(
    argv: list[str], cwd: str, env: dict[str, str], terminal: list[int] | None, gpus: bool
) -> Generator[tuple[str, Any], None, None]:
    """Yields the attempt's record, ("hold", None) once it has run _HOLD_S, and last
    ("exit", status)."""
    import time

    ray: Any = importlib.import_module("ray")
    node_ip, node_id, gcs_address = _node(ray)
    if gpus:
        gpus = bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
    env = _node_env(env, cwd, gcs_address, gpus)
    guard = _guard()  # before the command starts: the worker's own, started once
    master = _Terminal(terminal) if terminal else None
    usage = _Usage()  # before the command starts: what the worker's children used until now
    started_at = time.time()  # by this node's clock; as on a local pool, just before the spawn
    proc, error = _spawn(argv, cwd, env, node_ip, master)
    if proc is None:
        if master is not None:
            master.close()
        yield ("stderr", error[0].encode())
        yield ("exit", _status(error[1]))
        return
    guard = guard.watch(proc.pid)
    control = _Control(proc.pid, node_ip, master)
    try:
        yield ("start", {"node_ip": node_ip, "node_id": node_id, "pid": proc.pid,
                         "control": [node_ip, control.port], "token": control.token,
                         "at": started_at})
        usage.leader = proc.pid
        yield from _pump(proc, _Lender(ray, control), master, usage)
        yield ("exit", {**_status(proc.returncode), "cpu": usage.totals()})
    finally:
        control.close()
        _killpg(proc.pid, signal.SIGKILL)
        guard.forget(proc.pid)  # before the wait: until then, no other group can take its ID
        proc.wait()
        if master is not None:
            master.close()


_NODE: list[tuple[str, str, str]] = []  # this worker's node: IP, ID, GCS address


def _node(ray: Any) -> tuple[str, str, str]:
    if not _NODE:
        context = ray.get_runtime_context()
        _NODE.append((ray.util.get_node_ip_address(), context.get_node_id(),
                      context.gcs_address))
    return _NODE[0]


def _unpack(archive: bytes) -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="velda-upload-")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(path, filter="data")
        else:
            tar.extractall(path)  # Python < 3.11.4 on the node; our own tarball
    return path


def _node_env(env: dict[str, str], cwd: str, gcs_address: str, gpus: bool) -> dict[str, str]:
    # The GPUs Ray gave this task (it sets the variable in the worker for tasks that ask for
    # GPUs), or none at all: without GPUs Ray leaves every GPU of the node visible.
    env = dict(env)
    env["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "") if gpus else ""
    env["PWD"] = cwd
    env.setdefault("RAY_ADDRESS", gcs_address)  # so a task's own ray.init() joins this cluster
    return env


def _spawn(
    argv: list[str], cwd: str, env: dict[str, str], node_ip: str, terminal: _Terminal | None
) -> tuple[subprocess.Popen[bytes] | None, tuple[str, int]]:
    """The started process, or None and (message, exit code) like a shell's (126, 127)."""
    if not os.path.isdir(cwd):
        return None, (f"velda: working directory {cwd} does not exist on node {node_ip}\n", 126)
    if terminal is not None:
        import shutil

        if argv and shutil.which(argv[0], path=env.get("PATH", os.defpath)) is None:
            return None, _cannot_run(argv[0], node_ip, _missing(argv[0]))
    # Ray workers block SIGINT; a child inherits the mask, so it would never see a Ctrl-C.
    mask = signal.pthread_sigmask(signal.SIG_SETMASK, set())
    try:
        if terminal is None:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, start_new_session=True,
            )
        else:
            proc = terminal.start(argv, cwd, env)
    except (OSError, ValueError, IndexError) as e:
        return None, _cannot_run(argv[0] if argv else "", node_ip, e)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    return proc, ("", 0)


def _missing(command: str) -> OSError:
    if "/" in command and os.path.exists(command):
        return PermissionError(command)
    return FileNotFoundError(command)


# Makes the command's own session with the terminal on fd 0 as its controlling terminal, then
# becomes the command: a Popen of a thread-holding Ray worker cannot run code in the child.
_ON_TERMINAL = ("import fcntl, os, sys, termios; os.setsid(); "
                "fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execvp(sys.argv[1], sys.argv[1:])")


class _Terminal:
    """A pseudo-terminal for one attempt: the command gets its slave side as stdin, stdout and
    stderr; this worker reads the session from the master side and types into it."""

    def __init__(self, size: list[int]) -> None:
        import struct
        import termios
        import threading

        self.master, self.slave = os.openpty()
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", *size[:2], 0, 0))
        os.set_blocking(self.master, False)
        self.lock = threading.Lock()

    def start(self, argv: list[str], cwd: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        import sys

        try:
            return subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _ON_TERMINAL, *argv], cwd=cwd, env=env,
                stdin=self.slave, stdout=self.slave, stderr=self.slave,
            )
        finally:
            os.close(self.slave)
            self.slave = -1

    def type(self, data: bytes, size: list[int] | None) -> None:
        """Typed input (the lock keeps requests in order), then the new size. Input that a
        command does not read for 2 s is dropped: the control port must stay free."""
        import struct
        import termios
        import time

        with self.lock:
            view, deadline = memoryview(data), time.monotonic() + 2
            while view and time.monotonic() < deadline:
                try:
                    view = view[os.write(self.master, view):]
                except BlockingIOError:
                    time.sleep(0.01)
            if size:
                fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                            struct.pack("HHHH", *size[:2], 0, 0))

    def close(self) -> None:
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _cannot_run(command: str, node_ip: str, e: Exception) -> tuple[str, int]:
    """The local engine's words and a shell's codes for a command that cannot start."""
    if isinstance(e, PermissionError):
        return f"velda: permission denied: {command} is not executable (node {node_ip})\n", 126
    why = "command not found" if isinstance(e, FileNotFoundError) else (
        e.strerror if isinstance(e, OSError) else str(e))
    return f"velda: cannot run '{command}' on node {node_ip}: {why}\n", 127


def _status(returncode: int) -> dict[str, Any]:
    if returncode < 0:
        return {"code": None, "signal": -returncode, "reason": "signal"}
    return {"code": returncode, "signal": None, "reason": "exit" if returncode else None}


def _pump(
    proc: subprocess.Popen[bytes], lender: _Lender, terminal: _Terminal | None, usage: _Usage
) -> Iterator[tuple[str, bytes | str | None]]:
    """The process's output in order per stream, until both pipes (or its terminal) close,
    with a usage sample (a line of text) now and then, and ("hold", None) once it has run
    _HOLD_S."""
    import time

    output = _Output(proc, terminal)
    deadline = None
    hold_until: float | None = time.monotonic() + _HOLD_S
    usage.next_at = time.monotonic() + _HOLD_S  # none for a command that ends within the hold
    while output.open():
        wait_s = 0.0 if lender.wait() else None
        if hold_until is not None:
            wait_s = max(0.0, hold_until - time.monotonic()) if wait_s is None else wait_s
        chunks, idle = output.read(wait_s)
        yield from chunks
        if hold_until is not None and time.monotonic() >= hold_until:
            hold_until = None
            yield ("hold", None)
        sample = usage.sample_if_due()
        if sample is not None:
            yield ("usage", sample)
        if idle:
            deadline = _drain_deadline(proc, deadline)
            if deadline is not None and time.monotonic() > deadline + _DRAIN_S:
                break  # something outside the group holds a pipe: stop waiting for it
    yield from output.flush()
    proc.wait()


class _Output:
    """The command's two pipes, read into chunks of up to _READ_SIZE. A chunk goes out once
    full, at the end of its pipe, or _LINGER_S after its first byte: each chunk costs a frame
    to the bridge and a write there, and a writer's small writes would otherwise each make
    one."""

    def __init__(self, proc: subprocess.Popen[bytes], terminal: _Terminal | None) -> None:
        import selectors

        self.pipes = selectors.DefaultSelector()
        if terminal is not None:  # the whole session, as stdout
            self.pipes.register(terminal.master, selectors.EVENT_READ, "stdout")
        for name, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr)):
            if pipe is None:
                continue
            with contextlib.suppress(OSError):  # larger reads, fewer chunks
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            self.pipes.register(pipe, selectors.EVENT_READ, name)
        self.buffers = {"stdout": bytearray(), "stderr": bytearray()}
        self.flush_at: float | None = None

    def open(self) -> bool:
        return bool(self.pipes.get_map())

    def read(self, wait_s: float | None = None) -> tuple[list[tuple[str, bytes]], bool]:
        """Chunks ready to go out, and whether nothing came for a while (at most wait_s)."""
        import time

        now = time.monotonic()
        timeout = 0.2 if self.flush_at is None else max(0.0, self.flush_at - now)
        if wait_s is not None:
            timeout = min(timeout, wait_s)
        ready = self.pipes.select(timeout)
        chunks = [chunk for key, _ in ready for chunk in self._read_one(key)]
        now = time.monotonic()
        if self.flush_at is not None and now >= self.flush_at:
            chunks += self.flush()
        elif self.flush_at is None and any(self.buffers.values()):
            self.flush_at = now + _LINGER_S
        return chunks, not ready

    def _read_one(self, key: Any) -> list[tuple[str, bytes]]:
        buffer = self.buffers[key.data]
        try:
            data = os.read(key.fd, _READ_SIZE - len(buffer))
        except BlockingIOError:
            return []
        except OSError:  # EIO: a terminal that no process holds any more
            data = b""
        buffer += data
        if not data:
            self.pipes.unregister(key.fileobj)
            if not isinstance(key.fileobj, int):
                key.fileobj.close()  # a terminal's master is closed with the attempt
        if (data and len(buffer) < _READ_SIZE) or not buffer:
            return []
        chunk = bytes(buffer)
        buffer.clear()
        return [(key.data, chunk)]

    def flush(self) -> list[tuple[str, bytes]]:
        self.flush_at = None
        chunks = [(name, bytes(b)) for name, b in self.buffers.items() if b]
        for buffer in self.buffers.values():
            buffer.clear()
        return chunks


class _Usage:
    """What the attempt uses, measured on its node as the server measures a local attempt
    (proc_tree.py): a sample of its process tree every USAGE_INTERVAL_S, the first once it
    has run _HOLD_S, and its exact CPU totals at the end from what this worker's children
    used meanwhile (a worker runs one attempt at a time; its command is the only child it
    reaps)."""

    def __init__(self) -> None:
        import resource

        self.leader: int | None = None  # the command, once started
        self.spent = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.next_at = 0.0  # _pump sets the first

    def sample_if_due(self) -> str | None:
        """A line of the attempt's `usage` file, when one is due."""
        import time

        now = time.monotonic()
        if self.leader is None or now < self.next_at:
            return None
        self.next_at = now + USAGE_INTERVAL_S
        figures = tree_figures(self.leader)
        return None if figures is None else sample_line(time.time(), figures)

    def totals(self) -> list[float]:
        """The CPU seconds (user, system) its command and all it reaped used."""
        import resource

        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        return [now.ru_utime - self.spent.ru_utime, now.ru_stime - self.spent.ru_stime]


def _drain_deadline(proc: subprocess.Popen[bytes], deadline: float | None) -> float | None:
    """Once the command has exited, processes it left behind holding the pipes get _DRAIN_S
    before the group is killed: the attempt ends with its command."""
    import time

    if proc.poll() is None:
        return None
    now = time.monotonic()
    if deadline is None:
        return now + _DRAIN_S
    if now >= deadline:
        _killpg(proc.pid, signal.SIGKILL)
    return deadline


def _killpg(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


class _Lender:
    """Lends the attempt's CPUs while the server says its command is blocked in a `vrun`, so
    that the children it waits for can run (SPEC §5). Ray gives back a task's CPUs (not its
    GPUs) while the task's main thread waits in `ray.wait`, and takes them again when the
    wait ends; a reference that never resolves makes a wait that only ends by its timeout."""

    def __init__(self, ray: Any, control: _Control) -> None:
        self.ray = ray
        self.control = control
        self.never: Any = None

    def wait(self) -> bool:
        """Wait _LEND_WAIT_S lending the CPUs, if asked to; False (at once) if not."""
        if not self.control.lending.is_set():
            return False
        if self.never is None:
            self.never = self.ray.ObjectRef.from_random()
        self.ray.wait([self.never], timeout=_LEND_WAIT_S)
        return True


class _Control:
    """What the bridge may do to one attempt through its worker's control port: signal its
    process group, say when to lend its CPUs, type into its terminal."""

    def __init__(self, pgid: int, host: str, terminal: _Terminal | None = None) -> None:
        import secrets
        import threading

        self.pgid = pgid
        self.terminal = terminal
        self.token = secrets.token_hex(16)
        self.lending = threading.Event()
        self.timers: list[threading.Timer] = []
        self.port_server = _port(host)
        self.port = self.port_server.port
        self.port_server.attempts[self.token] = self

    def act(self, request: dict[str, Any]) -> None:
        import threading

        if request["op"] == "signal":
            _killpg(self.pgid, int(request["signum"]))
        elif request["op"] == "lend":
            (self.lending.set if request["on"] else self.lending.clear)()
        elif request["op"] == "terminal" and self.terminal is not None:
            import base64

            self.terminal.type(base64.b64decode(request["data"]), request["size"])
        elif request["op"] == "cancel":
            _killpg(self.pgid, signal.SIGCONT)
            _killpg(self.pgid, signal.SIGTERM)
            timer = threading.Timer(float(request["grace_s"]), _killpg,
                                    (self.pgid, signal.SIGKILL))
            timer.daemon = True
            timer.start()
            self.timers.append(timer)

    def close(self) -> None:
        self.port_server.attempts.pop(self.token, None)
        for timer in self.timers:
            timer.cancel()


class _ControlPort:
    """A TCP port on the node, one per worker for all the attempts it runs (a port and a
    thread per attempt cost more than a short command): a request names its attempt by the
    attempt's token."""

    def __init__(self, host: str) -> None:
        import threading

        self.sock = socket.create_server((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.attempts: dict[str, _Control] = {}  # by token
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        import hmac

        conn.settimeout(5)
        try:
            request = json.loads(conn.makefile("rb").readline())
            token = str(request.get("token"))
            for known, control in list(self.attempts.items()):
                if hmac.compare_digest(token, known):
                    control.act(request)
                    conn.sendall(b"ok\n")
                    return
        except (OSError, ValueError, KeyError, TypeError):
            return


_PORTS: dict[str, _ControlPort] = {}  # this worker's control port, by host


def _port(host: str) -> _ControlPort:
    if host not in _PORTS:
        _PORTS[host] = _ControlPort(host)
    return _PORTS[host]


class _GroupGuard:
    """A /bin/sh that kills the process groups it was given once this worker closes the pipe
    it reads, or dies: a Ray worker killed with its node or its owner must not leave a
    command running. One per worker, for all the attempts it runs (a shell per attempt costs
    more than a short command): "+ID" adds a group, "-ID" forgets one that ended. It is a
    grandchild, not a child: a dying Ray worker kills its own children (the command's leader
    among them), which would take the guard along and leave the rest of the group running."""

    _SCRIPT = (
        'exec 3<&0; ('
        'groups=" "; while read -r line <&3; do case $line in'
        ' +*) groups="$groups${line#+} " ;;'
        ' -*) g=${line#-}; case $groups in *" $g "*)'
        ' groups="${groups%%" $g "*} ${groups#*" $g "}" ;; esac ;;'
        ' esac; done; for g in $groups; do kill -9 -"$g"; done'
        ') >/dev/null 2>&1 &'
    )

    def __init__(self) -> None:
        read_end, self.write_end = os.pipe()
        starter = subprocess.Popen(
            ["/bin/sh", "-c", self._SCRIPT], stdin=read_end, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )
        os.close(read_end)
        starter.wait()  # once it returns, the guard runs apart from this worker

    def watch(self, pgid: int) -> _GroupGuard:
        """Guard this group; the guard that does it (a new one if this one is gone)."""
        if self._say(b"+%d\n" % pgid):
            return self
        _GUARDS.clear()
        return _guard().watch(pgid)

    def forget(self, pgid: int) -> None:
        """The group is killed: its ID may go to another group once its leader is reaped."""
        self._say(b"-%d\n" % pgid)

    def _say(self, line: bytes) -> bool:
        try:
            os.write(self.write_end, line)
        except OSError:  # EPIPE: someone killed the guard
            return False
        return True


_GUARDS: list[_GroupGuard] = []  # this worker's guard


def _guard() -> _GroupGuard:
    if not _GUARDS:
        _GUARDS.append(_GroupGuard())
    return _GUARDS[0]
