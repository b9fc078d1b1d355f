"""The OpenAPI document: valid 3.1, and describing exactly the routes each app has.

The route tests are the guard for anyone adding or removing an endpoint: describe
it in ``sandrun/static/openapi.yaml`` (marked ``x-sandrun-role: coordinator``
if only the coordinator serves it).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from openapi_spec_validator import validate

from coordinator.proxy import CoordinatorAPI
from sandrun.api.app import WorkerAPI
from sandrun.pages import openapi_document
from tests.contract import Contract
from tests.coordinator.fakes import Pool
from tests.unit.worker_fakes import Harness

# Methods a Klein app answers for every route by itself, not per operation.
IMPLICIT = {"HEAD", "OPTIONS"}


def routes(app: Any) -> set[tuple[str, str]]:
    """(METHOD, /path/{param}) for every rule of a Klein app but the CORS catch-all."""
    found: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        methods = set(rule.methods or ()) - IMPLICIT
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        found.update((m, path) for m in methods)
    return found


def documented(role: str) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in openapi_document(role)["paths"].items()
            for method in item if method in ("get", "post", "put", "delete", "patch")}


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_the_document_is_valid_openapi_3_1(role: str) -> None:
    document = openapi_document(role)
    assert document["openapi"].startswith("3.1")
    validate(document)


@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_no_role_marks_are_left_in_a_served_document(role: str) -> None:
    assert "x-sandrun-role" not in json.dumps(openapi_document(role))


def test_every_worker_route_is_documented_and_every_documented_path_is_a_route() -> None:
    assert routes(WorkerAPI.app) == documented("worker")


def test_every_coordinator_route_is_documented_and_every_documented_path_is_a_route() -> None:
    assert routes(CoordinatorAPI.app) == documented("coordinator")


def test_only_the_coordinator_document_has_the_pool_and_gateway_errors() -> None:
    worker, coordinator = openapi_document("worker"), openapi_document("coordinator")
    assert "/pool" not in worker["paths"] and "/pool" in coordinator["paths"]
    status = "/status/{job_id}"
    assert "502" not in worker["paths"][status]["get"]["responses"]
    assert "502" in coordinator["paths"][status]["get"]["responses"]


def test_the_worker_serves_its_document_at_openapi_json(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    reply = h.get("/openapi.json")
    assert reply.status == 200 and reply.headers["content-type"] == ["application/json"]
    assert reply.json() == openapi_document("worker")
    assert reply.headers["access-control-allow-origin"] == ["*"]


def test_the_coordinator_serves_its_own_document(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path), 1)
    reply = pool.get("/openapi.json")
    assert reply.status == 200 and reply.json() == openapi_document("coordinator")
    assert reply.json()["info"]["title"] == "Sandrun coordinator"


def test_docs_render_the_document_with_the_bundled_redoc(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    page = h.get("/docs")
    assert page.status == 200 and page.headers["content-type"][0].startswith("text/html")
    scripts = re.findall(rb'<script src="([^"]+)"', page.body)
    assert scripts == [b"/ui/vendor/redoc/redoc.standalone.js"]
    assert b'spec-url="/openapi.json"' in page.body
    assert b"http" not in b"".join(re.findall(rb'(?:src|href)="([^"]+)"', page.body))
    script = h.get(scripts[0].decode())
    assert script.status == 200 and script.headers["content-type"][0].startswith("text/javascript")
    assert len(script.body) > 500_000  # the whole standalone bundle, not a stub
    assert h.get("/ui/vendor/redoc/LICENSE").status == 200


@pytest.mark.parametrize("path", ["/ui/vendor/../openapi.yaml", "/ui/vendor/redoc/nope.js",
                                  "/ui/vendor/%2e%2e/openapi.yaml", "/ui/.hidden",
                                  "/ui/vendor/redoc/"])
def test_a_page_file_outside_the_assets_is_a_json_404(tmp_path: Any, path: str) -> None:
    h = Harness(str(tmp_path))
    reply = h.get(path)
    assert reply.status == 404 and reply.json()["error"] == "Not found"


def test_the_contract_check_catches_a_body_outside_the_schema() -> None:
    worker = Contract("worker")
    worker.check("GET", "/health", 200, "application/json", json.dumps(
        {"status": "healthy", "worker_id": None, "version": "1",
         "load": {"active_jobs": 0, "queued_jobs": 0, "capacity": 2}}).encode())
    with pytest.raises(AssertionError, match="capacity"):
        worker.check("GET", "/health", 200, "application/json", json.dumps(
            {"status": "healthy", "worker_id": None, "version": "1",
             "load": {"active_jobs": 0, "queued_jobs": 0}}).encode())
    with pytest.raises(AssertionError, match="not documented"):
        worker.check("GET", "/status/job-x", 502, "application/json", b"{}")
    with pytest.raises(AssertionError):
        worker.check("GET", "/nowhere", 200, "application/json", b"{}")


# -- the web page ----------------------------------------------------------------------------


@pytest.mark.parametrize("path,accept", [
    ("/ui/", "*/*"), ("/", "text/html,application/xhtml+xml,*/*;q=0.8")])
def test_the_page_is_served_at_ui_and_to_browsers_at_the_root(tmp_path: Any, path: str,
                                                               accept: str) -> None:
    h = Harness(str(tmp_path))
    page = h.get(path, headers={"Accept": accept})
    assert page.status == 200 and (page.header("content-type") or "").startswith("text/html")
    assert b"<title>Sandrun</title>" in page.body
    # Every script and style sheet it loads is served here: nothing from elsewhere.
    assets = re.findall(rb'(?:src|href)="(/ui/[^"]+)"', page.body)
    assert len(assets) >= 10
    for asset in assets:
        assert h.get(asset.decode()).status == 200, asset
    assert not re.findall(rb'(?:src|href)="(?:https?:)?//', page.body)


def test_the_root_still_answers_json_to_programs(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    for accept in (None, "*/*", "application/json"):
        reply = h.get("/", headers={"Accept": accept} if accept else {})
        assert reply.json()["service"] == "sandrun"
        assert reply.header("vary") == "Accept"


def test_the_coordinator_serves_the_page_too(tmp_path: Any) -> None:
    pool = Pool(str(tmp_path), 1)
    assert b"<title>Sandrun</title>" in pool.get("/", headers={"Accept": "text/html"}).body
    assert pool.get("/ui/app.js").status == 200
    assert pool.get("/").json()["service"] == "sandrun-coordinator"


def test_the_bundled_libraries_come_with_their_licences(tmp_path: Any) -> None:
    h = Harness(str(tmp_path))
    for library in ("codemirror", "redoc"):
        licence = h.get(f"/ui/vendor/{library}/LICENSE")
        assert licence.status == 200 and b"Permission is hereby granted" in licence.body
