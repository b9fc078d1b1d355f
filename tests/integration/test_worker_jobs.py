"""A real worker over real HTTP: every language in every upload form, and the job lifecycle.

One worker (``sandrun serve`` as a subprocess, real sandbox, real tmpfs) serves
the whole module; each test checks that it still answers ``/health`` after.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.worker import Worker, job_processes, run_worker, tar_bytes

pytestmark = pytest.mark.timeout(120)

# entrypoint name -> a program that prints its argv (minus the program) and a greeting
PROGRAMS: dict[str, str] = {
    "main.py": "import sys\nprint('python', sys.argv[1:])\n",
    "main.js": "console.log('node', JSON.stringify(process.argv.slice(2)))\n",
    "main.sh": 'echo bash "$@"\n',
    "main.rb": "puts 'ruby ' + ARGV.inspect\n",
    "main.pl": "print 'perl ', join(',', @ARGV), \"\\n\";\n",
    "main.php": "<?php echo 'php ', implode(',', array_slice($argv, 1)), \"\\n\";\n",
    "main.R": "cat('R', commandArgs(trailingOnly = TRUE), '\\n')\n",
}
LANGUAGE = {"main.py": "python", "main.js": "node", "main.sh": "bash", "main.rb": "ruby",
            "main.pl": "perl", "main.php": "php", "main.R": "R"}


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker("--max-concurrent", "2", "--queue-size", "20",
                    "--max-active-per-ip", "50", "--jobs-per-hour", "1000",
                    "--cpu-quota", "1000") as w:
        yield w


@pytest.fixture(autouse=True)
def still_serving(worker: Worker) -> Iterator[None]:
    yield
    assert worker.healthy(), worker.log()[-3000:]


def finished(worker: Worker, response: Any) -> dict[str, Any]:
    assert response.status == 200, (response.status, response.body)
    return worker.wait(response.json()["job_id"])


def logs(worker: Worker, job_id: str) -> dict[str, Any]:
    response = worker.get(f"/logs/{job_id}")
    assert response.status == 200
    result: dict[str, Any] = response.json()
    return result


# -- every language, every form ---------------------------------------------------------


@pytest.mark.parametrize("entrypoint", sorted(PROGRAMS))
def test_a_tar_gz_with_job_json_runs_in_every_language(worker: Worker, entrypoint: str) -> None:
    archive = tar_bytes({"job.json": json.dumps({"entrypoint": entrypoint, "args": ["x"]}),
                         entrypoint: PROGRAMS[entrypoint]})
    status = finished(worker, worker.post_multipart("/submit", files=[("job.tar.gz", archive)]))
    out = logs(worker, status["job_id"])
    assert status["status"] == "completed", (status, out)
    assert out["stdout"].startswith(LANGUAGE[entrypoint]) and "x" in out["stdout"]


@pytest.mark.parametrize("entrypoint", sorted(PROGRAMS))
def test_a_single_uploaded_file_runs_in_every_language(worker: Worker, entrypoint: str) -> None:
    status = finished(worker, worker.post_multipart(
        "/submit", files=[(entrypoint, PROGRAMS[entrypoint].encode())]))
    out = logs(worker, status["job_id"])
    assert status["status"] == "completed", (status, out)
    assert out["stdout"].startswith(LANGUAGE[entrypoint])


@pytest.mark.parametrize("entrypoint", sorted(PROGRAMS))
def test_the_json_body_form_runs_in_every_language(worker: Worker, entrypoint: str) -> None:
    status = finished(worker, worker.post_json("/submit", {
        "manifest": {"entrypoint": entrypoint, "args": ["a b", "c"]},
        "files": {entrypoint: PROGRAMS[entrypoint]}}))
    out = logs(worker, status["job_id"])
    assert status["status"] == "completed", (status, out)
    assert status["execution_metadata"]["exit_code"] == 0
    assert "c" in out["stdout"] and "a b" in out["stdout"].replace("'", "").replace('"', "")


# -- what a job gets ------------------------------------------------------------------------


def test_args_env_and_stdin_reach_the_job_exactly(worker: Worker) -> None:
    code = ("import os, sys, json\n"
            "print(json.dumps({'argv': sys.argv[1:], 'env': os.environ.get('COLOR'),"
            " 'stdin': sys.stdin.read()}))\n")
    status = finished(worker, worker.post_json("/submit", {
        "manifest": {"entrypoint": "main.py", "args": ["$HOME", "; rm -rf /", "*"],
                     "env": {"COLOR": "blue"}, "stdin": "line 1\nline 2"},
        "files": {"main.py": code}}))
    assert status["status"] == "completed"
    seen = json.loads(logs(worker, status["job_id"])["stdout"])
    assert seen == {"argv": ["$HOME", "; rm -rf /", "*"], "env": "blue",
                    "stdin": "line 1\nline 2"}


def test_a_nonzero_exit_is_failed_with_stderr_kept(worker: Worker) -> None:
    status = finished(worker, worker.post_json("/submit", {
        "files": {"main.sh": "echo oops >&2; exit 3"}}))
    assert status["status"] == "failed"
    assert status["execution_metadata"]["reason"] == "exit_nonzero"
    assert status["execution_metadata"]["exit_code"] == 3
    assert logs(worker, status["job_id"])["stderr"] == "oops\n"


def test_logs_as_text(worker: Worker) -> None:
    status = finished(worker, worker.post_json("/submit", {
        "files": {"main.sh": "echo one; echo two >&2"}}))
    text = worker.get(f"/logs/{status['job_id']}?format=text")
    assert text.status == 200 and (text.header("content-type") or "").startswith("text/plain")
    assert sorted(text.body.decode().splitlines()) == ["one", "two"]
    plain = worker.get(f"/logs/{status['job_id']}", headers={"Accept": "text/plain"})
    assert plain.body == text.body


# -- outputs ------------------------------------------------------------------------------------


MAKE_OUTPUTS = """
import os
os.makedirs('results/deep', exist_ok=True)
os.makedirs('scratch', exist_ok=True)
for path, text in [('results/a.csv', 'a'), ('results/deep/b.csv', 'bb'), ('top.csv', 'ccc'),
                   ('scratch/tmp.bin', 'x'), ('notes.txt', 'n')]:
    with open(path, 'w') as f:
        f.write(text)
os.symlink('/etc/passwd', 'results/passwd.csv')
"""


def test_outputs_are_filtered_by_the_globs_listed_hashed_and_downloadable(
        worker: Worker) -> None:
    status = finished(worker, worker.post_json("/submit", {
        "manifest": {"entrypoint": "make.py", "outputs": ["*.csv", "results/**/*.csv"]},
        "files": {"make.py": MAKE_OUTPUTS}}))
    assert status["status"] == "completed", logs(worker, status["job_id"])
    job_id = status["job_id"]
    expected = {"top.csv": b"ccc", "results/a.csv": b"a", "results/deep/b.csv": b"bb"}
    assert set(status["output_files"]) == set(expected)
    for path, data in expected.items():
        assert status["output_files"][path]["sha256"] == hashlib.sha256(data).hexdigest()
        assert status["output_files"][path]["size_bytes"] == len(data)
    listing = worker.get(f"/outputs/{job_id}").json()
    assert listing["total_files"] == 3
    for entry in listing["files"]:
        reply = worker.get(entry["download_url"])
        assert reply.status == 200 and reply.body == expected[entry["path"]]
        assert "attachment" in (reply.header("content-disposition") or "")
    for hidden in ("notes.txt", "scratch/tmp.bin", "make.py", "results/passwd.csv",
                   "../../../etc/passwd", "results/../notes.txt"):
        assert worker.get(f"/download/{job_id}/{hidden}").status == 404, hidden


def test_download_all_then_the_job_is_deleted(worker: Worker) -> None:
    status = finished(worker, worker.post_json("/submit", {
        "manifest": {"entrypoint": "make.py", "outputs": ["results/"]},
        "files": {"make.py": MAKE_OUTPUTS}}))
    job_id = status["job_id"]
    one = worker.get(f"/download/{job_id}/results/a.csv")
    assert one.body == b"a"
    assert worker.get(f"/status/{job_id}").status == 200  # one file keeps the job
    everything = worker.get(f"/download/{job_id}")
    assert everything.status == 200
    assert everything.header("content-type") == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(everything.body), mode="r:gz") as tar:
        names = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert names == {"results/a.csv": b"a", "results/deep/b.csv": b"bb"}
    deadline = time.monotonic() + 5
    while worker.get(f"/status/{job_id}").status != 404:
        assert time.monotonic() < deadline, "the job outlived its full download"
        time.sleep(0.05)
    assert worker.get(f"/download/{job_id}").status == 404
    # The tmpfs is unmounted off the reactor thread, right after.
    while os.path.exists(os.path.join(worker.state_dir, "jobs", job_id)):
        assert time.monotonic() < deadline, "the job's data outlived its full download"
        time.sleep(0.02)


# -- cancel, queue --------------------------------------------------------------------------------


def test_cancel_of_a_running_job_kills_all_its_processes_and_deletes_it(
        worker: Worker) -> None:
    job_id = worker.submit({"main.sh": "sleep 60 & (sleep 60 &) ; echo started; sleep 60"},
                           {"timeout": 60})
    worker.wait(job_id, until=("running",))
    deadline = time.monotonic() + 5
    while len(job_processes(worker)) < 3:
        assert time.monotonic() < deadline, job_processes(worker)
        time.sleep(0.05)
    pids = job_processes(worker)
    reply = worker.delete(f"/jobs/{job_id}")
    assert reply.status == 200 and reply.json()["cancelled"] is True
    assert worker.get(f"/status/{job_id}").status == 404
    deadline = time.monotonic() + 3
    while any(os.path.exists(f"/proc/{pid}") for pid in pids):
        assert time.monotonic() < deadline, "a cancelled job's process survived"
        time.sleep(0.05)
    deadline = time.monotonic() + 3
    while os.path.exists(os.path.join(worker.state_dir, "jobs", job_id)):
        assert time.monotonic() < deadline, "a cancelled job's data survived"
        time.sleep(0.05)


def test_a_full_queue_is_503_with_retry_after_and_positions_are_right() -> None:
    with run_worker("--max-concurrent", "1", "--queue-size", "2", "--max-active-per-ip", "10") as worker:
        sleeper = {"main.sh": "sleep 30"}
        ids = [worker.submit(sleeper, {"timeout": 30}) for _ in range(3)]
        worker.wait(ids[0], until=("running",))
        assert [worker.get(f"/status/{i}").json()["queue_position"] for i in ids] == [0, 1, 2]
        health = worker.get("/health").json()["load"]
        assert health == {"active_jobs": 1, "queued_jobs": 2, "capacity": 1,
                          "queue_capacity": 2}
        full = worker.post_json("/submit", {"files": sleeper})
        assert full.status == 503
        assert full.json()["retry_after"] > 0
        assert full.header("retry-after") == str(full.json()["retry_after"])
        assert worker.delete(f"/jobs/{ids[1]}").status == 200
        assert worker.get(f"/status/{ids[2]}").json()["queue_position"] == 1
        stats = worker.get("/stats").json()
        assert {k: stats["system"][k] for k in ("queue_length", "active_jobs", "capacity",
                                                "queue_capacity")} == {
            "queue_length": 1, "active_jobs": 1, "capacity": 1, "queue_capacity": 2}
        assert stats["your_quota"]["active_jobs"] == 2
        assert worker.delete(f"/jobs/{ids[0]}").status == 200
        worker.wait(ids[2], until=("running",))
