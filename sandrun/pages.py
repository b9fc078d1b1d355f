"""What the worker and the coordinator serve besides the API: the OpenAPI document, its
rendering at ``/docs``, and the web page at ``/ui/`` (and at ``/`` for browsers).

A wire module, like ``sandrun.httpjson``: it imports nothing else from Sandrun,
so the coordinator may import it too.  Every file comes from ``sandrun/static``
inside the package (no CDN: the page works with no internet); each is read once,
on first use, and kept in memory.

``static/openapi.yaml`` is one document for both: what only the coordinator
serves is marked ``x-sandrun-role: coordinator`` and is left out of the worker's.
"""

from __future__ import annotations

import functools
import json
import mimetypes
from importlib import resources
from typing import Any

from twisted.web.iweb import IRequest

from sandrun.httpjson import APIError, cors, write_error

ROLES = ("worker", "coordinator")
ROLE_KEY = "x-sandrun-role"
# The page's own files, under static/ui/, and the front-end libraries it loads,
# under static/vendor/ (each with its licence).  Nothing else is served.
ASSET_DIRS = ("ui", "vendor")
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".html": "text/html; charset=utf-8", ".txt": "text/plain; charset=utf-8",
          ".svg": "image/svg+xml"}


def _version() -> str:
    """The installed package's version: the document describes this release's API."""
    from importlib import metadata  # here, with csv and the rest: for one document

    try:
        return metadata.version("sandrun")
    except metadata.PackageNotFoundError:
        return "unknown"


def _static() -> Any:
    return resources.files("sandrun") / "static"


@functools.lru_cache(maxsize=1)
def _source() -> dict[str, Any]:
    import yaml  # here: a worker that never serves the document need not hold PyYAML

    loaded: dict[str, Any] = yaml.safe_load((_static() / "openapi.yaml").read_text("utf-8"))
    return loaded


def _for_role(node: Any, role: str) -> Any:
    """A copy of ``node`` without the parts marked for another role, and without the marks."""
    if isinstance(node, dict):
        return {key: _for_role(value, role) for key, value in node.items()
                if key != ROLE_KEY and not (isinstance(value, dict)
                                             and value.get(ROLE_KEY, role) != role)}
    if isinstance(node, list):
        return [_for_role(item, role) for item in node]
    return node


@functools.lru_cache(maxsize=len(ROLES))
def _document_json(role: str) -> bytes:
    return json.dumps(openapi_document(role)).encode()


def openapi_document(role: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of a ``worker`` or a ``coordinator`` (a fresh copy)."""
    if role not in ROLES:
        raise ValueError(f"role is one of {ROLES}, not {role!r}")
    document: dict[str, Any] = _for_role(_source(), role)
    document["info"]["title"] = "Sandrun worker" if role == "worker" \
        else "Sandrun coordinator"
    document["info"]["version"] = _version()
    return document


def serve_openapi(request: IRequest, role: str) -> bytes:
    request.setHeader(b"Content-Type", b"application/json")
    cors(request)
    return _document_json(role)


@functools.lru_cache(maxsize=64)
def _asset(name: str) -> tuple[bytes, str] | None:
    """A file of the page by its path under static/ (``ui/app.js``), or None."""
    parts = name.split("/")
    if len(parts) < 2 or parts[0] not in ASSET_DIRS \
            or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        return None
    node = _static()
    for part in parts:
        node = node / part
    if not node.is_file():
        return None
    suffix = "." + parts[-1].rsplit(".", 1)[-1] if "." in parts[-1] else ""
    kind = _TYPES.get(suffix) or mimetypes.guess_type(parts[-1])[0] or \
        "application/octet-stream"
    return node.read_bytes(), kind


def _send(request: IRequest, body: bytes, kind: str) -> bytes:
    request.setHeader(b"Content-Type", kind.encode())
    # Nothing here changes while the process runs; the page's own files are small.
    request.setHeader(b"Cache-Control", b"public, max-age=300")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    cors(request)
    return body


def serve_asset(request: IRequest, name: str) -> bytes:
    """``/ui/<name>``: ``ui/...`` from the page's own files, ``vendor/...`` a library."""
    found = _asset(name if name.startswith("vendor/") else "ui/" + name)
    if found is None:
        return write_error(request, APIError(404, "Not found", "no such file"))
    return _send(request, *found)


def serve_page(request: IRequest) -> bytes:
    """``/ui/`` (and ``/`` for a browser): the page to write, run and watch jobs."""
    found = _asset("ui/index.html")
    assert found is not None, "sandrun/static/ui/index.html is part of the package"
    return _send(request, *found)


def serve_docs(request: IRequest) -> bytes:
    """``/docs``: the OpenAPI document rendered by the bundled Redoc."""
    found = _asset("ui/docs.html")
    assert found is not None, "sandrun/static/ui/docs.html is part of the package"
    return _send(request, *found)


def wants_html(request: IRequest) -> bool:
    """Whether the client is a browser asking for a page (``Accept`` names ``text/html``).

    Programs (curl, requests, treq) send ``*/*`` or nothing, and get JSON.  The
    answer is marked ``Vary: Accept`` either way, so a cache keeps both apart.
    """
    request.setHeader(b"Vary", b"Accept")
    accept = request.getHeader(b"accept") or b""
    if isinstance(accept, str):
        accept = accept.encode("latin-1")
    return b"text/html" in accept.lower()
