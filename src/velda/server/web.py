"""The web UI's pages: static HTML shells, the login flow, and the static files.

A shell carries no data (app.js reads everything from the JSON API), so serving a page costs one
session check and the write of a string built at start-up, however many tasks the store holds.
"""

from __future__ import annotations

import hashlib
import html
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, quote

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from velda.server.auth import SESSION_COOKIE, SESSION_S, Auth

if TYPE_CHECKING:
    from velda.server.runtime import Runtime

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
PAGES = {"list": "Tasks", "task": "Task", "pools": "Pools"}
MAX_FORM_BYTES = 16_384

# The shells load only /static/app.js and /static/style.css: no inline script or style at all.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def routes(runtime: Runtime, auth: Auth) -> list[BaseRoute]:
    """The UI's routes, mounted at the root of the server app beside /api/v1.

    The pages need nothing from the runtime: their data comes from the API, in the browser.
    """
    pages = Pages(auth)
    return [
        Route("/", pages.page("list"), methods=["GET", "HEAD"]),
        Route("/tasks/{id}", pages.page("task"), methods=["GET", "HEAD"]),
        Route("/pools", pages.page("pools"), methods=["GET", "HEAD"]),
        Route("/login", pages.login_form, methods=["GET", "HEAD"]),
        Route("/login", pages.login, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=WEB_DIR / "static"), name="static"),
    ]


class Pages:
    def __init__(self, auth: Auth) -> None:
        self.auth = auth
        self.version = asset_version()
        self.layout = read_template("layout.html").replace("{{version}}", self.version)
        self.shells = {name: self.render(name, read_template(name + ".html")) for name in PAGES}
        self.login_shell = read_template("login.html")

    def render(self, page: str, content: str, title: str = "") -> str:
        return (
            self.layout.replace("{{title}}", title or PAGES[page])
            .replace("{{page}}", page)
            .replace("{{content}}", content)
        )

    def page(self, name: str) -> Callable[[Request], Awaitable[Response]]:
        body = self.shells[name].encode()

        async def endpoint(request: Request) -> Response:
            if not self.signed_in(request):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse("/login?next=" + quote(target, safe=""), status_code=303)
            return HTMLResponse(body, headers=SECURITY_HEADERS)

        return endpoint

    def signed_in(self, request: Request) -> bool:
        authorization = request.headers.get("authorization")
        return self.auth.authenticate(authorization, dict(request.cookies)) is not None

    async def login_form(self, request: Request) -> Response:
        target = safe_next(request.query_params.get("next"))
        code = request.query_params.get("code")
        if code is not None:
            if self.auth.consume_login_code(code):
                return self.sign_in(request, target)
            return self.login_page(target, "This login link is not valid or was already used.")
        if self.signed_in(request):
            return RedirectResponse(target, status_code=303)
        return self.login_page(target)

    async def login(self, request: Request) -> Response:
        form = await read_form(request)
        target = safe_next(form.get("next"))
        principal = self.auth.check_token(form.get("token", "").strip())
        # Only the server token: a session acts on the whole server, a task token must not.
        if principal is None or principal.scope is not None:
            return self.login_page(target, "That is not the server token.", status_code=401)
        return self.sign_in(request, target)

    def sign_in(self, request: Request, target: str) -> Response:
        response = RedirectResponse(target, status_code=303)
        for name, value in self.auth.new_session_cookies().items():
            response.set_cookie(
                name,
                value,
                max_age=SESSION_S,
                path="/",
                samesite="strict",
                secure=request.url.scheme == "https",
                httponly=name == SESSION_COOKIE,  # the CSRF cookie is read by app.js
            )
        return response

    def login_page(self, target: str, error: str = "", status_code: int = 200) -> Response:
        content = (
            self.login_shell.replace("{{next}}", html.escape(target))
            .replace("{{error}}", html.escape(error))
            .replace("{{error_hidden}}", "" if error else "hidden")
        )
        page = self.render("login", content, title="Sign in")
        return HTMLResponse(page, status_code=status_code, headers=SECURITY_HEADERS)


def safe_next(target: str | None) -> str:
    """A local path to go to after login; anything else (another site included) becomes /."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target


async def read_form(request: Request) -> dict[str, str]:
    # A hand-rolled urlencoded parse: Starlette's form() needs python-multipart for one field.
    if int(request.headers.get("content-length") or 0) > MAX_FORM_BYTES:
        return {}
    body = (await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace")
    return {k: v[0] for k, v in parse_qs(body).items()}


def read_template(name: str) -> str:
    return (WEB_DIR / "templates" / name).read_text(encoding="utf-8")


def asset_version() -> str:
    """A digest of the static files, put in their URLs so a new release is never served stale."""
    digest = hashlib.sha256()
    for path in sorted((WEB_DIR / "static").iterdir()):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]
