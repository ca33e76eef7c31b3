"""Who is asking: the server token, a task token, or a web session cookie.

Task tokens are `task.<id>.<hmac>` and act only inside task <id>'s subtree, and only while the
task is open: once it is final its token may still read for TASK_TOKEN_GRACE_S (a `vrun` draining
the last logs) and changes nothing. Web sessions are signed cookies; requests that change state
with a cookie must echo the CSRF cookie in a header and come from the server's own origin.

Credentials are compared as bytes: a header or cookie may hold any character, and comparing a
non-ASCII string must be a refusal, not an error.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from velda.models import TaskStatus

SESSION_COOKIE = "velda_session"
CSRF_COOKIE = "velda_csrf"
CSRF_HEADER = "x-velda-csrf"
SESSION_S = 7 * 24 * 3600
LOGIN_CODE_S = 300
TASK_TOKEN_GRACE_S = 600  # reads allowed this long after the token's task became final
_MAX_DIGITS = 18  # a task ID or an expiry time: anything longer is no credential of ours


@dataclass(frozen=True)
class Principal:
    scope: int | None  # None: the whole server; else the task whose subtree it may act on
    via_cookie: bool = False


def load_or_create_token(home: Path) -> str:
    path = home / "token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token


class Auth:
    def __init__(self, token: str) -> None:
        self.token = token
        self._key = hashlib.sha256(b"velda:" + token.encode()).digest()
        self._login_codes: dict[str, float] = {}

    def _sign(self, text: str) -> str:
        return hmac.digest(self._key, text.encode(), "sha256").hex()[:32]

    def task_token(self, task_id: int) -> str:
        return f"task.{task_id}.{self._sign(f'task:{task_id}')}"

    def check_token(self, token: str) -> Principal | None:
        if same(token, self.token):
            return Principal(None)
        parts = token.split(".")
        if len(parts) == 3 and parts[0] == "task" and _is_number(parts[1]):
            if same(parts[2], self._sign(f"task:{parts[1]}")):
                return Principal(int(parts[1]))
        return None

    # --- web sessions

    def new_login_code(self) -> str:
        code = secrets.token_urlsafe(24)
        self._login_codes[code] = time.time() + LOGIN_CODE_S
        return code

    def consume_login_code(self, code: str) -> bool:
        expires = self._login_codes.pop(code, 0.0)
        return expires > time.time()

    def new_session_cookies(self) -> dict[str, str]:
        expires = int(time.time()) + SESSION_S
        session = f"{expires}.{self._sign(f'session:{expires}')}"
        return {SESSION_COOKIE: session, CSRF_COOKIE: secrets.token_urlsafe(16)}

    def check_session(self, cookie: str) -> Principal | None:
        expires, _, signature = cookie.partition(".")
        if not _is_number(expires) or int(expires) < time.time():
            return None
        if not same(signature, self._sign(f"session:{expires}")):
            return None
        return Principal(None, via_cookie=True)

    def authenticate(
        self, authorization: str | None, cookies: dict[str, str]
    ) -> Principal | None:
        if authorization:
            scheme, _, token = authorization.partition(" ")
            return self.check_token(token.strip()) if scheme.lower() == "bearer" else None
        session = cookies.get(SESSION_COOKIE)
        return self.check_session(session) if session else None

    @staticmethod
    def csrf_ok(cookies: dict[str, str], header: str | None) -> bool:
        expected = cookies.get(CSRF_COOKIE)
        return bool(expected and header and same(expected, header))


def same(given: str, expected: str) -> bool:
    """Constant-time equality of two credentials, whatever characters they hold."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def _is_number(text: str) -> bool:
    # isdigit() alone accepts "²" and other digits that int() refuses
    return 0 < len(text) <= _MAX_DIGITS and text.isascii() and text.isdigit()


def task_token_refusal(
    scope: int, status: TaskStatus | None, resolved_at: float | None, write: bool, now: float
) -> tuple[str, int] | None:
    """Why a task token may not make this request (message, HTTP status), or None if it may.

    Only a final task's token is limited: RUNNING and RUNNING_SUBTASKS are open, and a task
    that is retried is open again, so its token acts again."""
    if status is None:
        return f"task {scope} of this token no longer exists", 401
    if not status.is_final():
        return None
    if write:
        return f"task {scope} has ended ({status}): its token can no longer change anything", 403
    if resolved_at is not None and now > resolved_at + TASK_TOKEN_GRACE_S:
        minutes = TASK_TOKEN_GRACE_S // 60
        return f"task {scope} ended more than {minutes} minutes ago: its token has expired", 401
    return None
