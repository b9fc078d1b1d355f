"""``sandrun env build``: wheels into a new prefix, checked, then swapped in atomically."""

from __future__ import annotations

import fcntl
import json
import os
import stat

import pytest

from sandrun.cli import build_parser
from sandrun.environments.builder import BuildError, build, check
from sandrun.environments.cli import run_env_command
from sandrun.environments.registry import BUILDS, MANIFEST, READY, Registry
from sandrun.environments.templates import TEMPLATES, Template

from .helpers import make_wheel, needs_network


def local_index(tmp_path: str) -> tuple[str, ...]:
    index = os.path.join(tmp_path, "index")
    os.makedirs(index, exist_ok=True)
    make_wheel(index, "sandrun-probe", "1.0", "VALUE = 42\n__version__ = '1.0'\n")
    return ("--no-index", "--find-links", index)


PROBE = Template("probe", "a local wheel", ("sandrun-probe==1.0",), imports=("sandrun_probe",))
BROKEN = Template("broken", "imports what it lacks", ("sandrun-probe==1.0",),
                  imports=("sandrun_probe", "no_such_module_7f3a"))


@needs_network
def test_the_test_tiny_template_builds_for_real_and_becomes_ready(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "envs")
    registry = Registry(root)
    lines: list[str] = []
    built = build(TEMPLATES["test-tiny"], registry, timeout=120, progress=lines.append)
    assert [line[:5] for line in lines if line.startswith("[")] == [
        "[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "    six 1.16.0" in lines  # imported (as nobody) after the install
    assert built.installed == ("six==1.16.0",)
    assert registry.built("test-tiny") == built
    assert os.path.isfile(os.path.join(built.site_packages, "six.py"))
    assert os.readlink(os.path.join(root, "test-tiny")) == os.path.join(
        BUILDS, os.path.basename(built.prefix))
    for top, dirs, files in os.walk(built.prefix):  # root-owned, nobody else may write
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            assert st.st_uid == os.geteuid()
            assert not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            assert st.st_mode & stat.S_IROTH
    ready = {e["name"]: e["ready"] for e in registry.describe()["environments"]}
    assert ready["test-tiny"] is True and ready["vision"] is False


def test_a_rebuild_swaps_the_link_keeps_the_previous_build_and_deletes_older_ones(
        tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "envs")
    registry = Registry(root, {"probe": PROBE})
    pip_args = local_index(str(tmp_path))
    first = build(PROBE, registry, pip_args=pip_args, progress=lambda _: None)
    second = build(PROBE, registry, pip_args=pip_args, progress=lambda _: None)
    assert registry.built("probe") == second
    assert {first.prefix, second.prefix} == {
        os.path.join(root, BUILDS, b) for b in os.listdir(os.path.join(root, BUILDS))
        if not b.endswith(".lock")}
    third = build(PROBE, registry, pip_args=pip_args, progress=lambda _: None)
    assert not os.path.exists(first.prefix)  # two builds back: nobody can still bind it
    assert os.path.isdir(second.prefix) and registry.built("probe") == third
    with open(os.path.join(third.prefix, MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest["packages"] == ["sandrun-probe==1.0"]
    assert manifest["fingerprint"] == PROBE.fingerprint
    assert check(registry, "probe", progress=lambda _: None) == third


def test_a_build_whose_imports_fail_is_never_made_current(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "envs")
    registry = Registry(root, {"broken": BROKEN})
    with pytest.raises(BuildError, match="importing failed: .*no_such_module_7f3a"):
        build(BROKEN, registry, pip_args=local_index(str(tmp_path)), progress=lambda _: None)
    assert registry.built("broken") is None
    assert not os.path.lexists(os.path.join(root, "broken"))
    assert os.listdir(os.path.join(root, BUILDS)) == ["broken.lock"]  # no half-build left


def test_a_failed_pip_install_is_a_build_error(tmp_path: str) -> None:
    missing = Template("missing", "x", ("sandrun-absent==1.0",))
    registry = Registry(os.path.join(str(tmp_path), "envs"), {"missing": missing})
    with pytest.raises(BuildError, match="pip failed for missing"):
        build(missing, registry, pip_args=local_index(str(tmp_path)), progress=lambda _: None)
    assert registry.built("missing") is None


def test_two_builds_of_one_template_cannot_run_at_once(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "envs")
    os.makedirs(os.path.join(root, BUILDS))
    with open(os.path.join(root, BUILDS, "probe.lock"), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BuildError, match="another build of probe is running"):
            build(PROBE, Registry(root, {"probe": PROBE}), progress=lambda _: None)


def test_the_env_commands_are_wired_into_the_sandrun_cli(
        tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = os.path.join(str(tmp_path), "envs")
    args = build_parser().parse_args(["env", "--root", root, "list", "--json"])
    assert run_env_command(args) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["templates"] == ["default", "ml-basic", "vision", "nlp", "data-science",
                                     "scientific"]
    args = build_parser().parse_args(["env", "--root", root, "build", "no-such-template"])
    assert run_env_command(args) == 2
    assert "not a template" in capsys.readouterr().err
    args = build_parser().parse_args(["env", "--root", root, "check", "vision"])
    assert run_env_command(args) == 1
    assert "sandrun env build vision" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(root, READY))
