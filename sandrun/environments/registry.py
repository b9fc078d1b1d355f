"""Where built templates live, and what ``/environments`` reports.

Layout under the registry root (``/var/lib/sandrun/environments`` by default)::

    <name>                 symlink to the current build, swapped atomically by a rebuild
    .builds/<name>-<id>/   one build: site-packages/, sandrun-env.json, READY (written last)
    .builds/<name>.lock    held while ``sandrun env build <name>`` runs

A build directory is complete exactly when it holds ``READY``: the builder
writes the manifest, then ``READY``, and only then points ``<name>`` at it.
Jobs bind the resolved build directory (not the symlink) read-only at
``/opt/env``, so a rebuild never changes what a running job sees; the builder
keeps the previous build for that reason and deletes older ones.

Pure stdlib and cheap (a readlink and two small reads per template): safe to
call on the reactor thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sandrun.environments.templates import DEFAULT_TEMPLATE, TEMPLATES, Template

__all__ = [
    "DEFAULT_ROOT",
    "MANIFEST",
    "READY",
    "SITE_PACKAGES",
    "BuiltEnvironment",
    "EnvironmentNotBuilt",
    "EnvironmentUnavailable",
    "Registry",
    "UnknownEnvironment",
]

DEFAULT_ROOT = "/var/lib/sandrun/environments"
BUILDS = ".builds"
MANIFEST = "sandrun-env.json"
READY = "READY"
SITE_PACKAGES = "site-packages"


class EnvironmentUnavailable(Exception):
    """A job names an environment this worker cannot give it: the API answers 400.

    ``message`` is the short error, ``details`` says what to do about it.
    """

    def __init__(self, name: str, message: str, details: str) -> None:
        super().__init__(f"{message}: {details}")
        self.name = name
        self.message = message
        self.details = details


class UnknownEnvironment(EnvironmentUnavailable):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(name, "Unknown environment",
                         f"environment {name!r} is not a template; GET /environments lists "
                         f"them: {', '.join(known)}")


class EnvironmentNotBuilt(EnvironmentUnavailable):
    def __init__(self, name: str) -> None:
        super().__init__(name, "Environment not built",
                         f"environment {name!r} is not built on this worker; an admin builds "
                         f"it with: sandrun env build {name}")


@dataclass(frozen=True)
class BuiltEnvironment:
    """One complete build of a template, as its manifest records it."""

    name: str
    prefix: str  # the build directory (resolved, no symlink): bound at /opt/env
    packages: tuple[str, ...]  # the pinned list it was built from
    installed: tuple[str, ...]  # every distribution installed, ``name==version``
    fingerprint: str  # of the pinned list; differs from the template's when stale
    python: str  # ``major.minor`` of the interpreter it was built for
    built_at: str  # ISO 8601 UTC

    @property
    def site_packages(self) -> str:
        return os.path.join(self.prefix, SITE_PACKAGES)


class Registry:
    """The templates this project defines and the builds this worker has of them.

    A job that names no environment gets ``default`` when it is built, and
    the host's interpreters alone (no extra packages) while it is not, so a
    fresh worker serves jobs at once.  A job that names a template, ``default``
    included, gets that build or a 400 saying how to build it.
    """

    def __init__(self, root: str = DEFAULT_ROOT,
                 templates: Mapping[str, Template] = TEMPLATES) -> None:
        self.root = root
        self.templates = templates

    def link(self, name: str) -> str:
        return os.path.join(self.root, name)

    def builds_dir(self) -> str:
        return os.path.join(self.root, BUILDS)

    def template(self, name: str) -> Template:
        try:
            return self.templates[name]
        except KeyError:
            known = [n for n, t in self.templates.items() if not t.ci_only or self.built(n)]
            raise UnknownEnvironment(name, known) from None

    def built(self, name: str) -> BuiltEnvironment | None:
        """The current complete build of ``name``, or None."""
        try:
            target = os.readlink(self.link(name))
        except OSError:
            return None
        builds = os.path.realpath(self.builds_dir())
        prefix = os.path.realpath(os.path.join(self.root, target))
        if os.path.dirname(prefix) != builds:  # only our own builds, never a stray link
            return None
        if not os.path.isfile(os.path.join(prefix, READY)):
            return None
        return read_manifest(prefix)

    def require(self, name: str | None) -> BuiltEnvironment | None:
        """The build a job naming ``name`` gets; None means the host's interpreters alone.

        ``name`` None (the job named none): ``default``'s build if there is one.
        Raises ``UnknownEnvironment`` or ``EnvironmentNotBuilt`` (both
        ``EnvironmentUnavailable``, a 400 for the API).
        """
        if name is None:
            return self.built(DEFAULT_TEMPLATE) if DEFAULT_TEMPLATE in self.templates else None
        self.template(name)
        built = self.built(name)
        if built is None:
            raise EnvironmentNotBuilt(name)
        return built

    def describe(self) -> dict[str, Any]:
        """The ``GET /environments`` document (``shared/spec/api.md``)."""
        environments = []
        for name, template in self.templates.items():
            built = self.built(name)
            if template.ci_only and built is None:
                continue
            environments.append({"name": name, "description": template.description,
                                 "packages": list(template.packages),
                                 "ready": built is not None})
        unnamed = self.require(None)
        return {"templates": [e["name"] for e in environments], "environments": environments,
                # What a job that names no environment gets: null is the host's
                # interpreters with their standard libraries and no extra packages.
                "unnamed": unnamed.name if unnamed is not None else None}


def read_manifest(prefix: str) -> BuiltEnvironment | None:
    try:
        with open(os.path.join(prefix, MANIFEST), encoding="utf-8") as f:
            data = json.load(f)
        return BuiltEnvironment(
            name=data["name"], prefix=prefix, packages=tuple(data["packages"]),
            installed=tuple(data["installed"]), fingerprint=data["fingerprint"],
            python=data["python"], built_at=data["built_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
