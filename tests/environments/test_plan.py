"""What a job gets: read-only binds, variables, and an install step for inside its sandbox."""

from __future__ import annotations

import os

import pytest

from sandrun.environments.fetch import DependencyCache, Fetched
from sandrun.environments.plan import (
    DEPS_MOUNT,
    ENV_MOUNT,
    Environments,
    build_plan,
    merge_env,
    read_job_file,
)
from sandrun.environments.registry import EnvironmentNotBuilt, Registry
from sandrun.environments.requirements import DependencyError
from sandrun.jobs.manifest import Manifest

from .helpers import make_wheel
from .test_registry import TEMPLATES_FOR_TESTS, fake_build


def test_no_template_and_no_requirements_is_an_empty_plan() -> None:
    plan = build_plan("default", None, None)
    assert (plan.ro_binds, plan.env, plan.install_argv, plan.log) == ((), (), None, "")


def test_a_built_template_is_bound_read_only_at_opt_env_and_put_on_pythonpath(
        tmp_path: str) -> None:
    prefix = fake_build(str(tmp_path), TEMPLATES_FOR_TESTS["vision"])
    built = Registry(str(tmp_path), TEMPLATES_FOR_TESTS).require("vision")
    plan = build_plan("vision", built, None)
    assert plan.ro_binds == ((os.path.realpath(prefix), ENV_MOUNT),)
    assert dict(plan.env) == {"PYTHONPATH": "/opt/env/site-packages"}
    assert plan.install_argv is None


def test_pip_dependencies_install_inside_from_opt_deps_on_top_of_the_template(
        tmp_path: str) -> None:
    fake_build(str(tmp_path), TEMPLATES_FOR_TESTS["vision"])
    built = Registry(str(tmp_path), TEMPLATES_FOR_TESTS).require("vision")
    fetched = Fetched("pip", "/cache/pip/abc", ("six-1.16.0-py2.py3-none-any.whl",))
    plan = build_plan("vision", built, fetched)
    assert plan.ro_binds[1] == ("/cache/pip/abc", DEPS_MOUNT)
    # The job's own packages come first: they layer on top of the template.
    assert dict(plan.env)["PYTHONPATH"] == "/job/.deps/python:/opt/env/site-packages"
    argv = plan.install_argv
    assert argv is not None and argv[:5] == ("python3", "-I", "-m", "pip", "install")
    assert "--no-index" in argv and "--only-binary=:all:" in argv
    assert argv[argv.index("--find-links") + 1] == "/opt/deps/wheels"
    assert argv[argv.index("--target") + 1] == "/job/.deps/python"
    assert argv[-1] == "/opt/deps/requirements.txt"
    assert plan.output_excludes == (".deps/",)
    assert "six-1.16.0-py2.py3-none-any.whl" in plan.log


def test_npm_dependencies_are_linked_and_on_node_path() -> None:
    plan = build_plan("default", None, Fetched("npm", "/cache/npm/abc", ("is-number@7.0.0",),
                                               ("x: its install step was not run",)))
    assert plan.ro_binds == (("/cache/npm/abc", DEPS_MOUNT),)
    assert dict(plan.env) == {"NODE_PATH": "/opt/deps/node_modules"}
    assert plan.install_argv is not None and plan.install_argv[:2] == ("sh", "-c")
    assert "ln -s /opt/deps/node_modules /job/node_modules" in plan.install_argv[2]
    assert "warning: x: its install step was not run" in plan.log


def test_gems_install_locally_inside_and_are_on_gem_path() -> None:
    plan = build_plan("default", None, Fetched("gem", "/cache/gem/abc", ("a-1.gem", "b-2.gem")))
    assert dict(plan.env) == {"GEM_PATH": "/job/.deps/ruby"}
    assert plan.install_argv is not None
    assert plan.install_argv[:3] == ("gem", "install", "--local")
    assert plan.install_argv[-2:] == ("/opt/deps/gems/a-1.gem", "/opt/deps/gems/b-2.gem")


def test_the_manifest_env_wins_and_its_search_paths_come_first() -> None:
    additions = (("NODE_PATH", "/opt/deps/node_modules"), ("PYTHONPATH", "/opt/env/site-packages"))
    merged = dict(merge_env((("FOO", "1"), ("PYTHONPATH", "/job/lib")), additions))
    assert merged == {"FOO": "1", "NODE_PATH": "/opt/deps/node_modules",
                      "PYTHONPATH": "/job/lib:/opt/env/site-packages"}


def test_the_requirements_file_is_read_without_following_links(tmp_path: str) -> None:
    job = str(tmp_path)
    os.makedirs(os.path.join(job, "sub"))
    with open(os.path.join(job, "sub", "requirements.txt"), "w") as f:
        f.write("six==1.16.0\n")
    assert read_job_file(job, "sub/requirements.txt") == b"six==1.16.0\n"
    os.symlink("/etc/passwd", os.path.join(job, "requirements.txt"))
    with pytest.raises(DependencyError, match="no such file"):
        read_job_file(job, "requirements.txt")
    os.symlink(os.path.join(job, "sub"), os.path.join(job, "linked"))
    with pytest.raises(DependencyError, match="no such file"):
        read_job_file(job, "linked/requirements.txt")
    with pytest.raises(DependencyError, match="no such file"):
        read_job_file(job, "missing.txt")
    os.mkfifo(os.path.join(job, "Gemfile"))
    with pytest.raises(DependencyError, match="not a regular file"):
        read_job_file(job, "Gemfile")


def test_prepare_fetches_from_a_local_index_and_refuses_an_unbuilt_template(
        tmp_path: str) -> None:
    wheels = os.path.join(str(tmp_path), "index")
    os.makedirs(wheels)
    make_wheel(wheels, "sandrun-probe", "1.0", "VALUE = 42\n")
    job = os.path.join(str(tmp_path), "job")
    os.makedirs(job)
    with open(os.path.join(job, "requirements.txt"), "w") as f:
        f.write("sandrun-probe==1.0\n")
    envs = Environments(
        Registry(os.path.join(str(tmp_path), "envs"), TEMPLATES_FOR_TESTS),
        DependencyCache(os.path.join(str(tmp_path), "cache"),
                        pip_args=("--no-index", "--find-links", wheels)))
    manifest = Manifest(entrypoint="main.py", interpreter="python3",
                        requirements="requirements.txt")
    plan = envs.prepare(manifest, job)
    (deps, mount), = plan.ro_binds
    assert mount == DEPS_MOUNT
    assert sorted(os.listdir(os.path.join(deps, "wheels"))) == [
        "sandrun_probe-1.0-py3-none-any.whl"]
    with open(os.path.join(deps, "requirements.txt")) as f:
        assert f.read() == "sandrun-probe==1.0\n"
    assert "fetched" in plan.log
    again = envs.prepare(manifest, job)
    assert again.ro_binds == plan.ro_binds and "from the cache" in again.log
    with pytest.raises(EnvironmentNotBuilt):
        envs.prepare(Manifest(entrypoint="main.py", interpreter="python3",
                              environment="vision"), job)
    with pytest.raises(EnvironmentNotBuilt):
        envs.check(Manifest(entrypoint="main.py", interpreter="python3", environment="vision"))
