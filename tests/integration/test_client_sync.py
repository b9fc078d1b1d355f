"""``SandrunClient`` against a real worker: every call, its typed results and its errors."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandrun.client import (
    BadRequestError,
    ConflictError,
    Done,
    NotFoundError,
    OutputChunk,
    SandrunClient,
    SandrunConnectionError,
    StatusUpdate,
    WaitTimeoutError,
)
from sandrun.identity import WorkerIdentity, write_private_key

from .worker import Worker, run_worker

pytestmark = pytest.mark.timeout(60)

# Quotas out of the way: every test here comes from 127.0.0.1.
GENEROUS = ("--jobs-per-hour", "1000", "--max-active-per-ip", "50", "--cpu-quota", "1000")


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> tuple[WorkerIdentity, str]:
    key = WorkerIdentity.generate()
    path = str(tmp_path_factory.mktemp("key") / "worker.pem")
    write_private_key(key, path)
    return key, path


@pytest.fixture(scope="module")
def worker(identity: tuple[WorkerIdentity, str]) -> Iterator[Worker]:
    with run_worker("--worker-key", identity[1], *GENEROUS) as running:
        yield running


@pytest.fixture
def client(worker: Worker) -> SandrunClient:
    return SandrunClient(worker.url, timeout=10)


def wait_running(client: SandrunClient, job_id: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while client.status(job_id).status != "running":
        assert time.monotonic() < deadline, f"{job_id} never started"
        time.sleep(0.02)


def test_service_calls_describe_this_worker(client: SandrunClient,
                                            identity: tuple[WorkerIdentity, str]) -> None:
    worker_id = identity[0].worker_id
    info = client.info()
    assert (info["service"], info["worker_id"]) == ("sandrun", worker_id)
    health = client.health(nonce="n-123")
    assert health["status"] == "healthy" and '"nonce":"n-123"' in health["signed"]
    assert client.stats()["your_quota"]["can_submit"] is True
    assert "default" in client.environments()["templates"]


def test_a_snippet_runs_and_every_read_call_sees_its_result(
        client: SandrunClient, identity: tuple[WorkerIdentity, str], tmp_path: Path) -> None:
    code = ("import os, sys\n"
            "os.makedirs('out', exist_ok=True)\n"
            "open('out/result.txt', 'w').write('R:' + sys.stdin.read() + ':' + sys.argv[1])\n"
            "open('scratch.txt', 'w').write('not an output')\n"
            "print('to stdout'); print('to stderr', file=sys.stderr)\n"
            "sys.exit(3)\n")
    submitted = client.submit_code(code, "python", args=["arg1"], stdin="input",
                                   manifest={"outputs": ["out/"]})
    assert submitted.job_id.startswith("job-") and submitted.status in ("queued", "running")

    job = client.wait(submitted.job_id, timeout=30)
    assert (job.status, job.reason, job.exit_code) == ("failed", "exit_nonzero", 3)
    assert list(job.output_files) == ["out/result.txt"]
    assert job.execution.wall_time_ms is not None and job.finished_at is not None

    logs = client.logs(job.job_id)
    assert (logs.stdout, logs.stderr) == ("to stdout\n", "to stderr\n")
    assert not logs.stdout_truncated
    text = client.logs_text(job.job_id)
    assert "to stdout\n" in text and "to stderr\n" in text

    outputs = client.outputs(job.job_id)
    assert [(f.path, f.mime_type) for f in outputs] == [("out/result.txt", "text/plain")]
    assert client.download(job.job_id, "out/result.txt") == b"R:input:arg1"
    with pytest.raises(NotFoundError):
        client.download(job.job_id, "scratch.txt")  # not matched by outputs
    written = client.download_to(job.job_id, "out/result.txt", str(tmp_path / "one"))
    with open(written, "rb") as f:
        assert f.read() == b"R:input:arg1"

    worker_id = identity[0].worker_id
    assert client.verify(job, worker_id)
    assert client.verify(job.job_id, worker_id)  # fetched afresh
    assert not client.verify(job, WorkerIdentity.generate().worker_id)
    tampered = dict(job.raw, execution_metadata={**job.raw["execution_metadata"],
                                                 "exit_code": 0})
    assert not client.verify(tampered, worker_id)

    paths = client.download_all(job.job_id, str(tmp_path / "all"))
    assert paths == ["out/result.txt"]
    assert (tmp_path / "all" / "out" / "result.txt").read_bytes() == b"R:input:arg1"
    with pytest.raises(NotFoundError) as gone:  # a full download deletes the job
        client.status(job.job_id)
    assert gone.value.status == 404 and gone.value.error == "Job not found"


def test_stream_delivers_output_while_the_job_runs_then_done(client: SandrunClient) -> None:
    code = ("import sys, time\n"
            "print('first', flush=True)\n"
            "print('oops', file=sys.stderr, flush=True)\n"
            "time.sleep(1.0)\n"
            "print('second', flush=True)\n"
            "sys.exit(4)\n")
    job_id = client.submit_code(code).job_id
    events = []
    status_at_first_chunk = None
    for event in client.stream(job_id, timeout=30):
        if isinstance(event, OutputChunk) and status_at_first_chunk is None:
            status_at_first_chunk = client.status(job_id).status
        events.append(event)
    assert status_at_first_chunk == "running"  # live, not replayed at the end
    chunks = [e for e in events if isinstance(e, OutputChunk)]
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "first\nsecond\n"
    assert "".join(c.data for c in chunks if c.stream == "stderr") == "oops\n"
    assert isinstance(events[-1], Done)
    assert (events[-1].status, events[-1].reason, events[-1].exit_code) == \
        ("failed", "exit_nonzero", 4)
    assert any(isinstance(e, StatusUpdate) for e in events)


def test_streaming_a_finished_job_replays_its_output(client: SandrunClient) -> None:
    job_id = client.submit_code("print('done already')").job_id
    client.wait(job_id, timeout=30)
    events = list(client.stream(job_id, timeout=30))
    assert [e.data for e in events if isinstance(e, OutputChunk)] == ["done already\n"]
    assert isinstance(events[-1], Done) and events[-1].exit_code == 0


def test_streaming_an_unknown_job_is_not_found(client: SandrunClient) -> None:
    with pytest.raises(NotFoundError):
        list(client.stream("job-doesnotexistatall0000"))


def test_files_with_binary_content_and_subdirectories_arrive_intact(
        client: SandrunClient) -> None:
    blob = bytes(range(256))
    code = ("import hashlib\n"
            "print(hashlib.sha256(open('data/blob.bin', 'rb').read()).hexdigest())\n"
            "print(open('lib/words.txt').read())\n")
    job_id = client.submit_files({"run.py": code, "data/blob.bin": blob,
                                  "lib/words.txt": "héllo"},
                                 {"entrypoint": "run.py"}).job_id
    job = client.wait(job_id, timeout=30)
    assert job.succeeded, client.logs(job_id)
    assert client.logs(job_id).stdout == hashlib.sha256(blob).hexdigest() + "\nhéllo\n"
    client.cancel(job_id)


def test_a_directory_upload_honours_sandrunignore(client: SandrunClient, tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "main.py").write_text(
        "import os\n"
        "print(sorted(os.path.join(d, f)[2:] for d, _, fs in os.walk('.') for f in fs))\n")
    (project / "data" / "keep.csv").write_text("1,2\n")
    (project / "data" / "huge.bin").write_bytes(os.urandom(1000))
    (project / "notes.log").write_text("secret")
    (project / ".sandrunignore").write_text("*.bin\n*.log\n")
    os.symlink("/etc/passwd", project / "passwd")
    submitted, packed = client.submit_directory_packed(str(project), {"entrypoint": "main.py"})
    assert packed.skipped == [("passwd", "symbolic link")]
    job = client.wait(submitted.job_id, timeout=30)
    assert job.succeeded
    assert client.logs(job.job_id).stdout == "['data/keep.csv', 'main.py']\n"
    client.cancel(job.job_id)


def test_a_directory_with_job_json_needs_no_manifest(client: SandrunClient,
                                                     tmp_path: Path) -> None:
    (tmp_path / "job.json").write_text('{"entrypoint": "go.sh", "args": ["x"]}')
    (tmp_path / "go.sh").write_text('echo "arg=$1"\n')
    job = client.wait(client.submit_directory(str(tmp_path)).job_id, timeout=30)
    assert client.logs(job.job_id).stdout == "arg=x\n"
    client.cancel(job.job_id)


def test_a_single_file_is_its_own_entrypoint(client: SandrunClient, tmp_path: Path) -> None:
    script = tmp_path / "hello.sh"
    script.write_text("echo hello from $0\n")
    job = client.wait(client.submit_file(str(script)).job_id, timeout=30)
    assert job.succeeded and client.logs(job.job_id).stdout.startswith("hello from")
    client.cancel(job.job_id)


def test_cancel_kills_a_running_job_and_deletes_it(client: SandrunClient) -> None:
    job_id = client.submit_code("import time; time.sleep(30)").job_id
    wait_running(client, job_id)
    with pytest.raises(ConflictError):  # outputs of an unfinished job
        client.download_all(job_id, "/nonexistent-never-written")
    cancelled = client.cancel(job_id)
    assert (cancelled.job_id, cancelled.deleted, cancelled.cancelled) == (job_id, True, True)
    with pytest.raises(NotFoundError):
        client.status(job_id)


def test_wait_gives_up_after_its_timeout_and_the_job_goes_on(client: SandrunClient) -> None:
    job_id = client.submit_code("import time; time.sleep(30)").job_id
    started = time.monotonic()
    with pytest.raises(WaitTimeoutError):
        client.wait(job_id, timeout=0.5)
    assert time.monotonic() - started < 5
    assert client.status(job_id).status in ("queued", "running")
    client.cancel(job_id)


def test_an_invalid_manifest_is_a_bad_request_naming_the_field(client: SandrunClient) -> None:
    with pytest.raises(BadRequestError) as refused:
        client.submit_code("print(1)", manifest={"timout": 5})
    assert refused.value.status == 400
    assert "timout" in refused.value.details
    assert refused.value.body.get("field") == "timout"


def test_bytes_are_base64_on_the_wire(client: SandrunClient) -> None:
    # Not valid UTF-8: would be refused as text, so it must travel as base64.
    data = b"\xff\xfe\x00binary"
    job_id = client.submit_files(
        {"main.py": "import sys; sys.stdout.write(open('b', 'rb').read().hex())", "b": data},
        {"entrypoint": "main.py"}).job_id
    client.wait(job_id, timeout=30)
    assert client.logs(job_id).stdout == data.hex()
    client.cancel(job_id)


def test_an_unreachable_server_is_a_connection_error() -> None:
    with pytest.raises(SandrunConnectionError) as failed:
        SandrunClient("http://127.0.0.1:1", timeout=2).status("job-x")
    assert "127.0.0.1:1" in str(failed.value)


def status_requests(worker: Worker, job_id: str) -> int:
    """How many ``/status`` requests for ``job_id`` the worker's access log shows."""
    return sum(1 for line in worker.log().splitlines() if f"GET /status/{job_id} " in line)


def test_wait_learns_the_end_with_one_long_poll(client: SandrunClient, worker: Worker) -> None:
    job_id = client.submit_code("import time; time.sleep(1.5)").job_id
    job = client.wait(job_id, timeout=30)
    assert job.status == "completed"
    assert status_requests(worker, job_id) == 1  # polling every 0.2-2 s would take several
    client.cancel(job_id)


def test_run_gives_the_whole_result_in_one_call(client: SandrunClient) -> None:
    result = client.run("import sys\nprint('out')\nprint('err', file=sys.stderr)\n"
                        "open('r.txt', 'w').write('x')\nsys.exit(4)\n",
                        manifest={"outputs": ["r.txt"]})
    assert (result.status, result.reason, result.exit_code) == ("failed", "exit_nonzero", 4)
    assert (result.stdout, result.stderr) == ("out\n", "err\n")
    assert not result.stdout_truncated and result.kept
    assert [o.path for o in result.outputs] == ["r.txt"]
    assert client.download(result.job_id, "r.txt") == b"x"
    client.cancel(result.job_id)


def test_run_of_files_without_keeping_them(client: SandrunClient) -> None:
    result = client.run(files={"main.sh": "cat data.txt\n", "data.txt": b"bytes\n"},
                        manifest={"entrypoint": "main.sh"}, keep=False)
    assert result.succeeded and result.stdout == "bytes\n" and not result.kept
    with pytest.raises(NotFoundError):
        client.status(result.job_id)


def test_run_with_a_bad_manifest_is_a_bad_request(client: SandrunClient) -> None:
    with pytest.raises(BadRequestError):
        client.run("print(1)", manifest={"timeout": -3})
    with pytest.raises(ValueError):
        client.run()  # neither code nor files
