"""The bridge: the Ray driver of one pool, a child process of the velda server.

`RayEngine` (ray.py) starts it with `python -c "...bridge_main()" ADDRESS HEAD_TIMEOUT` and
talks to it through JSON lines: commands on its stdin (`start`, `signal`, `cancel`), events on
its stdout (`ready`, `fatal`, `running`, `exited`). The server never imports Ray: a driver calls
`_exit` on its own process when the head has been gone for a while, can hang in `ray.init`,
and costs ~100 MB.

The bridge submits every attempt as one plain Ray task (`ray_node.run_attempt`) with the
pool's `num_cpus`/`num_gpus`/`memory`/custom resources (`max_retries=0`: velda retries
itself, and a re-executed attempt would duplicate output). An attempt that runs on past a few
milliseconds connects back to the bridge's TCP port and streams its record (start, output,
usage) in frames; a shorter one returns its whole record with its exit status (ray_node.py).
The bridge appends the output to the attempt's log files (each opened with its first byte),
so output bytes never pass through the server, and keeps the attempt's state (bridge, node,
control port, exit) in `ray.json` in the attempt directory: written with the submit, before
the bridge does anything else (so a next server waits for this bridge rather than starting
the attempt again), when the command starts, and when it ends. A watchdog fails every
attempt when the head stops answering.

Short commands come by the hundred per second, and on this path every system call and every
hop between threads shows: the starts of a scheduling pass come in one write; a submit
happens on the loop (under a millisecond; only packing a directory to upload goes to a
thread) and its return value comes back by a callback, the returns that came together waking
the loop once; events of one turn of the loop go out in one write, and word that an attempt
runs waits a few milliseconds for its exit, so that the server writes both in one
transaction; one watcher pings the nodes of all running attempts; `ray.json` is one
descriptor written over in place; a short attempt costs one Ray task and no connection, and
no asyncio task of its own.

When the server stops or dies, the bridge sees the end of its stdin: it cancels what Ray has
not started yet and lets the running attempts finish, still writing their logs and
`ray.json`, then exits. The next server adopts them from `ray.json` (see RayEngine.adopt).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hmac
import importlib
import io
import json
import logging
import os
import signal
import struct
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from velda import logindex
from velda.engines import proc_tree, ray_node
from velda.engines.pids import start_time
from velda.engines.ray import ADOPT_POLL_S, Control, control_request, probe
from velda.models import Reason

_LINE_LIMIT = 64 * 1024 * 1024  # one start command carries the task's whole environment
_UPLOAD_LIMIT = 512 * 1024 * 1024  # Ray's own limit for a working_dir
_UPLOAD_SKIP = frozenset({".git", "__pycache__"})
_PING_S = 5.0  # how often a running attempt's node is asked whether it is still there
_PINGS_AT_ONCE = 64  # connections open at once for that (thousands may run)
_HEADER_SIZE = struct.calcsize(ray_node.FRAME_HEADER)
_CHANNEL_END_S = 10.0  # how long the rest of a streamed record may take after the exit
_HOLD_EVENTS_S = 0.003  # how long word that an attempt runs may wait for other events

log = logging.getLogger("velda.engines.ray_bridge")

@dataclass
class _Run:
    key: str
    state_path: str
    log_paths: dict[str, str]  # by stream
    state: dict[str, Any]
    token: str  # what its node shows when it connects
    ref: Any = None  # the Ray task's ObjectRef, once submitted
    done: bool = False  # its exit is known
    channel: asyncio.Task[None] | None = None  # reading what its node streams, if it does
    channel_end: asyncio.Future[None] | None = None  # done once all it streamed is written
    control: Control | None = None  # once running
    answered: float = 0.0  # when its control port last answered (by the loop's clock)
    cancel_grace: float | None = None
    lending: bool = False  # its command waits in a vrun: its CPUs go to the children
    orphaned: bool = False  # cancelled because the server went away before it started
    logs: dict[str, IO[bytes]] = field(default_factory=dict)  # opened at their first byte
    index_fd: int = -1  # the attempt's chunk index (velda/logindex.py), once open
    state_fd: int = -1  # ray.json, once written
    saved: int = 0  # the length of what save() last wrote there
    # typed input goes to the node one request after the other, in the order it came
    typing: asyncio.Lock = field(default_factory=asyncio.Lock)

    def streamed(self) -> asyncio.Future[None]:
        if self.channel_end is None:
            self.channel_end = asyncio.get_running_loop().create_future()
        return self.channel_end

    def append(self, stream: str, payload: bytes) -> None:
        """Bytes to a log file, and to the index when they landed, so that the combined view
        orders them as the task wrote them."""
        log = self.log(stream)
        log.write(payload)
        if self.index_fd >= 0:
            logindex.record(self.index_fd, stream, log.tell(), time.time())

    def log(self, stream: str) -> IO[bytes]:
        """The stream's log file, opened (with the index) when the first bytes come: most
        short commands write nothing, and each open costs more than their whole run."""
        if stream not in self.logs:
            path = self.log_paths[stream]
            if not self.logs:
                with contextlib.suppress(OSError):
                    self.index_fd = logindex.open_index(Path(path).parent)
            self.logs[stream] = _open_log(path)
        return self.logs[stream]

    def sampled(self, line: str) -> None:
        """A usage sample from the node, appended to the attempt's `usage` file as
        server/usage.py reads it for a local attempt (its CPU totals come with its exit)."""
        path = Path(self.state_path).parent / proc_tree.SAMPLES
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_APPEND, 0o600)
            try:
                os.write(fd, line.encode())
            finally:
                os.close(fd)

    def close_files(self) -> None:
        """Close what is open; a later save() (a cluster lost meanwhile) opens ray.json
        again, never a number the system has given to another file since."""
        for log in self.logs.values():
            log.close()
        self.logs.clear()
        for fd in (self.index_fd, self.state_fd):
            if fd >= 0:
                os.close(fd)
        self.index_fd = self.state_fd = -1

    def save(self) -> None:
        """ray.json, written over in place. Keys are added, not changed (but for an exit
        written again when the cluster is lost, after which the file is cut to its new
        length), so a reader that catches a write halfway sees the old text or text that is
        not JSON, and reads again. Not synced: it must outlive the server and the bridge,
        not the machine."""
        with contextlib.suppress(OSError):
            if self.state_fd < 0:
                flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                self.state_fd = os.open(self.state_path, flags, 0o600)
            data = json.dumps(self.state).encode()
            os.pwrite(self.state_fd, data, 0)
            if len(data) < self.saved:  # an exit written again, shorter: no old tail left
                os.ftruncate(self.state_fd, len(data))
            self.saved = len(data)


def bridge_main() -> None:
    """Entry point of the bridge process: `python -c ... ADDRESS HEAD_TIMEOUT NODE_TIMEOUT`."""
    address, head_timeout, node_timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    events = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever Ray prints must not mix with the events
    try:
        ray: Any = importlib.import_module("ray")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 namespace="velda")
    except BaseException as e:  # noqa: B036 - any failure to connect is reported, then exit
        _emit(events, {"ev": "fatal", "message": _one_line(e)})
        os._exit(1)
    # Not asyncio.run: its teardown waits for threads stuck in Ray calls.
    loop = asyncio.new_event_loop()
    os._exit(loop.run_until_complete(Bridge(ray, events, head_timeout, node_timeout).serve()))


def _emit(out: IO[bytes], event: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # the server may be gone; ray.json still tells
        out.write(json.dumps(event).encode() + b"\n")
        out.flush()


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None)  # a RayTaskError's first line names only the task
    if isinstance(cause, BaseException) and cause is not e:
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Bridge:
    """The Ray driver of one pool: runs attempts, relays signals, writes logs and ray.json."""

    def __init__(self, ray: Any, events: IO[bytes], head_timeout_s: float,
                 node_timeout_s: float) -> None:
        self.ray = ray
        self.events = events
        self.head_timeout_s = head_timeout_s
        self.node_timeout_s = node_timeout_s
        self.runs: dict[str, _Run] = {}
        self.pending: list[bytes] = []  # event lines not written yet
        self.flushing: asyncio.Handle | None = None  # their write, once it is planned
        self.returns: list[tuple[_Run, concurrent.futures.Future[Any]]] = []  # from Ray threads
        self.returns_lock = threading.Lock()
        self.secret = os.urandom(32)  # the attempts' tokens are made with it
        self.tasks: set[asyncio.Task[None]] = set()
        self.orphaned = False  # the server went away
        self.me = {"pid": os.getpid(), "start": start_time(os.getpid())}
        ray.cloudpickle.register_pickle_by_value(ray_node)
        ray.cloudpickle.register_pickle_by_value(proc_tree)  # ray_node's sampling
        self.remote = ray.remote(ray_node.run_attempt)
        self.remotes: dict[str, Any] = {}  # by options: setting them costs more than a submit
        self.back: list[Any] = []  # [host, TCP port, UDP port] where nodes send records

    async def serve(self) -> int:
        self.loop = asyncio.get_running_loop()
        host = self.ray.util.get_node_ip_address()
        listener = await asyncio.start_server(self._channel, host, 0, limit=_LINE_LIMIT)
        announcements, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Announcements(self), local_addr=(host, 0))
        self.back = [host, listener.sockets[0].getsockname()[1],
                     announcements.get_extra_info("sockname")[1]]
        commands = asyncio.create_task(self._read_commands())
        watchdog = asyncio.create_task(self._watch_head())
        nodes = asyncio.create_task(self._watch_nodes())
        _emit(self.events, {"ev": "ready"})
        await asyncio.wait({commands, watchdog}, return_when=asyncio.FIRST_COMPLETED)
        if not watchdog.done():
            await self._drain(watchdog)  # the server went away
        nodes.cancel()
        if watchdog.done():
            await self._abandon(watchdog.result())
            return 1
        self._flush_events()
        return 0

    async def _read_commands(self) -> None:
        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            command = json.loads(line)
            if command["op"] == "start":
                self._start(command)
            else:
                self._background(self._command(command))

    async def _command(self, command: dict[str, Any]) -> None:
        op = command["op"]
        run = self.runs.get(command["key"])
        if run is None:
            return
        if op == "signal":
            await self._signal(run, int(command["signum"]))
        elif op == "cancel":
            await self._cancel(run, float(command["grace_s"]))
        elif op == "lend":
            await self._lend(run, bool(command["on"]))
        elif op == "terminal":
            await self._type(run, command)

    async def _watch_head(self) -> str:
        """Returns why the cluster is lost once its head has not answered for a while."""
        address = self.ray.get_runtime_context().gcs_address
        loop = asyncio.get_running_loop()
        failing_since = None
        while True:
            await asyncio.sleep(1)
            error = await asyncio.to_thread(probe, address)
            if error is None:
                failing_since = None
                continue
            failing_since = failing_since or loop.time()
            if loop.time() - failing_since >= self.head_timeout_s:
                return f"the head at {address} stopped answering ({error})"

    async def _drain(self, watchdog: asyncio.Task[str]) -> None:
        """Without a server: drop what has not started, finish what runs."""
        self.orphaned = True
        for run in list(self.runs.values()):
            if run.control is None:
                run.orphaned = True
                await self._cancel(run, 0)
        while self.runs and not watchdog.done():
            await asyncio.wait([watchdog], timeout=ADOPT_POLL_S)

    async def _abandon(self, message: str) -> None:
        """The cluster is lost: kill what still runs, and say so."""
        self._flush_events()
        _emit(self.events, {"ev": "fatal", "message": message})
        runs = list(self.runs.values())
        for run in runs:  # lost: an end their nodes report while they are killed is not said
            run.done = True
        kills = [control_request(r.control, {"op": "cancel", "grace_s": 0})
                 for r in runs if r.control]
        if kills:
            await asyncio.wait([asyncio.ensure_future(k) for k in kills], timeout=3)
        for run in runs:
            if self.orphaned:  # else the engine says it
                run.append("stderr", f"velda: ray cluster: {message}; this attempt was lost\n"
                           .encode())
            run.state["exit"] = {"code": None, "signal": None, "reason": Reason.LOST.value}
            run.save()

    # --- one attempt

    def _start(self, command: dict[str, Any]) -> None:
        """Submits the attempt. Its task's return value comes back through `_returned`; a
        directory to upload is packed in a thread first."""
        key = command["key"]
        logs = {"stdout": command["stdout"], "stderr": command["stderr"]}
        run = _Run(key, command["state"], logs, {"bridge": self.me}, token=self._token(key))
        self.runs[key] = run
        run.save()  # before the loop turns: a next server must see that this bridge has it
        if command["upload"]:
            self._background(self._submit_uploaded(run, command))
            return
        try:
            self._submitted(run, self._submit(run, command))
        except Exception as e:
            self._finish(run, self._failure(run, e))

    def _token(self, key: str) -> str:
        """What the attempt's node shows to stream its record: not guessable without this
        bridge's secret, and cheaper than fresh random bytes for each attempt."""
        return hmac.digest(self.secret, key.encode(), "sha256")[:16].hex()

    async def _submit_uploaded(self, run: _Run, command: dict[str, Any]) -> None:
        try:
            ref = await asyncio.to_thread(self._submit, run, command)
        except Exception as e:
            self._finish(run, self._failure(run, e))
            return
        self._submitted(run, ref)
        if run.cancel_grace is not None:  # cancelled while packing
            await self._cancel(run, run.cancel_grace)

    def _submitted(self, run: _Run, ref: Any) -> None:
        run.ref = ref
        ref.future().add_done_callback(functools.partial(self._returned, run))

    def _returned(self, run: _Run, future: concurrent.futures.Future[Any]) -> None:
        """In a Ray thread: the attempt's task returned. Returns that come together wake
        the loop once."""
        with self.returns_lock:
            self.returns.append((run, future))
            if len(self.returns) > 1:
                return
        self.loop.call_soon_threadsafe(self._take_returns)

    def _take_returns(self) -> None:
        with self.returns_lock:
            returns, self.returns = self.returns, []
        for run, future in returns:
            if not run.done:
                self._take_return(run, future)

    def _take_return(self, run: _Run, future: concurrent.futures.Future[Any]) -> None:
        """The attempt's exit from its task's return value; what its node streamed is all
        written first, if it streamed."""
        try:
            result = future.result()
        except Exception as e:
            exit = functools.partial(self._failure, run, e)
            streamed = run.channel is not None  # what it sent before it failed
        else:
            exit = functools.partial(self._record, run, result)
            streamed = result["streamed"]
        if streamed:
            self._background(self._finish_streamed(run, exit))
        else:
            self._finish(run, exit())

    async def _finish_streamed(self, run: _Run, exit: Callable[[], dict[str, Any]]) -> None:
        """Once what the node streamed is all written: its connection closes before its task
        returns, but may be accepted and read here after the return value came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(run.streamed()), _CHANNEL_END_S)
        self._finish(run, exit())

    def _record(self, run: _Run, result: dict[str, Any]) -> dict[str, Any]:
        """What came back with the return value, written; the exit status."""
        for kind, payload in result["items"]:
            self._chunk(run, kind, payload)
        exit: dict[str, Any] = result["exit"]
        return exit

    def _finish(self, run: _Run, exit: dict[str, Any]) -> None:
        """The attempt ended (said once): its exit to ray.json, then to the server."""
        if run.done:
            return
        run.done = True
        run.state["exit"] = exit
        run.save()
        del self.runs[run.key]
        if run.channel is not None:  # a node that stopped answering mid-stream
            run.channel.cancel()
        run.close_files()
        self._event({"ev": "exited", "key": run.key, "exit": exit})

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _event(self, event: dict[str, Any], hold: bool = False) -> None:
        """Events of one turn of the loop go out in one write. A `hold` event (an attempt
        runs) may wait _HOLD_EVENTS_S for company: a short attempt's exit then goes with
        it, and the server writes both in one transaction. The start time it carries is
        the node's, so the wait does not show in it."""
        self.pending.append(json.dumps(event).encode() + b"\n")
        if self.flushing is None:
            self.flushing = (self.loop.call_later(_HOLD_EVENTS_S, self._flush_events) if hold
                             else self.loop.call_soon(self._flush_events))
        elif not hold and isinstance(self.flushing, asyncio.TimerHandle):
            self.flushing.cancel()
            self.flushing = self.loop.call_soon(self._flush_events)

    def _flush_events(self) -> None:
        if self.flushing is not None:
            self.flushing.cancel()
            self.flushing = None
        lines, self.pending = self.pending, []
        with contextlib.suppress(OSError):  # the server may be gone; ray.json still tells
            self.events.write(b"".join(lines))
            self.events.flush()

    async def _watch_nodes(self) -> None:
        """Fails an attempt whose control port has not answered for node_timeout_s. Ray
        notices a dead worker or raylet at once, but a node that vanished without closing
        its connections only after its health checks fail (5 x (10 s + 3 s) by default).
        One watcher asks after all running attempts, _PINGS_AT_ONCE at a time: a task for
        each would cost a short attempt more than its run."""
        every = min(_PING_S, self.node_timeout_s / 3)
        at_once = asyncio.Semaphore(_PINGS_AT_ONCE)
        while True:
            await asyncio.sleep(every)
            asked = [(run, run.control) for run in self.runs.values() if run.control]
            answers = await asyncio.gather(*(_ping(control, at_once) for _, control in asked))
            now = self.loop.time()
            silent = []
            for (run, _), answered in zip(asked, answers, strict=True):
                if answered:
                    run.answered = now
                elif now - run.answered >= self.node_timeout_s:
                    silent.append(run)
            await asyncio.gather(*(self._lose(run) for run in silent))

    async def _lose(self, run: _Run) -> None:
        with contextlib.suppress(Exception):  # the node may be gone with the worker
            await asyncio.to_thread(self.ray.cancel, run.ref, force=True)
        if run.done:  # it returned meanwhile
            return
        node = run.state["node"]["node_ip"]
        self._finish(run, self._note(run, f"node {node} stopped answering for "
                                     f"{self.node_timeout_s:g} s; the attempt is lost",
                                     Reason.LOST))

    async def _channel(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        """One attempt's record as its node streams it: a line naming the attempt, then
        frames (ray_node.FRAME_HEADER) until the node closes the connection."""
        with contextlib.closing(writer):
            try:
                hello = json.loads(await reader.readline())
                run = self.runs.get(str(hello["key"]))
                if run is None or not hmac.compare_digest(str(hello["token"]), run.token):
                    return
            except (OSError, ValueError, KeyError, TypeError):
                return
            run.channel = asyncio.current_task()
            try:  # cancelled: the attempt ended without the rest (its node went silent)
                with contextlib.suppress(OSError, asyncio.IncompleteReadError,
                                         asyncio.CancelledError):
                    while frame := await _read_frame(reader):
                        self._frame(run, *frame)
            finally:
                if not run.streamed().done():
                    run.streamed().set_result(None)

    def _frame(self, run: _Run, kind: str, payload: bytes) -> None:
        if kind == "start":
            self._chunk(run, kind, json.loads(payload))
        elif kind == "usage":
            self._chunk(run, kind, payload.decode())
        else:
            self._chunk(run, kind, payload)

    def _submit(self, run: _Run, command: dict[str, Any]) -> Any:
        options = command["options"]
        spec = json.dumps({
            "argv": command["argv"], "cwd": command["cwd"], "env": command["env"],
            "terminal": command.get("terminal"), "gpus": bool(options.get("num_gpus")),
            "back": [*self.back, run.key, run.token],
        }).encode()
        if command["upload"]:
            return self._remote(options).remote(spec, self.ray.put(pack_directory(command["cwd"])))
        return self._remote(options).remote(spec)

    def _remote(self, options: dict[str, Any]) -> Any:
        key = json.dumps(options, sort_keys=True)
        if key not in self.remotes:
            self.remotes[key] = self.remote.options(**options, max_retries=0)
        return self.remotes[key]

    def announced(self, message: dict[str, Any]) -> None:
        """A node's datagram: this attempt's command has started."""
        run = self.runs.get(str(message["key"]))
        if run is not None and hmac.compare_digest(str(message["token"]), run.token):
            self._started(run, message["start"])

    def _chunk(self, run: _Run, kind: str, payload: Any) -> None:
        if kind in ("stdout", "stderr"):
            run.append(kind, payload)
        elif kind == "start":
            self._started(run, payload)
        elif kind == "usage":  # what it uses, where the server reads it
            run.sampled(payload)

    def _started(self, run: _Run, start: dict[str, Any]) -> None:
        """The attempt's command runs (said once: by a datagram, its record, or both)."""
        if run.control is not None:
            return
        host, port = start["control"]
        token = start.pop("token")
        run.control = (host, port, token)
        run.answered = self.loop.time()
        run.state.update(node=start, control=[host, port], token=token)
        run.save()
        self._event({"ev": "running", "key": run.key, "node": start}, hold=True)
        if run.cancel_grace is not None or run.lending:
            self._background(self._asked_before_start(run))

    async def _asked_before_start(self, run: _Run) -> None:
        if run.done:  # its whole record came with its exit
            return
        if run.cancel_grace is not None:
            await self._cancel(run, run.cancel_grace)
        else:
            await self._lend(run, True)

    def _failure(self, run: _Run, e: Exception) -> dict[str, Any]:
        exceptions = self.ray.exceptions
        if run.cancel_grace is not None or isinstance(e, exceptions.TaskCancelledError):
            if run.control is None:
                return {"code": None, "signal": None, "reason": Reason.CANCELLED.value,
                        "unstarted": run.orphaned}
            return {"code": None, "signal": signal.SIGKILL, "reason": Reason.SIGNAL.value}
        if isinstance(e, exceptions.RuntimeEnvSetupError | exceptions.RayTaskError):
            return self._note(run, f"could not run it: {_one_line(e)}", Reason.ENGINE_ERROR)
        if isinstance(e, exceptions.RayError):
            return self._note(run, f"lost the worker running it: {_one_line(e)}", Reason.LOST)
        return self._note(run, f"could not submit it: {_one_line(e)}", Reason.ENGINE_ERROR)

    def _note(self, run: _Run, text: str, reason: Reason) -> dict[str, Any]:
        run.append("stderr", f"velda: ray {text}\n".encode())
        return {"code": None, "signal": None, "reason": reason.value}

    async def _signal(self, run: _Run, signum: int) -> None:
        message = {"op": "signal", "signum": signum}
        if run.control is None or not await control_request(run.control, message):
            log.warning("cannot signal %s: it is not running", run.key)

    async def _type(self, run: _Run, command: dict[str, Any]) -> None:
        message = {"op": "terminal", "data": command["data"], "size": command["size"]}
        async with run.typing:
            if run.control is None or not await control_request(run.control, message):
                log.warning("cannot type into %s: it is not running", run.key)

    async def _lend(self, run: _Run, on: bool) -> None:
        run.lending = on
        if run.control is not None:  # else once it starts
            await control_request(run.control, {"op": "lend", "on": on})

    async def _cancel(self, run: _Run, grace_s: float) -> None:
        run.cancel_grace = grace_s
        if run.ref is None:
            return  # _submit_uploaded cancels once submitted
        if run.control is not None:
            if await control_request(run.control, {"op": "cancel", "grace_s": grace_s}):
                return
            await asyncio.to_thread(self.ray.cancel, run.ref, force=True)
            return
        # Not running yet: drops it from Ray's queue (or interrupts it if it just started;
        # the node side then kills the process group).
        await asyncio.to_thread(self.ray.cancel, run.ref)


class _Announcements(asyncio.DatagramProtocol):
    """Where nodes announce that an attempt's command started (ray_node.py)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def datagram_received(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.bridge.announced(json.loads(data))


async def _ping(control: Control, at_once: asyncio.Semaphore) -> bool:
    async with at_once:
        return await control_request(control, {"op": "ping"})


async def _read_frame(reader: asyncio.StreamReader) -> tuple[str, bytes] | None:
    """The next (kind, payload) of a node's record; None at its end."""
    try:
        header = await reader.readexactly(_HEADER_SIZE)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise
        return None
    kind, size = struct.unpack(ray_node.FRAME_HEADER, header)
    return ray_node.FRAME_KINDS[kind], await reader.readexactly(size)


def pack_directory(path: str) -> bytes:
    """A gzipped tarball of the directory (modes kept, so scripts stay executable)."""
    total = 0

    def add(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        nonlocal total
        if Path(info.name).name in _UPLOAD_SKIP:
            return None
        total += info.size
        if total > _UPLOAD_LIMIT:
            raise ValueError(f"working directory {path} is larger than "
                             f"{_UPLOAD_LIMIT >> 20} MiB; use workdir = \"shared\"")
        return info

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        tar.add(path, arcname=".", filter=add)
    return buffer.getvalue()


def _open_log(path: str) -> IO[bytes]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab", buffering=0)
