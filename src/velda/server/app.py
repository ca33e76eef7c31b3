"""The HTTP API of SPEC §7 on Starlette: small handlers that check who asks, parse, call the
runtime, and render. Bad input is a 4xx with a JSON error naming the field, never a 500."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import signal as signals
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import ASGIApp

from velda import __version__
from velda.models import Children, Dependency, Task, TaskStatus
from velda.protocol import (
    MAX_BATCH,
    BadRequest,
    SubmitRequest,
    check_id,
    check_text,
    in_item,
    parse_int,
    parse_label,
    parse_terminal,
)
from velda.server import logs, ports, views, waiting
from velda.server.auth import CSRF_HEADER, Auth, Principal, task_token_refusal
from velda.server.doors import LOOPBACK_NAMES, HostCheck, origin_refusal
from velda.server.openapi import MAX_ATTEMPT, MAX_PAGE, openapi_document
from velda.server.runtime import Runtime
from velda.server.space import is_full, no_space
from velda.server.usage import chart as usage_chart
from velda.server.views import (
    start_failure,
    submitted_json,
    task_detail,
    task_json,
    tasks_json,
)

Handler = Callable[[Request, Principal], Awaitable[Response]]
STARTED = time.time()


def _error(message: str, status: int, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


class Api:
    def __init__(self, runtime: Runtime, auth: Auth) -> None:
        self.runtime = runtime
        self.auth = auth
        self.store = runtime.store
        views.explain_waiting = waiting.explainer(runtime)  # waiting_for in every task's JSON
        views.attempt_usage = runtime.attempt_usage  # usage, likewise
        views.subtree_usage = runtime.subtree_usage.of

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            principal = self.auth.authenticate(
                request.headers.get("authorization"), dict(request.cookies)
            )
            if principal is None:
                return _error("missing or invalid token", 401)
            self.runtime.settle()  # the request sees every engine report before it
            refusal = self.refusal(request, principal)
            if refusal is not None:
                return _error(*refusal)
            try:
                return await handler(request, principal)
            except BadRequest as e:
                return _error(str(e), e.status, e.field)
            except OSError as e:  # the step was rolled back whole: nothing half-done stays
                if not is_full(e):
                    raise
                return _error(no_space(e, self.runtime.home), 507)

        return endpoint

    def refusal(self, request: HTTPConnection, principal: Principal) -> tuple[str, int] | None:
        """Why an authenticated request is still refused: a web session's change without the
        CSRF header or from another origin; a token whose task has ended."""
        write = request.scope.get("method") not in ("GET", "HEAD")  # a websocket writes
        if write and principal.via_cookie:
            if not self.auth.csrf_ok(dict(request.cookies), request.headers.get(CSRF_HEADER)):
                return "missing or invalid CSRF header", 403
            h = request.headers
            cross = origin_refusal(h.get("origin"), h.get("referer"), h.get("host"),
                                   (self.runtime.url, self.runtime.config.server_url))
            if cross is not None:
                return cross, 403
        if principal.scope is None:
            return None
        task = self.store.get(principal.scope)
        return task_token_refusal(
            principal.scope, task.status if task else None, task.resolved_at if task else None,
            write, time.time(),
        )

    # --- helpers

    def task(self, request: HTTPConnection, principal: Principal) -> Task:
        task_id = check_id(request.path_params["id"], "id")
        task = self.store.get(task_id)
        if task is None:
            raise BadRequest(f"no task {task_id}", "id", status=404)
        if principal.scope is not None and not self.runtime.resolver.within(
            task, principal.scope
        ):
            raise BadRequest(f"task {task_id} is outside this task's subtree", "id", 403)
        return task

    def blocking_follow(
        self, principal: Principal, task: Task, body: AsyncIterator[bytes]
    ) -> AsyncIterator[bytes]:
        """A follow stream of `task`: opened from inside an ancestor task (with its token),
        that ancestor is blocked waiting for it while the stream is open."""
        if principal.scope is None or principal.scope == task.id:
            return body
        return self.runtime.blocked.following(principal.scope, task.id, body)

    async def body(self, request: Request) -> Any:
        raw = await read_body(request, self.runtime.config.max_request_bytes)
        try:
            return json.loads(raw or b"{}")  # Infinity and NaN: refused by the field checks
        except ValueError as e:  # not JSON, not UTF-8, or an integer of over 4300 digits
            raise BadRequest(f"the request body is not JSON: {str(e)[:200]}") from e
        except RecursionError:
            raise BadRequest("the request body is nested too deeply") from None

    # --- handlers

    async def submit(self, request: Request, principal: Principal) -> Response:
        key = _idempotency_key(request)
        earlier = self.store.by_idempotency_key(key) if key else None
        req = SubmitRequest.from_json(await self.body(request))
        if earlier:
            task, made = earlier, False
        else:
            task, made = await self.runtime.submit_or_find(req, principal.scope, key)
        data = task_json(task, self.children_of_submitted(task, made), self.store,
                         _dependencies_of_submitted(req, made))
        # only for a submitter outside any task: inside one, its stderr is that task's log
        notice = None if principal.scope else self.runtime.notice_for(self.runtime.pool(task.pool))
        if notice:
            data["notice"] = notice
        return JSONResponse(data, status_code=200 if earlier else 201)

    def children_of_submitted(self, task: Task, made: bool) -> Children:
        """A task this request just made has no children yet unless it is a shard set: none
        could be submitted from inside it before this answer."""
        if made and task.total_shards is None:
            return Children()
        return self.store.children_counts([task.id])[task.id]

    async def submit_batch(self, request: Request, principal: Principal) -> Response:
        """Many tasks in one request, stored all or none (a bad one is named by its index);
        the answer lists each one's id, name, status and pool, in order."""
        key = _idempotency_key(request)
        earlier = self.store.by_idempotency_key(f"{key}/0") if key else None
        reqs = _batch_of(await self.body(request))
        keys = [f"{key}/{i}" for i in range(len(reqs))] if key else None
        tasks = await self.runtime.submit_many(reqs, principal.scope, keys, numbered=True)
        return JSONResponse({"tasks": [submitted_json(task) for task in tasks]},
                            status_code=200 if earlier else 201)

    async def list_tasks(self, request: Request, principal: Principal) -> Response:
        q = request.query_params
        parent = parse_int(q.get("parent"), "parent")
        if parent is None and principal.scope is not None:
            parent = principal.scope
        if parent is not None and principal.scope is not None:
            parent_task = self.store.get(parent)
            if parent_task is None or not self.runtime.resolver.within(
                parent_task, principal.scope
            ):
                raise BadRequest(f"task {parent} is outside this task's subtree", "parent", 403)
        size = parse_int(q.get("page_size"), "page_size", 1, MAX_PAGE)
        size = 50 if size is None else size
        statuses = [s.strip().upper() for v in q.getlist("status") for s in v.split(",") if s]
        _check_statuses(statuses)
        tasks = self.store.query(
            parent_id=parent,
            top_level=q.get("all") not in ("1", "true"),
            statuses=statuses,
            labels=[parse_label(v) for v in q.getlist("label")],
            text=check_text(q.get("q") or "", "q") or None,
            after=parse_int(q.get("page_token"), "page_token"),
            limit=size + 1,
        )
        token = str(tasks[size - 1].id) if len(tasks) > size else None
        return JSONResponse(
            {"tasks": tasks_json(tasks[:size], self.store), "next_page_token": token}
        )

    async def get_task(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        data = self.detail(task, _show_env(request, principal))
        if request.query_params.get("subtree") in ("1", "true"):
            data["subtree"] = asdict(self.store.subtree_counts(task.id))
        return JSONResponse(data)

    async def resolve(self, request: Request, principal: Principal) -> Response:
        ref = check_text(request.query_params.get("ref", ""), "ref")
        if not ref:
            raise BadRequest("ref: give a task ID, name or path", "ref")
        task = self.runtime.resolver.resolve(ref, principal.scope)
        return JSONResponse(self.detail(task, _show_env(request, principal)))

    def detail(self, task: Task, show_env: bool = False) -> dict[str, Any]:
        """One task as `velda task get` shows it: with why its command could not start."""
        data = task_detail(task, self.store, show_env)
        if data["reason_detail"] is None:
            stderr = self.runtime.attempt_dir(task.id, task.attempt) / "stderr"
            data["reason_detail"] = start_failure(task, stderr)
        return data

    async def cancel(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        if task.status.is_final():  # nothing to stop; say so rather than "cancelling"
            return JSONResponse({**task_detail(task, self.store), "already_ended": True})
        await self.runtime.cancel(task.id)
        return JSONResponse(task_detail(self.store.get(task.id) or task, self.store))

    async def retry(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        await self.runtime.retry(task.id, _idempotency_key(request))
        return JSONResponse(task_detail(self.store.get(task.id) or task, self.store))

    async def signal(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        body = await self.body(request)
        signum = body.get("signal") if isinstance(body, dict) else None
        valid = isinstance(signum, int) and not isinstance(signum, bool)
        if not valid or signum not in signals.valid_signals():
            raise BadRequest("signal: must be a signal number", "signal")
        await self.runtime.send_signal(task.id, signum)
        return JSONResponse({"ok": True})

    async def terminal(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        body = await self.body(request)
        if not isinstance(body, dict) or not set(body) <= {"data", "size"}:
            raise BadRequest('the body must be {"data": BASE64, "size": {"rows", "cols"}}')
        data = body.get("data", "")
        try:
            typed = base64.b64decode(data, validate=True) if isinstance(data, str) else None
        except ValueError:
            typed = None
        if typed is None:
            raise BadRequest("data: must be base64 text", "data")
        await self.runtime.to_terminal(task.id, typed, parse_terminal(body.get("size"), "size"))
        return JSONResponse({"ok": True})

    async def logs(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        q = request.query_params
        stream = q.get("stream", "stdout")
        if stream not in ("stdout", "stderr", "combined"):
            raise BadRequest("stream: must be stdout, stderr or combined", "stream")
        attempt = parse_int(q.get("attempt"), "attempt", 1, MAX_ATTEMPT) or max(task.attempt, 1)
        offset = parse_int(q.get("offset"), "offset") or 0
        follow = q.get("follow") in ("1", "true")
        headers: dict[str, str] = {}
        if stream == "combined":
            framed = q.get("framed") in ("1", "true")
            tail = parse_int(q.get("tail"), "tail", 0)
            if tail is not None:  # the last `tail` bytes; the header says where they start
                offset = max(0, logs.combined_length(self.runtime, task, attempt) - tail)
                headers["X-Velda-Offset"] = str(offset)
            body = logs.stream_combined(self.runtime, task.id, attempt, offset, follow, framed)
        else:
            body = logs.stream_file(self.runtime, task.id, attempt, stream, offset, follow)
        if follow:
            body = self.blocking_follow(principal, task, body)
        return StreamingResponse(body, media_type="application/octet-stream", headers=headers)

    async def output(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        q = request.query_params
        attempt = parse_int(q.get("attempt"), "attempt", 1, MAX_ATTEMPT)
        follow = q.get("follow") in ("1", "true")
        here = q.get("here") in ("1", "true") and _from_this_machine(request)
        body = logs.multiplex(self.runtime, task.id, attempt, follow, _resume_point(q, attempt),
                              here)
        if follow:
            body = self.blocking_follow(principal, task, body)
        return StreamingResponse(body, media_type="application/x-velda-frames")

    async def events(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        subtree = request.query_params.get("subtree") in ("1", "true")
        events = logs.task_events(self.runtime, task.id, subtree)
        body = self.blocking_follow(principal, task, events)
        return StreamingResponse(body, media_type="text/event-stream")

    async def usage(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        q = request.query_params
        attempt = parse_int(q.get("attempt"), "attempt", 1, MAX_ATTEMPT) or max(task.attempt, 1)
        if attempt > max(task.attempt, 1):
            raise BadRequest(f"attempt: task {task.id} has {task.attempt} attempt(s)", "attempt")
        ended = task.finished_at if attempt == task.attempt else task.started_at
        measured = self.runtime.attempt_usage(task.id, attempt, ended)
        samples = usage_chart(self.runtime.attempt_dir(task.id, attempt))
        return JSONResponse({"attempt": attempt, "usage": measured, "samples": samples})

    async def pools(self, request: Request, principal: Principal) -> Response:
        pools = await self.runtime.pool_usage()
        return JSONResponse({"pools": pools, "machine": self.runtime.machine_usage()})

    async def login_link(self, request: Request, principal: Principal) -> Response:
        if principal.scope is not None or principal.via_cookie:
            raise BadRequest("only the server token can make login links", None, 403)
        url = f"{self.runtime.url}/login?code={self.auth.new_login_code()}"
        return JSONResponse({"url": url})

    async def server(self, request: Request, principal: Principal) -> Response:
        info = server_info(self.runtime)
        if principal.scope is not None:
            del info["home"]  # where the server keeps its token is none of a task's business
            del info["config"]
        return JSONResponse(info)

    async def reload(self, request: Request, principal: Principal) -> Response:
        """Read velda.toml again now; a file that cannot be used is a 400 with its reason."""
        if principal.scope is not None or principal.via_cookie:
            raise BadRequest("only the server token can reload the config", None, 403)
        error = self.runtime.watcher.reload()
        if error:
            raise BadRequest(f"{error}; the pools read before stay in force", None)
        return JSONResponse({"config": self.runtime.watcher.describe()})


def server_info(runtime: Runtime) -> dict[str, Any]:
    return {
        "url": runtime.url,
        "pid": os.getpid(),
        "version": __version__,
        "uptime_s": round(time.time() - STARTED, 3),
        "home": str(runtime.home),
        "config": runtime.watcher.describe(),
        "refusing_work": runtime.space.full,  # why no new work starts now (a full disk)
    }


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes before it is all read."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"the request body is over {limit} bytes", None, 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"the request body is over {limit} bytes", None, 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _from_this_machine(request: Request) -> bool:
    """Did the request come over loopback? Only such a client may read the log files itself
    (`/output?here=1`); another one gets the bytes whatever it asks."""
    try:
        peer = ipaddress.ip_address(request.client.host if request.client else "")
    except ValueError:
        return False
    mapped = getattr(peer, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return peer.is_loopback or bool(mapped and mapped.is_loopback)


def _resume_point(q: Any, attempt: int | None) -> tuple[int, int, int] | None:
    """Where a follower resumes /output: ?from_attempt=&stdout_offset=&stderr_offset=."""
    if q.get("stdout_offset") is None and q.get("stderr_offset") is None:
        return None
    start = parse_int(q.get("from_attempt"), "from_attempt", 1, MAX_ATTEMPT) or attempt or 1
    stdout = parse_int(q.get("stdout_offset"), "stdout_offset") or 0
    stderr = parse_int(q.get("stderr_offset"), "stderr_offset") or 0
    return start, stdout, stderr


def _batch_of(body: object) -> list[SubmitRequest]:
    if not isinstance(body, dict) or set(body) != {"tasks"}:
        raise BadRequest('the request body must be {"tasks": [...]}', "tasks")
    items = body["tasks"]
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise BadRequest(f"tasks: a list of 1 to {MAX_BATCH:,} tasks", "tasks")
    return [in_item(i, SubmitRequest.from_json, item)
            for i, item in enumerate(items)]


def _dependencies_of_submitted(req: SubmitRequest, made: bool) -> list[Dependency] | None:
    """A task this request just made without `after*` has none; otherwise None: the answer
    reads them from the store."""
    return [] if made and not (req.after or req.after_success or req.after_fail) else None


def _idempotency_key(request: Request) -> str | None:
    """The client's key for a request that creates something: the same key again means the
    same request again (its answer was lost), never a second task."""
    key = request.headers.get("idempotency-key", "").strip()
    if len(key) > 200:
        raise BadRequest("Idempotency-Key: at most 200 characters", "Idempotency-Key")
    return key or None


def _show_env(request: Request, principal: Principal) -> bool:
    """?show_env=1: the environment unmasked, for the server token only."""
    if request.query_params.get("show_env") not in ("1", "true"):
        return False
    if principal.scope is not None or principal.via_cookie:
        raise BadRequest("show_env: only the server token may see unmasked values", "show_env",
                         403)
    return True


def _check_statuses(statuses: list[str]) -> None:
    known = {s.value for s in TaskStatus}
    for status in statuses:
        if status not in known:
            raise BadRequest(
                f"status: unknown status '{status}'; one of {', '.join(sorted(known))}",
                "status",
            )


def healthz_of(runtime: Runtime) -> Callable[[Request], Awaitable[Response]]:
    async def healthz(request: Request) -> Response:
        full = runtime.space.full  # said only while it holds: a healthy answer stays as it was
        return JSONResponse({"ok": True, **({"refusing_work": full} if full else {})})

    return healthz


def build_app(
    runtime: Runtime, auth: Auth, names: set[str] | None = None, any_ip: bool = False
) -> ASGIApp:
    """The API and the web UI, answering only to the host `names` (doors.served_names), and
    to any IP address if `any_ip` (a server bound to every address)."""
    api = Api(runtime, auth)
    relay = ports.PortRelay(runtime, api)
    views.forwarded_ports = relay.forwards.of
    g = api.guarded
    routes: list[BaseRoute] = [
        Route("/healthz", healthz_of(runtime)),
        Route("/metrics", g(lambda r, p: metrics(runtime)), methods=["GET"]),
        Route("/api/v1/openapi.json", lambda r: JSONResponse(openapi_document())),
        Route("/api/v1/server", g(api.server)),
        Route("/api/v1/server/reload", g(api.reload), methods=["POST"]),
        Route("/api/v1/tasks", g(api.list_tasks), methods=["GET"]),
        Route("/api/v1/tasks", g(api.submit), methods=["POST"]),
        Route("/api/v1/tasks:batch", g(api.submit_batch), methods=["POST"]),
        Route("/api/v1/resolve", g(api.resolve)),
        Route("/api/v1/tasks/{id:int}", g(api.get_task)),
        Route("/api/v1/tasks/{id:int}/logs", g(api.logs)),
        Route("/api/v1/tasks/{id:int}/output", g(api.output)),
        Route("/api/v1/tasks/{id:int}/events", g(api.events)),
        Route("/api/v1/tasks/{id:int}/cancel", g(api.cancel), methods=["POST"]),
        Route("/api/v1/tasks/{id:int}/retry", g(api.retry), methods=["POST"]),
        Route("/api/v1/tasks/{id:int}/signal", g(api.signal), methods=["POST"]),
        Route("/api/v1/tasks/{id:int}/terminal", g(api.terminal), methods=["POST"]),
        Route("/api/v1/tasks/{id:int}/usage", g(api.usage)),
        WebSocketRoute(ports.PATH, relay.endpoint),
        Route("/api/v1/pools", g(api.pools)),
        Route("/api/v1/login-links", g(api.login_link), methods=["POST"]),
    ]
    routes += _web_routes(runtime, auth)
    app = Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _not_allowed, 500: _server_error},
    )
    return HostCheck(app, set(LOOPBACK_NAMES) if names is None else names, any_ip)


def _web_routes(runtime: Runtime, auth: Auth) -> list[BaseRoute]:
    try:
        from velda.server import web
    except ImportError:
        return []
    return web.routes(runtime, auth)


async def metrics(runtime: Runtime) -> Response:
    lines = ["# TYPE velda_tasks gauge"]
    for status, n in runtime.store.status_counts().items():
        lines.append(f'velda_tasks{{status="{status}"}} {n}')
    lines += [
        "# TYPE velda_queued_local gauge",
        f"velda_queued_local {len(runtime.machine.queued)}",
        "# TYPE velda_running_local gauge",
        f"velda_running_local {len(runtime.machine.allocs)}",
        "# TYPE velda_uptime_seconds gauge",
        f"velda_uptime_seconds {time.time() - STARTED:.3f}",
    ]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(f"no such path: {request.url.path}", 404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return _error(f"method {request.method} not allowed on {request.url.path}", 405)


async def _server_error(request: Request, exc: Exception) -> Response:
    return _error(f"internal error: {type(exc).__name__}: {exc}", 500)
