"""The served OpenAPI document describes the API as the handlers are: every route and every
documented path, every query parameter a handler reads, and a 4xx wherever one can come."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from starlette.routing import Route
from starlette.testclient import TestClient

from velda.config import Config
from velda.server import app as app_module
from velda.server.app import build_app
from velda.server.auth import Auth
from velda.server.openapi import openapi_document
from velda.server.runtime import Runtime
from velda.store.sqlite import SqliteStore

DOCUMENTED_PREFIXES = ("/api/v1/", "/healthz", "/metrics")


def _routes(tmp_path: Path) -> set[tuple[str, str]]:
    store = SqliteStore(tmp_path / "velda.db")
    runtime = Runtime(tmp_path, Config(), store, Auth("t").task_token)
    app: Any = build_app(runtime, Auth("t"))
    while not hasattr(app, "routes"):  # middleware wraps the Starlette app
        app = app.app
    found = set()
    for route in app.routes:
        if isinstance(route, Route) and route.path.startswith(DOCUMENTED_PREFIXES):
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path)
            found |= {(m.lower(), path) for m in (route.methods or {"GET"}) if m != "HEAD"}
    return found


def _documented() -> set[tuple[str, str]]:
    return {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}


def test_every_route_is_documented_and_every_documented_path_exists(tmp_path: Path) -> None:
    routes = _routes(tmp_path)
    assert routes - _documented() == set(), "routes the document does not describe"
    assert _documented() - routes == set(), "documented calls no route serves"


def test_every_query_parameter_a_handler_reads_is_documented() -> None:
    source = Path(app_module.__file__).read_text()
    read = set(re.findall(r'(?:\bq|query_params)\.(?:get|getlist)\("(\w+)"', source))
    documented = {
        p["name"] for ops in openapi_document()["paths"].values() for op in ops.values()
        for p in op.get("parameters", [])
    }
    assert read and read - documented == set()


def test_operations_document_their_errors_and_bounds() -> None:
    doc = openapi_document()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path not in ("/healthz", "/api/v1/openapi.json"):
                assert "401" in op["responses"], (method, path)
            if "requestBody" in op:
                assert "400" in op["responses"] and "413" in op["responses"], (method, path)
            for param in op.get("parameters", []):
                schema = param["schema"]
                if schema.get("type") == "integer":
                    assert "minimum" in schema and "maximum" in schema, param["name"]
    submit = doc["components"]["schemas"]["SubmitRequest"]["properties"]
    assert submit["total_shards"]["maximum"] == 10_000


def test_the_served_document_is_the_one_described(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "velda.db")
    runtime = Runtime(tmp_path, Config(), store, Auth("t").task_token)
    with TestClient(build_app(runtime, Auth("t")), base_url="http://127.0.0.1") as client:
        response = client.get("/api/v1/openapi.json")
    assert response.status_code == 200 and response.json() == openapi_document()
