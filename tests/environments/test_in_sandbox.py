"""Templates and dependencies used by real jobs: real sandbox, network off inside.

What the worker does for a job with an environment, step by step: prepare
the plan on the host (fetch only), run its install step in the job's
sandbox, then run the job with the same binds and variables.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import pytest
import pytest_twisted

from sandrun.environments import DependencyCache, EnvironmentPlan, Environments, Registry
from sandrun.environments.builder import build
from sandrun.environments.templates import TEMPLATES
from sandrun.jobs.manifest import Manifest
from sandrun.sandbox.policy import SandboxPolicy
from sandrun.sandbox.supervisor import Sandbox, SandboxResult
from sandrun.wire import Reason

from .helpers import have, make_gem_source, make_wheel, needs_network

POLICY = SandboxPolicy(timeout_seconds=60.0)


@dataclass
class Ran:
    result: SandboxResult
    output: str

    @property
    def reason(self) -> Reason:
        return self.result.reason


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("env-in-sandbox"))
    os.chmod(path, 0o755)
    return path


def job_dir(work: str, files: dict[str, str]) -> str:
    path = tempfile.mkdtemp(prefix="job-", dir=work)
    os.chmod(path, 0o755)
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return path


async def run(sandbox: Sandbox, argv: tuple[str, ...], plan: EnvironmentPlan,
              manifest: Manifest, directory: str) -> Ran:
    chunks: list[bytes] = []
    result = await sandbox.run(os.path.basename(directory), argv, plan.job_env(manifest.env),
                               directory, POLICY, lambda _stream, data: chunks.append(data),
                               ro_binds=plan.ro_binds)
    return Ran(result, b"".join(chunks).decode(errors="replace"))


async def install_and_run(sandbox: Sandbox, envs: Environments, manifest: Manifest,
                          directory: str) -> tuple[Ran | None, Ran]:
    plan = envs.prepare(manifest, directory)  # the worker does this in a thread
    installed = None
    if plan.install_argv is not None:
        installed = await run(sandbox, plan.install_argv, plan, manifest, directory)
        assert installed.reason == Reason.COMPLETED, installed
    return installed, await run(sandbox, tuple(manifest.argv()), plan, manifest, directory)


@needs_network
@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_a_job_uses_the_test_template_built_for_real_and_cannot_change_it(
        env_sandbox: Sandbox, work: str) -> None:
    registry = Registry(os.path.join(work, "envs"))
    build(TEMPLATES["test-tiny"], registry, timeout=120, progress=lambda _: None)
    envs = Environments(registry, DependencyCache(os.path.join(work, "cache")))
    manifest = Manifest(entrypoint="main.py", interpreter="python3", environment="test-tiny")
    directory = job_dir(work, {"main.py": (
        "import six\nprint(six.__version__, six.__file__)\n"
        "for line in open('/proc/self/mountinfo'):\n"
        "    fields = line.split()\n"
        "    if fields[4] == '/opt/env':\n"
        "        print('/opt/env', fields[5].split(',')[0])\n"
        "try:\n    open('/opt/env/site-packages/six.py', 'a')\n"
        "except OSError as e:\n    print('write refused')\n")})
    installed, ran = await install_and_run(env_sandbox, envs, manifest, directory)
    assert installed is None
    assert ran.reason == Reason.COMPLETED, ran
    assert ran.output.splitlines() == ["1.16.0 /opt/env/site-packages/six.py",
                                       "/opt/env ro", "write refused"]


@needs_network
@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_pure_python_and_binary_wheels_install_inside_with_the_network_off(
        env_sandbox: Sandbox, work: str) -> None:
    envs = Environments(Registry(os.path.join(work, "envs")),
                        DependencyCache(os.path.join(work, "cache"), timeout=60))
    manifest = Manifest(entrypoint="main.py", interpreter="python3",
                        requirements="requirements.txt")
    directory = job_dir(work, {
        "requirements.txt": "six==1.16.0\nmarkupsafe==2.1.5\n",
        "main.py": ("import six, markupsafe, markupsafe._speedups as s\n"
                    "print(six.__file__, markupsafe.__version__, markupsafe.escape('<b>'))\n"
                    "print(s.__file__.endswith('.so'))\n")})
    installed, ran = await install_and_run(env_sandbox, envs, manifest, directory)
    assert installed is not None and "Successfully installed" in installed.output
    assert "markupsafe-2.1.5" in installed.output and "six-1.16.0" in installed.output
    assert ran.reason == Reason.COMPLETED, ran
    assert ran.output.splitlines() == ["/job/.deps/python/six.py 2.1.5 &lt;b&gt;", "True"]


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_an_install_that_fails_inside_reports_the_installer_message(
        env_sandbox: Sandbox, work: str, tmp_path: str) -> None:
    # A cache entry whose wheel is missing: the in-sandbox pip cannot reach any index.
    index = os.path.join(str(tmp_path), "index")
    os.makedirs(index)
    make_wheel(index, "sandrun-probe", "1.0", "VALUE = 42\n")
    envs = Environments(Registry(os.path.join(work, "envs")),
                        DependencyCache(os.path.join(work, "cache-broken"),
                                        pip_args=("--no-index", "--find-links", index)))
    manifest = Manifest(entrypoint="main.py", interpreter="python3",
                        requirements="requirements.txt")
    directory = job_dir(work, {"requirements.txt": "sandrun-probe==1.0\n",
                               "main.py": "import sandrun_probe\n"})
    plan = envs.prepare(manifest, directory)
    (deps, _), = plan.ro_binds
    os.remove(os.path.join(deps, "wheels", "sandrun_probe-1.0-py3-none-any.whl"))
    assert plan.install_argv is not None
    installed = await run(env_sandbox, plan.install_argv, plan, manifest, directory)
    assert installed.reason == Reason.EXIT_NONZERO, installed
    assert "No matching distribution found for sandrun-probe==1.0" in installed.output


@needs_network
@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_an_npm_dependency_is_usable_from_require_and_import(
        env_sandbox: Sandbox, work: str) -> None:
    envs = Environments(Registry(os.path.join(work, "envs")),
                        DependencyCache(os.path.join(work, "cache"), timeout=60))
    package = json.dumps({"dependencies": {"is-number": "^7.0.0"}})
    for entrypoint, source in (
            ("main.js", "const n = require('is-number'); console.log(n(5), n('x'));\n"),
            ("main.mjs", "import n from 'is-number'; console.log(n(5), n('x'));\n")):
        manifest = Manifest(entrypoint=entrypoint, interpreter="node",
                            requirements="package.json")
        directory = job_dir(work, {"package.json": package, entrypoint: source})
        installed, ran = await install_and_run(env_sandbox, envs, manifest, directory)
        assert installed is not None and "node_modules linked" in installed.output
        assert ran.reason == Reason.COMPLETED, ran
        assert ran.output == "true false\n"


@pytest.mark.skipif(not have("gem", "ruby"), reason="needs ruby and gem")
@pytest.mark.timeout(120)
@pytest_twisted.ensureDeferred
async def test_pure_ruby_gems_install_inside_and_load(env_sandbox: Sandbox, work: str,
                                                      tmp_path: str) -> None:
    source = make_gem_source(str(tmp_path), os.path.join(str(tmp_path), "extconf-ran"))
    envs = Environments(Registry(os.path.join(work, "envs")),
                        DependencyCache(os.path.join(work, "cache-gems"), gem_source=source))
    manifest = Manifest(entrypoint="main.rb", interpreter="ruby", requirements="Gemfile")
    directory = job_dir(work, {"Gemfile": 'gem "greeter-sandrun", "~> 1.0"\n',
                               "main.rb": "require 'greeter-sandrun'\nputs GreeterSandrun.greet\n"})
    installed, ran = await install_and_run(env_sandbox, envs, manifest, directory)
    assert installed is not None and "2 gems installed" in installed.output
    assert ran.reason == Reason.COMPLETED, ran
    assert ran.output == "hi!\n"
