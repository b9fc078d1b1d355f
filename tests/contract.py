"""Check real responses against the OpenAPI document (``sandrun/static/openapi.yaml``).

``check_response(role, method, path, status, content_type, body)`` raises
``AssertionError`` naming what does not match: an undocumented status for the
operation, an undocumented content type, or a JSON body outside its schema.
Paths the document does not describe (an unknown path is a 404) must still
answer with the contract's error shape.

The integration tests' worker client calls it on every response it gets
(``tests/integration/worker.py``), so every new field or status a route
gains must be described in the document.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from sandrun.pages import openapi_document

BASE = "urn:sandrun:openapi"
METHODS = ("get", "post", "put", "delete", "patch", "head", "options")


class Contract:
    """One role's document, with its path templates compiled and its refs resolvable."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.document = openapi_document(role)
        resource = Resource.from_contents(self.document, default_specification=DRAFT202012)
        self.registry: Registry[Any] = Registry().with_resource(BASE, resource)
        self.templates = [(template, _template_regex(template))
                          for template in self.document["paths"]]

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]] | None:
        """The documented operation for a request path (query left off), or None."""
        route = path.split("?", 1)[0]
        # Literal paths win over templates (``/ui/`` before ``/ui/{name}``).
        for template, regex in sorted(self.templates, key=lambda t: "{" in t[0]):
            if regex.fullmatch(route):
                op = self.document["paths"][template].get(method.lower())
                return (template, op) if op is not None else None
        return None

    def resolve(self, node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            pointer = node["$ref"].lstrip("#/").split("/")
            target: Any = self.document
            for part in pointer:
                target = target[part.replace("~1", "/").replace("~0", "~")]
            node = target
        return node

    def validate(self, schema: dict[str, Any], value: Any, where: str) -> None:
        validator = jsonschema.Draft202012Validator(
            {"$ref": BASE + "#" + schema_pointer(self.document, schema)}
            if "$ref" not in schema else
            {"$ref": BASE + schema["$ref"]}, registry=self.registry)
        errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            first = errors[0]
            raise AssertionError(
                f"{where}: the body does not match the OpenAPI schema at "
                f"{list(first.absolute_path)}: {first.message}\nbody: {_short(value)}")

    def check(self, method: str, path: str, status: int, content_type: str | None,
              body: bytes) -> None:
        found = self.operation(method, path)
        kind = (content_type or "").split(";")[0].strip().lower()
        if found is None:
            # Undescribed (unknown path, or a method the path lacks): the contract's error.
            if method.upper() == "OPTIONS" and status == 204:
                return
            where = f"{method} {path.split('?')[0]} ({self.role}, undocumented) -> {status}"
            assert status in (400, 404, 405), where
            if kind == "application/json":
                self.validate({"$ref": "#/components/schemas/Error"}, json.loads(body), where)
            return
        template, op = found
        where = f"{method} {template} ({self.role}) -> {status}"
        responses = op.get("responses", {})
        response = responses.get(str(status)) or responses.get("default")
        assert response is not None, \
            f"{where}: status {status} is not documented (documented: {sorted(responses)})"
        response = self.resolve(response)
        content = response.get("content")
        if not content:
            return
        media = content.get(kind)
        assert media is not None or "*/*" in content, \
            f"{where}: content type {kind!r} is not documented ({sorted(content)})"
        if media is not None and kind == "application/json" and "schema" in media:
            try:
                value = json.loads(body)
            except ValueError:
                raise AssertionError(f"{where}: not JSON: {body[:200]!r}") from None
            self.validate(media["schema"], value, where)


def schema_pointer(document: dict[str, Any], schema: dict[str, Any]) -> str:
    """The JSON pointer of an inline schema object inside the document (by identity)."""
    found = _find(document, schema, "")
    assert found is not None, "the schema is not part of the document"
    return found


def _find(node: Any, target: Any, at: str) -> str | None:
    if node is target:
        return at
    items: Any = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(value, (dict, list)):
            part = str(key).replace("~", "~0").replace("/", "~1")
            found = _find(value, target, f"{at}/{part}")
            if found is not None:
                return found
    return None


def _template_regex(template: str) -> re.Pattern[str]:
    # A parameter takes one segment, except the last one of a download or page file path.
    pattern = ""
    for piece in re.split(r"(\{[^}]+\})", template):
        if piece.startswith("{"):
            pattern += "(.+)" if piece in ("{path}", "{name}") else "([^/]+)"
        else:
            pattern += re.escape(piece)
    return re.compile(pattern)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) < 600 else text[:600] + "..."


@functools.lru_cache(maxsize=2)
def contract(role: str) -> Contract:
    return Contract(role)


def check_response(role: str, method: str, path: str, status: int, content_type: str | None,
                   body: bytes) -> None:
    contract(role).check(method, path, status, content_type, body)
