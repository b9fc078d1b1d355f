"""What /environments reports, and which templates a job may name."""

from __future__ import annotations

import json
import os

import pytest

from sandrun.environments.registry import (
    BUILDS,
    MANIFEST,
    READY,
    EnvironmentNotBuilt,
    Registry,
    UnknownEnvironment,
)
from sandrun.environments.templates import PINNED, TEMPLATES, Template

TEMPLATES_FOR_TESTS = {
    "default": Template("default", "the default", ("six==1.16.0",)),
    "vision": Template("vision", "images", ("pillow==10.3.0", "numpy==1.26.4")),
    "test-tiny": Template("test-tiny", "for tests", ("six==1.16.0",), ci_only=True),
}


def fake_build(root: str, template: Template, *, ready: bool = True,
               fingerprint: str | None = None) -> str:
    """A build directory as the builder leaves it, without running pip."""
    build_id = f"{template.name}-20260101T000000-abcdef"
    prefix = os.path.join(root, BUILDS, build_id)
    os.makedirs(os.path.join(prefix, "site-packages"))
    with open(os.path.join(prefix, MANIFEST), "w") as f:
        json.dump({"name": template.name, "description": template.description,
                   "packages": list(template.packages),
                   "fingerprint": fingerprint or template.fingerprint,
                   "installed": list(template.packages), "python": "3.11",
                   "built_at": "2026-01-01T00:00:00Z"}, f)
    if ready:
        open(os.path.join(prefix, READY), "w").close()
    os.symlink(os.path.join(BUILDS, build_id), os.path.join(root, template.name))
    return prefix


def test_the_project_templates_are_all_pinned_and_named_as_the_issue_asks() -> None:
    assert {"default", "ml-basic", "vision", "nlp", "data-science", "scientific",
            "test-tiny"} == set(TEMPLATES)
    for template in TEMPLATES.values():
        assert template.packages and template.imports
        assert all(PINNED.fullmatch(p) for p in template.packages)
    with pytest.raises(ValueError, match="not pinned"):
        Template("x", "x", ("numpy>=1",))


def test_nothing_built_reports_every_template_not_ready_and_hides_test_templates(
        tmp_path: str) -> None:
    registry = Registry(str(tmp_path), TEMPLATES_FOR_TESTS)
    document = registry.describe()
    assert document == {
        "templates": ["default", "vision"],
        "environments": [
            {"name": "default", "description": "the default", "packages": ["six==1.16.0"],
             "ready": False},
            {"name": "vision", "description": "images",
             "packages": ["pillow==10.3.0", "numpy==1.26.4"], "ready": False}],
        "unnamed": None}


def test_a_complete_build_is_ready_and_is_what_a_job_binds(tmp_path: str) -> None:
    root = str(tmp_path)
    prefix = fake_build(root, TEMPLATES_FOR_TESTS["vision"])
    fake_build(root, TEMPLATES_FOR_TESTS["test-tiny"])
    registry = Registry(root, TEMPLATES_FOR_TESTS)
    ready = {e["name"]: e["ready"] for e in registry.describe()["environments"]}
    assert ready == {"default": False, "vision": True, "test-tiny": True}
    built = registry.require("vision")
    assert built is not None
    assert built.prefix == os.path.realpath(prefix)  # the build itself, not the symlink
    assert built.site_packages == os.path.join(built.prefix, "site-packages")
    assert built.packages == ("pillow==10.3.0", "numpy==1.26.4")


def test_a_build_without_its_ready_marker_is_not_ready(tmp_path: str) -> None:
    fake_build(str(tmp_path), TEMPLATES_FOR_TESTS["vision"], ready=False)
    registry = Registry(str(tmp_path), TEMPLATES_FOR_TESTS)
    assert registry.built("vision") is None
    with pytest.raises(EnvironmentNotBuilt):
        registry.require("vision")


def test_a_link_that_points_outside_the_builds_is_ignored(tmp_path: str) -> None:
    root = str(tmp_path)
    elsewhere = os.path.join(root, "elsewhere")
    os.makedirs(elsewhere)
    open(os.path.join(elsewhere, READY), "w").close()
    os.symlink(elsewhere, os.path.join(root, "vision"))
    assert Registry(root, TEMPLATES_FOR_TESTS).built("vision") is None


def test_an_unbuilt_template_is_refused_with_the_command_that_builds_it(
        tmp_path: str) -> None:
    registry = Registry(str(tmp_path), TEMPLATES_FOR_TESTS)
    with pytest.raises(EnvironmentNotBuilt) as caught:
        registry.require("vision")
    assert caught.value.message == "Environment not built"
    assert "sandrun env build vision" in caught.value.details


def test_an_unknown_template_is_refused_listing_the_known_ones(tmp_path: str) -> None:
    registry = Registry(str(tmp_path), TEMPLATES_FOR_TESTS)
    with pytest.raises(UnknownEnvironment) as caught:
        registry.require("visoin")
    assert caught.value.message == "Unknown environment"
    assert "'visoin'" in caught.value.details
    assert "default, vision" in caught.value.details and "test-tiny" not in caught.value.details


def test_a_job_naming_no_environment_gets_default_once_built_and_naming_it_unbuilt_is_refused(
        tmp_path: str) -> None:
    registry = Registry(str(tmp_path), TEMPLATES_FOR_TESTS)
    assert registry.require(None) is None  # the host's interpreters alone
    assert registry.describe()["unnamed"] is None
    with pytest.raises(EnvironmentNotBuilt):
        registry.require("default")
    fake_build(str(tmp_path), TEMPLATES_FOR_TESTS["default"])
    assert registry.require("default") is not None
    built = registry.require(None)
    assert built is not None and built.name == "default"
    assert registry.describe()["unnamed"] == "default"
