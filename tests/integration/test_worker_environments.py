"""Templates and per-job dependencies through a real worker: fetch, install, run.

One worker (``sandrun serve``, real sandbox) with its own template directory
and dependency cache in a scratch directory; the fetches go to the real
package indexes (PyPI, npm), so these tests need the network on the host
(never inside the sandbox: installs there run with the network off).  The
host's own Python has ``six`` too, so every import checks where it came from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.worker import REPO, Worker, run_worker

pytestmark = pytest.mark.timeout(90)

SIX_FILE = "import six, sys\nprint(six.__version__, six.__file__)\n"


@pytest.fixture(scope="module")
def dirs() -> Iterator[tuple[str, str]]:
    """(template directory, dependency cache) for this module's worker only."""
    scratch = tempfile.mkdtemp(prefix="sandrun-envs-")
    yield os.path.join(scratch, "environments"), os.path.join(scratch, "deps")
    shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="module")
def worker(dirs: tuple[str, str]) -> Iterator[Worker]:
    env_dir, deps_dir = dirs
    with run_worker("--env-dir", env_dir, "--deps-dir", deps_dir, "--max-concurrent", "2",
                    "--max-active-per-ip", "50", "--jobs-per-hour", "1000",
                    "--cpu-quota", "1000") as w:
        yield w


def run_job(worker: Worker, files: dict[str, str], manifest: dict[str, Any],
            timeout: float = 60.0) -> tuple[dict[str, Any], dict[str, Any]]:
    """Submit, wait for the end; returns (``/status``, ``/logs``)."""
    job_id = worker.submit(files, manifest)
    status = worker.wait(job_id, timeout=timeout)
    logs = worker.get(f"/logs/{job_id}").json()
    return status, logs


def test_a_requirements_txt_package_is_fetched_installed_and_imported_from_the_job(
        worker: Worker) -> None:
    status, logs = run_job(worker, {"main.py": SIX_FILE, "requirements.txt": "six==1.16.0\n"},
                           {"entrypoint": "main.py", "requirements": "requirements.txt"})
    assert status["status"] == "completed", (status, logs)
    # The program's stdout is its own; pip's log is the install step's.
    assert logs["stdout"] == "1.16.0 /job/.deps/python/six.py\n", logs
    assert "Successfully installed six-1.16.0" in logs["install"]
    assert "pip package" in logs["install"] and logs["stderr"] == ""
    # The install counts toward the job: pip's start-up alone is more than the print.
    assert status["execution_metadata"]["cpu_seconds"] > 0.1
    assert set(status["output_files"]) == set()  # nothing made: no .deps/, no upload


def test_a_package_with_a_binary_wheel_installs_and_its_extension_loads(
        worker: Worker) -> None:
    program = "from markupsafe import _speedups, escape\nprint(escape('<'), _speedups.__file__)\n"
    status, logs = run_job(worker, {"main.py": program,
                                    "requirements.txt": "MarkupSafe==2.1.5\n"},
                           {"entrypoint": "main.py", "requirements": "requirements.txt"})
    assert status["status"] == "completed", (status, logs)
    last = logs["stdout"].splitlines()[-1]
    assert last.startswith("&lt; /job/.deps/python/markupsafe/_speedups.cpython-"), logs
    assert last.endswith(".so")


def test_a_package_that_does_not_exist_fails_install_failed_with_the_installers_message(
        worker: Worker) -> None:
    name = "sandrun-no-such-package-4c1e"
    status, logs = run_job(worker, {"main.py": "open('ran', 'w')\n",
                                    "requirements.txt": f"{name}==1.0\n"},
                           {"entrypoint": "main.py", "requirements": "requirements.txt"})
    meta = status["execution_metadata"]
    assert (status["status"], meta["reason"]) == ("failed", "install_failed"), (status, logs)
    assert meta["message"].startswith(f"{name}: no such package"), meta
    assert f"No matching distribution found for {name}" in logs["install"]
    assert f"sandrun: install failed: {name}: no such package" in logs["install"]
    assert "ran" not in status["output_files"]  # the job itself never ran


def test_an_sdist_only_package_is_refused_and_its_setup_py_never_runs(
        worker: Worker, dirs: tuple[str, str]) -> None:
    status, logs = run_job(worker, {"main.py": "import docopt\n",
                                    "requirements.txt": "docopt==0.6.2\n"},
                           {"entrypoint": "main.py", "requirements": "requirements.txt"})
    meta = status["execution_metadata"]
    assert (status["status"], meta["reason"]) == ("failed", "install_failed"), (status, logs)
    assert "only a source distribution (setup.py)" in meta["message"]
    assert "wheels only" in meta["message"]
    # pip says so when it runs a setup.py ("Preparing metadata (setup.py)", egg_info),
    # and the downloaded sdist would be in the cache.
    assert "Preparing metadata" not in logs["install"] and "egg_info" not in logs["install"]
    assert "docopt-0.6.2.tar.gz" not in logs["install"]
    cache = os.path.join(dirs[1], "pip")
    found = [f for _, _, files in os.walk(cache) for f in files if "docopt" in f]
    assert found == []


def test_a_package_json_dependency_is_used_by_node(worker: Worker) -> None:
    program = ("const isNumber = require('is-number');\n"
               "console.log(isNumber(5), isNumber('x'), require.resolve('is-number'));\n")
    status, logs = run_job(worker, {"main.js": program,
                                    "package.json": '{"dependencies": {"is-number": "7.0.0"}}'},
                           {"entrypoint": "main.js", "requirements": "package.json"})
    assert status["status"] == "completed", (status, logs)
    assert logs["stdout"].endswith("true false /opt/deps/node_modules/is-number/index.js\n"), \
        logs
    assert set(status["output_files"]) == set()  # no node_modules link, no upload


def test_an_unbuilt_template_is_a_400_that_says_how_to_build_it(worker: Worker) -> None:
    response = worker.post_json("/submit", {"manifest": {"entrypoint": "main.py",
                                                         "environment": "vision"},
                                            "files": {"main.py": "print(1)\n"}})
    assert response.status == 400, response.body
    body = response.json()
    assert (body["error"], body["field"]) == ("Invalid manifest", "environment")
    assert "sandrun env build vision" in body["details"]
    listed = {e["name"]: e["ready"] for e in worker.get("/environments").json()["environments"]}
    assert listed["vision"] is False


def test_default_means_what_it_says_unbuilt_it_is_a_400_and_unnamed_jobs_get_bare_interpreters(
        worker: Worker) -> None:
    document = worker.get("/environments").json()
    listed = {e["name"]: e for e in document["environments"]}
    assert listed["default"]["ready"] is False and "numpy==1.26.4" in listed["default"]["packages"]
    assert document["unnamed"] is None  # a job naming none gets the host's interpreters
    named = worker.post_json("/submit", {"manifest": {"entrypoint": "main.py",
                                                      "environment": "default"},
                                         "files": {"main.py": "print(1)\n"}})
    assert named.status == 400 and named.json()["field"] == "environment", named.body
    assert "sandrun env build default" in named.json()["details"]
    status, logs = run_job(worker, {"main.py": "import json\nprint(json.dumps(1))\n"},
                           {"entrypoint": "main.py"})
    assert status["status"] == "completed", (status, logs)
    assert status["execution_metadata"]["environment"] == "none"  # what it got, said plainly


def test_a_tiny_template_built_for_real_is_used_by_jobs_and_installs_layer_on_top(
        worker: Worker, dirs: tuple[str, str]) -> None:
    env_dir = dirs[0]
    manifest = {"entrypoint": "main.py", "environment": "test-tiny"}
    before = worker.post_json("/submit", {"manifest": manifest, "files": {"main.py": SIX_FILE}})
    assert before.status == 400 and "sandrun env build test-tiny" in before.json()["details"]
    assert "test-tiny" not in worker.get("/environments").json()["templates"]

    built = subprocess.run(
        [sys.executable, "-m", "sandrun", "env", "--root", env_dir, "build", "test-tiny"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        env=dict(os.environ, PYTHONPATH=REPO))
    assert built.returncode == 0, built.stdout + built.stderr
    assert "[4/4] test-tiny ready" in built.stdout

    listed = {e["name"]: e for e in worker.get("/environments").json()["environments"]}
    assert listed["test-tiny"]["ready"] is True
    assert listed["test-tiny"]["packages"] == ["six==1.16.0"]
    status, logs = run_job(worker, {"main.py": SIX_FILE}, manifest)
    assert status["status"] == "completed", (status, logs)
    assert logs["stdout"] == "1.16.0 /opt/env/site-packages/six.py\n"
    assert status["execution_metadata"]["environment"] == "test-tiny"

    # A job's own requirements come first on the path, over the template's.
    status, logs = run_job(worker, {"main.py": SIX_FILE, "requirements.txt": "six==1.16.0\n"},
                           {**manifest, "requirements": "requirements.txt"})
    assert status["status"] == "completed", (status, logs)
    assert logs["stdout"].endswith("1.16.0 /job/.deps/python/six.py\n"), logs
