"""Reading a row is total: whatever a column holds, it comes back as something every reader
can show and serialize. And a repair, run when a store opens, that rewrites the rows a check
at the door would have refused (rows written before those checks existed, or by hand).

What can be wrong: a timeout that is infinite or out of range, a JSON column that does not
parse or holds a lone surrogate (JSON can spell one, UTF-8 cannot), a status or reason this
version does not know, and TEXT that is not UTF-8 at all (read with replacement characters).
"""

from __future__ import annotations

import json
import math
import sqlite3
from typing import Any

from velda.models import Reason, TaskStatus

MAX_TIMEOUT_S = 30 * 86400
# PRAGMA user_version of a store whose rows were all checked (a store made before these
# checks has 0): the repair scans every row once, not at every start.
REPAIRED = 1
# A lone surrogate is stored by json.dumps as an escape; scanning for the escape's prefix
# keeps the costly clean-up to the rare rows that may need it.
_SURROGATE_ESCAPE = "\\ud"
_JSON_COLUMNS = ("command", "env", "labels", "handle", "alloc")
_STATUSES = {s.value for s in TaskStatus}
_REASONS = {r.value for r in Reason}


def text_of(raw: bytes) -> str:
    """The connection's text_factory: bytes that are not UTF-8 do not fail a whole query."""
    return raw.decode("utf-8", "backslashreplace")


def clean_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, so it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): _clean(v) for k, v in value.items()}
    return value


def _loads(text: str) -> Any:
    value = json.loads(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("not finite")
    return _clean(value) if _SURROGATE_ESCAPE in text else value


def str_list(text: str | None) -> list[str]:
    """A command: a list of strings, else what is left of it, shown as one word."""
    try:
        value = _loads(text or "[]")
    except (ValueError, RecursionError):
        return [clean_text(str(text))]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return [json.dumps(value, ensure_ascii=False)]


def str_dict(text: str | None) -> dict[str, str]:
    """Labels or an environment: an object of strings, else nothing."""
    try:
        value = _loads(text or "{}")
    except (ValueError, RecursionError):
        return {}
    if not isinstance(value, dict):
        return {}
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def any_dict(text: str | None) -> dict[str, Any] | None:
    """An engine handle or an allocation: an object, else None."""
    if text is None:
        return None
    try:
        value = _loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def timeout(value: object) -> float | None:
    if not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT_S:
        return None  # NaN fails the comparison too
    return float(value)


def status(value: object) -> TaskStatus:
    """A status this version does not know reads as FAILURE: final, so nothing waits on it."""
    return TaskStatus(value) if value in _STATUSES else TaskStatus.FAILURE


def reason(value: object) -> Reason | None:
    return Reason(value) if value in _REASONS else None


def terminal(value: object) -> tuple[int, int] | None:
    """A terminal's "ROWSxCOLS"; anything else reads as no terminal."""
    text = value if isinstance(value, str) and len(value) <= 16 and value.isascii() else ""
    rows, _, cols = text.partition("x")
    if not (rows.isdigit() and cols.isdigit()) or not (0 < int(rows) and 0 < int(cols)):
        return None
    return int(rows), int(cols)


# --- the repair


def repair(db: sqlite3.Connection) -> int:
    """Once per store: rewrite the rows a reader would have to clean; the number rewritten.
    Each check is one SQL-side scan (about a second for 100,000 tasks), then the store is
    marked so that later starts skip it; reads stay total for whatever comes after."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= REPAIRED:
        return 0
    fixed = _repair_rows(db)
    db.execute(f"PRAGMA user_version = {REPAIRED}")
    return fixed


def _repair_rows(db: sqlite3.Connection) -> int:
    fixed = db.execute(
        "UPDATE tasks SET timeout_s = NULL WHERE timeout_s IS NOT NULL "
        "AND NOT (timeout_s > 0 AND timeout_s <= ?)",
        (MAX_TIMEOUT_S,),
    ).rowcount
    known = ",".join("?" * len(_STATUSES))
    fixed += db.execute(
        f"UPDATE tasks SET status = 'FAILURE' WHERE status NOT IN ({known})", sorted(_STATUSES)
    ).rowcount
    reasons = ",".join("?" * len(_REASONS))
    fixed += db.execute(
        f"UPDATE tasks SET reason = NULL WHERE reason IS NOT NULL AND reason NOT IN ({reasons})",
        sorted(_REASONS),
    ).rowcount
    for column in _JSON_COLUMNS:
        fixed += _repair_json(db, column)
    return fixed


_REWRITE = {"command": str_list, "env": str_dict, "labels": str_dict, "handle": any_dict,
            "alloc": any_dict}


def _repair_json(db: sqlite3.Connection, column: str) -> int:
    rows = db.execute(
        f"SELECT id, {column} FROM tasks WHERE {column} IS NOT NULL "
        f"AND (NOT json_valid({column}) OR instr({column}, ?) > 0)",
        (_SURROGATE_ESCAPE,),
    ).fetchall()
    fixed = 0
    for task_id, text in rows:
        value = _REWRITE[column](text)
        new = None if value is None else json.dumps(value)
        if new != text:
            db.execute(f"UPDATE tasks SET {column} = ? WHERE id = ?", (new, task_id))
            fixed += 1
    return fixed
