"""Schemathesis drives the API of a real server from the document it serves: no request it
can make gets a 5xx or an answer the document does not describe, and afterwards the task list
still answers. Deterministic (derandomized, a fixed budget per operation)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import missing
from velda.server.openapi import CALLS
from velda_cli import Velda

CASES_PER_OPERATION = 160  # valid and invalid: about 2,000 requests, about a minute


@pytest.fixture(scope="module")
def fuzzer() -> Any:
    """schemathesis, which the `test` extra installs (`pip install -e '.[test]'`)."""
    try:
        import schemathesis
    except ImportError:
        missing("schemathesis is not installed (pip install schemathesis)")
    return schemathesis


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Velda, str, str]]:
    root = tmp_path_factory.mktemp("fuzz")
    velda = Velda(root / "home", root / "work")
    velda.run("velda", "server", "start", check=True)
    url = json.loads((velda.home / "server.json").read_text())["url"]
    token = (velda.home / "token").read_text().strip()
    try:
        yield velda, url, token
    finally:
        velda.shutdown()


@pytest.fixture(scope="module")
def served_schema(live: tuple[Velda, str, str], fuzzer: Any) -> Any:
    _, url, _ = live
    return fuzzer.openapi.from_url(f"{url}/api/v1/openapi.json")


_FRAMING = {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect"}


def _tame(case: Any) -> None:
    """What the fuzzer submits runs for real: keep each command harmless and short, so that
    tasks end (the follow and event streams then end too) and the machine stays usable. The
    fields stay as generated wherever the request is refused anyway. Headers that frame the
    HTTP message itself (a `content-length: U`) are uvicorn's to refuse, in plain text, before
    any of velda's code sees the request: they are left out."""
    if case.headers:  # a case-insensitive mapping, not a dict
        for name in [n for n in case.headers if n.lower() in _FRAMING]:
            del case.headers[name]
    body = case.body
    if case.method.upper() == "POST" and case.path == "/api/v1/tasks" and isinstance(body, dict):
        if isinstance(body.get("command"), list):
            body["command"] = ["true"]
        if isinstance(body.get("pool"), str):
            body["pool"] = None
        shards = body.get("total_shards")
        if isinstance(shards, int) and not isinstance(shards, bool) and shards > 3:
            body["total_shards"] = 3
    query = case.query if isinstance(case.query, dict) else None
    if query is not None and "follow" in query:
        query["follow"] = "0"


SENT = [0]  # requests made by this module's fuzzing, for the check after it

# Valid requests for every operation; invalid ones for those that take any input.
RUNS = [("positive", method, path) for method, path, *_ in CALLS] + [
    ("negative", method, path)
    for method, path, _, body, parameters, *_ in CALLS
    if body or parameters
]


@pytest.mark.parametrize(("mode", "method", "path"), RUNS, ids=[f"{m}-{v} {p}" for m, v, p in RUNS])
def test_no_request_gets_a_5xx_or_an_undocumented_answer(
    served_schema: Any, live: tuple[Velda, str, str], mode: str, method: str, path: str
) -> None:
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    _, _, token = live
    operation = served_schema[path][method.upper()]

    @settings(
        max_examples=CASES_PER_OPERATION // 2, derandomize=True, deadline=None, database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(operation.as_strategy(generation_mode=GenerationMode(mode)))
    def fuzz(case: Any) -> None:
        _tame(case)
        SENT[0] += 1
        case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=checks,
                               timeout=30)

    fuzz()


def test_the_list_still_answers_after_the_fuzzing(live: tuple[Velda, str, str]) -> None:
    velda, url, token = live
    if SENT[0]:  # the fuzzing ran in this session: it made a real number of requests
        assert SENT[0] >= 1000, SENT[0]
    request = urllib.request.Request(f"{url}/api/v1/tasks?all=1&page_size=1000")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        assert isinstance(json.loads(response.read())["tasks"], list)
    listed = velda.run("velda", "task", "list", "-o", "json", check=True)
    assert "tasks" in json.loads(listed.stdout)
    assert "Traceback" not in Path(velda.home / "server.log").read_text()
