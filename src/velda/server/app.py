"""The HTTP API of SPEC §7 on Starlette: small handlers that check who asks, parse, call the
runtime, and render. Bad input is a 4xx with a JSON error naming the field, never a 500."""

from __future__ import annotations

import json
import os
import signal as signals
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from velda import __version__
from velda.models import Task, TaskStatus
from velda.protocol import BadRequest, SubmitRequest, parse_label
from velda.server import logs
from velda.server.auth import CSRF_HEADER, Auth, Principal
from velda.server.openapi import openapi_document
from velda.server.runtime import Runtime
from velda.server.views import task_detail, task_json, tasks_json

Handler = Callable[[Request, Principal], Awaitable[Response]]
MAX_PAGE = 1000
STARTED = time.time()


def _error(message: str, status: int, field: str | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "field": field}, status_code=status)


class Api:
    def __init__(self, runtime: Runtime, auth: Auth) -> None:
        self.runtime = runtime
        self.auth = auth
        self.store = runtime.store

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            principal = self.auth.authenticate(
                request.headers.get("authorization"), dict(request.cookies)
            )
            if principal is None:
                return _error("missing or invalid token", 401)
            if (
                request.method not in ("GET", "HEAD")
                and principal.via_cookie
                and not self.auth.csrf_ok(dict(request.cookies), request.headers.get(CSRF_HEADER))
            ):
                return _error("missing or invalid CSRF header", 403)
            try:
                return await handler(request, principal)
            except BadRequest as e:
                return _error(str(e), e.status, e.field)

        return endpoint

    # --- helpers

    def task(self, request: Request, principal: Principal) -> Task:
        task_id = request.path_params["id"]
        task = self.store.get(task_id)
        if task is None:
            raise BadRequest(f"no task {task_id}", "id", status=404)
        if principal.scope is not None and not self.runtime.resolver.within(
            task, principal.scope
        ):
            raise BadRequest(f"task {task_id} is outside this task's subtree", "id", 403)
        return task

    async def body(self, request: Request) -> Any:
        try:
            return json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not JSON: {e}") from e

    # --- handlers

    async def submit(self, request: Request, principal: Principal) -> Response:
        req = SubmitRequest.from_json(await self.body(request))
        task = await self.runtime.submit(req, principal.scope)
        data = task_json(task, self.store.children_counts([task.id])[task.id], self.store)
        notice = self.runtime.notice_for(self.runtime.pool(task.pool))
        if notice:
            data["notice"] = notice
        return JSONResponse(data, status_code=201)

    async def list_tasks(self, request: Request, principal: Principal) -> Response:
        q = request.query_params
        parent = _opt_int(q.get("parent"), "parent")
        if parent is None and principal.scope is not None:
            parent = principal.scope
        if parent is not None and principal.scope is not None:
            parent_task = self.store.get(parent)
            if parent_task is None or not self.runtime.resolver.within(
                parent_task, principal.scope
            ):
                raise BadRequest(f"task {parent} is outside this task's subtree", "parent", 403)
        size = _opt_int(q.get("page_size"), "page_size")
        size = 50 if size is None else size
        if not 1 <= size <= MAX_PAGE:
            raise BadRequest(f"page_size: must be from 1 to {MAX_PAGE}", "page_size")
        statuses = [s.strip().upper() for v in q.getlist("status") for s in v.split(",") if s]
        _check_statuses(statuses)
        tasks = self.store.query(
            parent_id=parent,
            top_level=q.get("all") not in ("1", "true"),
            statuses=statuses,
            labels=[parse_label(v) for v in q.getlist("label")],
            text=q.get("q") or None,
            after=_opt_int(q.get("page_token"), "page_token"),
            limit=size + 1,
        )
        token = str(tasks[size - 1].id) if len(tasks) > size else None
        return JSONResponse(
            {"tasks": tasks_json(tasks[:size], self.store), "next_page_token": token}
        )

    async def get_task(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        data = task_detail(task, self.store)
        if request.query_params.get("subtree") in ("1", "true"):
            data["subtree"] = asdict(self.store.subtree_counts(task.id))
        return JSONResponse(data)

    async def resolve(self, request: Request, principal: Principal) -> Response:
        ref = request.query_params.get("ref", "")
        if not ref:
            raise BadRequest("ref: give a task ID, name or path", "ref")
        task = self.runtime.resolver.resolve(ref, principal.scope)
        return JSONResponse(task_detail(task, self.store))

    async def cancel(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        await self.runtime.cancel(task.id)
        return JSONResponse(task_detail(self.store.get(task.id) or task, self.store))

    async def retry(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        await self.runtime.retry(task.id)
        return JSONResponse(task_detail(self.store.get(task.id) or task, self.store))

    async def signal(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        body = await self.body(request)
        signum = body.get("signal") if isinstance(body, dict) else None
        if not isinstance(signum, int) or signum not in signals.valid_signals():
            raise BadRequest("signal: must be a signal number", "signal")
        await self.runtime.send_signal(task.id, signum)
        return JSONResponse({"ok": True})

    async def logs(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        q = request.query_params
        stream = q.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise BadRequest("stream: must be stdout or stderr", "stream")
        attempt = _opt_int(q.get("attempt"), "attempt") or max(task.attempt, 1)
        offset = _opt_int(q.get("offset"), "offset") or 0
        if offset < 0:
            raise BadRequest("offset: must be 0 or more", "offset")
        follow = q.get("follow") in ("1", "true")
        body = logs.stream_file(self.runtime, task.id, attempt, stream, offset, follow)
        return StreamingResponse(body, media_type="application/octet-stream")

    async def output(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        q = request.query_params
        attempt = _opt_int(q.get("attempt"), "attempt")
        follow = q.get("follow") in ("1", "true")
        body = logs.multiplex(self.runtime, task.id, attempt, follow)
        return StreamingResponse(body, media_type="application/x-velda-frames")

    async def events(self, request: Request, principal: Principal) -> Response:
        task = self.task(request, principal)
        return StreamingResponse(
            logs.task_events(self.runtime, task.id), media_type="text/event-stream"
        )

    async def pools(self, request: Request, principal: Principal) -> Response:
        return JSONResponse({"pools": await self.runtime.pool_usage()})

    async def login_link(self, request: Request, principal: Principal) -> Response:
        if principal.scope is not None or principal.via_cookie:
            raise BadRequest("only the server token can make login links", None, 403)
        url = f"{self.runtime.url}/login?code={self.auth.new_login_code()}"
        return JSONResponse({"url": url})

    async def server(self, request: Request, principal: Principal) -> Response:
        return JSONResponse(server_info(self.runtime))


def server_info(runtime: Runtime) -> dict[str, Any]:
    return {
        "url": runtime.url,
        "pid": os.getpid(),
        "version": __version__,
        "uptime_s": round(time.time() - STARTED, 3),
        "home": str(runtime.home),
    }


def _opt_int(value: str | None, field: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{field}: {value!r} is not an integer", field) from None


def _check_statuses(statuses: list[str]) -> None:
    known = {s.value for s in TaskStatus}
    for status in statuses:
        if status not in known:
            raise BadRequest(
                f"status: unknown status '{status}'; one of {', '.join(sorted(known))}",
                "status",
            )


async def healthz(request: Request) -> Response:
    return JSONResponse({"ok": True})


def build_app(runtime: Runtime, auth: Auth) -> Starlette:
    api = Api(runtime, auth)
    g = api.guarded
    routes: list[BaseRoute] = [
        Route("/healthz", healthz),
        Route("/metrics", g(lambda r, p: metrics(runtime)), methods=["GET"]),
        Route("/api/v1/openapi.json", lambda r: JSONResponse(openapi_document())),
        Route("/api/v1/server", g(api.server)),
        Route("/api/v1/tasks", g(api.list_tasks), methods=["GET"]),
        Route("/api/v1/tasks", g(api.submit), methods=["POST"]),
        Route("/api/v1/resolve", g(api.resolve)),
        Route("/api/v1/tasks/{id:int}", g(api.get_task)),
        Route("/api/v1/tasks/{id:int}/logs", g(api.logs)),
        Route("/api/v1/tasks/{id:int}/output", g(api.output)),
        Route("/api/v1/tasks/{id:int}/events", g(api.events)),
        Route("/api/v1/tasks/{id:int}/cancel", g(api.cancel), methods=["POST"]),
        Route("/api/v1/tasks/{id:int}/retry", g(api.retry), methods=["POST"]),
        Route("/api/v1/tasks/{id:int}/signal", g(api.signal), methods=["POST"]),
        Route("/api/v1/pools", g(api.pools)),
        Route("/api/v1/login-links", g(api.login_link), methods=["POST"]),
    ]
    routes += _web_routes(runtime, auth)
    return Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _not_allowed, 500: _server_error},
    )


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
        f"velda_queued_local {len(runtime.queued)}",
        "# TYPE velda_running_local gauge",
        f"velda_running_local {len(runtime.allocs)}",
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
