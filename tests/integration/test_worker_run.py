"""POST /run, GET /status?wait= and GET /runtimes on a real worker, real sandbox, real HTTP.

One worker serves the module; each test checks that it still answers
``/health`` after and that no job directory is left that should not be.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sandrun.sandbox.policy import SANDBOX_PATH
from tests.integration.worker import Worker, job_processes, run_worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker("--max-concurrent", "2", "--queue-size", "20",
                    "--max-active-per-ip", "50", "--jobs-per-hour", "1000",
                    "--cpu-quota", "1000", "--output-cap-mb", "0.0625") as w:
        yield w


@pytest.fixture(autouse=True)
def still_serving(worker: Worker) -> Iterator[None]:
    yield
    assert worker.healthy(), worker.log()[-3000:]


def job_dirs(worker: Worker) -> list[str]:
    return sorted(n for n in os.listdir(os.path.join(worker.state_dir, "jobs"))
                  if not n.endswith(".log"))


def no_job_dirs_soon(worker: Worker, within: float = 5.0) -> list[str]:
    """The job directories left once deletion (off the reactor thread) had time to run."""
    deadline = time.monotonic() + within
    while job_dirs(worker) and time.monotonic() < deadline:
        time.sleep(0.02)
    return job_dirs(worker)


def run(worker: Worker, files: dict[str, str], manifest: dict[str, Any] | None = None,
        query: str = "", **kwargs: Any) -> dict[str, Any]:
    response = worker.post_json("/run" + query, {"manifest": manifest or {}, "files": files},
                                **kwargs)
    assert response.status == 200, (response.status, response.body)
    body: dict[str, Any] = response.json()
    return body


def until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- POST /run ------------------------------------------------------------------------------


def test_run_answers_with_the_whole_result_in_one_request(worker: Worker) -> None:
    body = run(worker, {"main.py": "import sys\nprint('hello')\nprint('oops', file=sys.stderr)\n"
                                   "open('out.txt', 'w').write('42')\n"},
               {"entrypoint": "main.py", "outputs": ["*.txt"]})
    assert body["status"] == "completed"
    assert body["execution_metadata"]["reason"] == "completed"
    assert body["execution_metadata"]["exit_code"] == 0
    assert body["stdout"] == "hello\n" and body["stderr"] == "oops\n"
    assert body["truncated"] == {"stdout": False, "stderr": False}
    assert body["job_hash"] and body["finished_at"]  # the /status document's fields
    (output,) = body["outputs"]
    assert output["path"] == "out.txt" and output["size_bytes"] == 2
    download = worker.get(output["download_url"])
    assert download.status == 200 and download.body == b"42"
    assert worker.get(f"/status/{body['job_id']}").json()["status"] == "completed"
    assert worker.delete(f"/jobs/{body['job_id']}").status == 200


def test_run_takes_a_multipart_upload(worker: Worker) -> None:
    response = worker.post_multipart("/run", files=[("hi.sh", b"echo multipart\n")])
    assert response.status == 200, response.body
    body = response.json()
    assert body["stdout"] == "multipart\n" and body["status"] == "completed"
    worker.delete(f"/jobs/{body['job_id']}")


@pytest.mark.parametrize("program,manifest,reason", [
    ("exit 3", {}, "exit_nonzero"),
    ("sleep 60", {"timeout": 1}, "timeout"),
    ("exec python3 -c 'import ctypes; ctypes.string_at(0)'", {}, "signaled"),
    ("head -c 100000 /dev/zero | tr '\\0' x; sleep 1", {}, "output_limit"),
])
def test_run_answers_each_way_a_job_fails(worker: Worker, program: str,
                                          manifest: dict[str, Any], reason: str) -> None:
    body = run(worker, {"main.sh": program + "\n"}, {"entrypoint": "main.sh", **manifest},
               query="?keep=0")
    assert body["status"] == "failed"
    assert body["execution_metadata"]["reason"] == reason, body["execution_metadata"]
    if reason == "output_limit":
        assert body["truncated"]["stdout"] is True
    assert worker.get(f"/status/{body['job_id']}").status == 404  # keep=0


def test_run_of_a_bad_manifest_is_400_and_runs_nothing(worker: Worker) -> None:
    response = worker.post_json("/run", {"manifest": {"timeout": -1}, "files": {"a.py": ""}})
    assert response.status == 400 and response.json()["field"] == "timeout"
    assert no_job_dirs_soon(worker) == []


def test_run_with_keep_0_leaves_nothing_behind(worker: Worker) -> None:
    body = run(worker, {"main.sh": "echo gone > out.txt\necho done\n"}, query="?keep=0")
    assert body["stdout"] == "done\n" and body["kept"] is False
    assert body["outputs"][0]["download_url"] is None
    assert worker.get(f"/status/{body['job_id']}").status == 404
    assert no_job_dirs_soon(worker) == []


def test_a_run_client_that_hangs_up_cancels_its_job(worker: Worker) -> None:
    source = "127.0.0.41"  # its own quota counts: the job is seen from /stats
    request = (b'{"manifest": {}, "files": {"main.sh": "echo started; sleep 60"}}')
    sock = socket.create_connection((worker.host, worker.port), source_address=(source, 0))
    try:
        sock.sendall(b"POST /run HTTP/1.1\r\nHost: worker\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(request) + request)

        def active() -> int:
            count: int = worker.get("/stats", source=source).json()["your_quota"]["active_jobs"]
            return count

        until(lambda: active() == 1 and job_processes(worker))
    finally:
        sock.close()
    until(lambda: active() == 0 and not job_processes(worker) and job_dirs(worker) == [])


def test_run_over_the_quota_is_429_before_the_upload_is_read(worker: Worker) -> None:
    with run_worker("--max-active-per-ip", "1") as small:
        job_id = small.submit({"main.sh": "sleep 60\n"})
        # Headers only, with a body announced but never sent: the answer comes anyway.
        sock = socket.create_connection((small.host, small.port))
        try:
            sock.sendall(b"POST /run HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000000\r\n\r\n")
            sock.settimeout(10)
            answer = sock.recv(65536)
        finally:
            sock.close()
        assert answer.startswith(b"HTTP/1.1 429 "), answer[:200]
        assert b"Retry-After:" in answer
        small.delete(f"/jobs/{job_id}")


# -- GET /status?wait= ------------------------------------------------------------------------


def test_a_long_poll_returns_as_soon_as_the_job_ends(worker: Worker) -> None:
    job_id = worker.submit({"main.sh": "sleep 0.5\n"})
    started = time.monotonic()
    body = worker.get(f"/status/{job_id}?wait=30").json()
    took = time.monotonic() - started
    assert body["status"] == "completed"
    assert took < 20  # well before the 30 s asked for: it came at the end
    worker.delete(f"/jobs/{job_id}")


def test_a_long_poll_returns_after_its_seconds_while_the_job_runs(worker: Worker) -> None:
    job_id = worker.submit({"main.sh": "sleep 60\n"})
    started = time.monotonic()
    body = worker.get(f"/status/{job_id}?wait=1").json()
    assert body["status"] in ("queued", "running")
    assert time.monotonic() - started >= 1.0
    worker.delete(f"/jobs/{job_id}")


# -- GET /runtimes ------------------------------------------------------------------------------

# A program per interpreter that prints its version the way /runtimes gives it.
VERSION_PROGRAMS = {
    "python3": ("v.py", "import platform\nprint(platform.python_version())\n"),
    "node": ("v.js", "console.log(process.versions.node)\n"),
    "bash": ("v.sh", 'IFS=.; echo "${BASH_VERSINFO[*]:0:3}"\n'),
    "ruby": ("v.rb", "puts RUBY_VERSION\n"),
    "Rscript": ("v.R", "cat(as.character(getRversion()), '\\n', sep = '')\n"),
    "perl": ("v.pl", 'printf "%vd\\n", $^V;\n'),
    "php": ("v.php", "<?php echo PHP_VERSION, \"\\n\";\n"),
}


def test_runtimes_lists_every_installed_interpreter_with_the_version_jobs_see(
        worker: Worker) -> None:
    response = worker.get("/runtimes")
    assert response.status == 200
    listed = {r["interpreter"]: r for r in response.json()["runtimes"]}
    installed = {name for name in ("python3", "node", "bash", "sh", "ruby", "Rscript", "perl",
                                   "php") if shutil.which(name, path=SANDBOX_PATH)}
    assert set(listed) == installed
    assert ".py" in listed["python3"]["extensions"] and "python" in listed["python3"]["aliases"]
    for name, runtime in listed.items():
        assert runtime["path"] == shutil.which(name, path=SANDBOX_PATH)
        if name == "sh":
            continue  # dash says no version of its own; its package's is given
        entry, program = VERSION_PROGRAMS[name]
        body = run(worker, {entry: program}, {"entrypoint": entry, "timeout": 60},
                   query="?keep=0")
        assert body["status"] == "completed", (name, body["stderr"])
        assert body["stdout"].strip() == runtime["version"], name
