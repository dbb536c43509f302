"""The OpenAPI document against the app: every route documented, every documented route served, and real
answers of a round that fit the documented schemas."""

from __future__ import annotations

from typing import Any

import jsonschema
import numpy as np
import requests
from openapi_spec_validator import validate

from branchkey_integrations.core import wire
from branchkey_integrations.core.protocol import OPENAPI_PATH, ROUND_PATH
from branchkey_integrations.server.app import create_app
from branchkey_integrations.server.openapi import openapi_document

METHODS = {"get", "post", "put", "patch", "delete"}


def served_routes(app) -> set[tuple[str, str]]:
    """(path, method) of every route the router holds; aiohttp's automatic HEAD twins of GET aside."""
    return {(route.resource.canonical, route.method.lower()) for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None}


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method) for path, item in document["paths"].items() for method in item if method in METHODS}


def test_every_route_is_documented_and_every_documented_route_is_served(tmp_path) -> None:
    document = openapi_document()
    validate(document)  # a well-formed OpenAPI 3.1 document
    served, documented = served_routes(create_app(tmp_path / "data")), documented_routes(document)
    assert served - documented == set(), f"routes without a description in server/openapi.py: {sorted(served - documented)}"
    assert documented - served == set(), f"documented but not served: {sorted(documented - served)}"
    for path, item in document["paths"].items():  # path parameters named in the path are declared, and only those
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            named = {part[1:-1] for part in path.split("/") if part.startswith("{")}
            assert declared == named, (path, method, declared, named)
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)), "operationId must be unique"


class Answers:
    """Checks a real answer against the documented schema of its operation and status."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    def check(self, path: str, method: str, answer: requests.Response) -> Any:
        operation = self.document["paths"][path][method]
        response = operation["responses"].get(str(answer.status_code))
        assert response is not None, f"{method.upper()} {path} answered {answer.status_code}, not documented"
        response = self.document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]] \
            if "$ref" in response else response
        schema = response["content"]["application/json"]["schema"]
        body = answer.json()
        jsonschema.validate(body, {"allOf": [schema], "components": self.document["components"]})
        return body


def test_real_answers_fit_the_document(live) -> None:
    served = requests.get(live.url + OPENAPI_PATH, timeout=10)  # no credentials needed
    assert served.status_code == 200 and served.json() == openapi_document()
    answers = Answers(served.json())
    headers = {"Authorization": f"Bearer {live.admin_token}"}

    def admin(method: str, path: str, template: str, body: dict | None = None) -> Any:
        answer = requests.request(method, live.url + path, json=body, headers=headers, timeout=10)
        return answers.check(template, method.lower(), answer)["data"]

    tree = admin("POST", "/admin/v1/trees", "/admin/v1/trees", {"name": "t"})
    branch = admin("POST", f"/admin/v1/trees/{tree['id']}/branches", "/admin/v1/trees/{tree_id}/branches",
                   {"name": "b", "round_deadline_s": 600})
    leaves = admin("POST", f"/admin/v1/branches/{branch['id']}/leaves", "/admin/v1/branches/{branch_id}/leaves",
                   {"count": 2})["leaves"]
    a, b = leaves
    round_path = ROUND_PATH.format(branch_id=branch["id"])
    answers.check(ROUND_PATH, "get", requests.get(live.url + round_path, headers=live.auth(a), timeout=10))
    answers.check("/api/v1/file/upload", "post", live.upload(b, wire.encode([np.zeros(3, np.float32)], 1.0)))
    answers.check("/api/v1/file/upload", "post", live.upload(a, wire.encode([np.ones(2, np.float32)], 1.0)))  # 400
    for leaf in leaves:
        answers.check("/api/v1/file/upload", "post", live.upload(leaf, wire.encode([np.ones(3, np.float32)], 2.0)))
    aggregate_id = live.wait_aggregate(branch["id"])
    progress = answers.check(ROUND_PATH, "get", requests.get(live.url + round_path, headers=live.auth(a), timeout=10))
    assert progress["data"]["latest_aggregate"]["aggregation_id"] == aggregate_id
    answers.check("/api/v1/file/download/{file_id}", "get", live.download(a, aggregate_id))
    answers.check("/api/v1/run/{branch_id}", "get",
                  requests.get(f"{live.url}/api/v1/run/{branch['id']}", headers=live.auth(a), timeout=10))
    answers.check("/api/v1/config/branch/{branch_id}", "get",
                  requests.get(f"{live.url}/api/v1/config/branch/{branch['id']}", headers=live.auth(a), timeout=10))
    answers.check("/api/v1/ws/ticket", "post", requests.post(live.url + "/api/v1/ws/ticket", headers=live.auth(a), timeout=10))
    metrics = {"mode": "test", "leaf_id": a["id"], "branch_id": a["branch_id"], "tree_id": a["tree_id"],
               "data": '{"accuracy": 0.5}', "aggregation_id": aggregate_id}
    answers.check("/api/v1/performance/analysis", "post",
                  requests.post(live.url + "/api/v1/performance/analysis", json=metrics, headers=live.auth(a), timeout=10))
    for suffix in ("", "/rounds", "/uploads", "/aggregates", "/metrics", "/leaves"):
        admin("GET", f"/admin/v1/branches/{branch['id']}{suffix}", "/admin/v1/branches/{branch_id}" + suffix)
    admin("GET", "/admin/v1/branches", "/admin/v1/branches")
    admin("GET", "/admin/v1/trees", "/admin/v1/trees")
    admin("POST", f"/admin/v1/branches/{branch['id']}/run", "/admin/v1/branches/{branch_id}/run", {"run_status": "pause"})
    answers.check("/api/v1/file/upload", "post", live.upload(a, wire.encode([np.ones(3, np.float32)], 2.0)))  # 409
    stopped = requests.get(live.url + round_path, headers=live.auth(b), timeout=10)
    assert answers.check(ROUND_PATH, "get", stopped)["data"]["run_status"] == "pause"


def test_a_method_a_route_lacks_is_405_with_the_routes_methods_in_allow(live) -> None:
    """RFC 9110: a 405 names the methods the route has (Schemathesis found it missing on every route)."""
    document = openapi_document()
    for path, item in document["paths"].items():
        concrete = "/".join("x1" if part.startswith("{") else part for part in path.split("/"))
        answer = requests.request("PATCH", live.url + concrete, timeout=10)
        assert answer.status_code == 405, (path, answer.status_code)
        allowed = {method.strip().lower() for method in answer.headers["Allow"].split(",")}
        assert allowed >= set(item) and answer.json()["error"], (path, answer.headers["Allow"])


BRANCH_BODIES = [
    {}, {"name": "b", "min_leaves": 2.0}, {"min_leaves": 2.5}, {"name": " "}, {"round_deadline_s": 0},
    {"strategy": "fedadam", "strategy_params": {"eta": 0.5}}, {"strategy": "fedadam", "strategy_params": {"momentum": 0.5}},
    {"strategy_params": {"eta": 1}}, {"strategy_params": None}, {"strategy": "trimmed-mean", "strategy_params": {"beta": 0.5}},
    {"strategy": "trimmed-mean", "strategy_params": {"beta": 0.49}}, {"strategy": "nope"},
]


def test_the_document_and_the_server_agree_on_admin_bodies(live) -> None:
    """Disagreements Schemathesis found: JSON Schema's integer 2.0, a blank name, a strategy's own parameters and
    their ranges, a body of optional fields left out, fields of the wrong kind."""
    document = openapi_document()

    def valid(schema_name: str, body: Any) -> bool:
        schema = {"allOf": [{"$ref": f"#/components/schemas/{schema_name}"}], "components": document["components"]}
        return jsonschema.Draft202012Validator(schema).is_valid(body)

    tree = live.admin("POST", "/admin/v1/trees", None, expect=201)  # no body: every field is optional
    for body in BRANCH_BODIES:
        answer = requests.post(f"{live.url}/admin/v1/trees/{tree['id']}/branches", json=body, timeout=10,
                               headers={"Authorization": f"Bearer {live.admin_token}"})
        assert answer.status_code == (201 if valid("BranchRequest", body) else 400), (body, answer.text)
    branch, _ = live.make_branch(1)
    leaves = f"/admin/v1/branches/{branch['id']}/leaves"
    assert [leaf["name"] for leaf in live.admin("POST", leaves, {"count": 2.0}, expect=201)["leaves"]] == \
        ["leaf_2", "leaf_3"]
    for body in ({"name_prefix": 5}, {"name_prefix": " "}):
        assert not valid("LeavesRequest", body) and "name_prefix" in live.admin("POST", leaves, body, expect=400)["error"]
    note = {"note": {"text": "x"}}
    assert "note" in live.admin("POST", f"/admin/v1/branches/{branch['id']}/rounds/open/reset", note, expect=400)["error"]
    assert "note" in live.admin("DELETE", f"/admin/v1/branches/{branch['id']}/rounds/open/uploads/leaf_1", note,
                                expect=400)["error"]
