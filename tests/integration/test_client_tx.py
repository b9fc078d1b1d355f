"""``TxSandrunClient`` (treq, autobahn) against a real worker, inside the test reactor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor

from sandrun.client import (
    BadRequestError,
    Done,
    NotFoundError,
    OutputChunk,
    SandrunConnectionError,
    StreamEvent,
)
from sandrun.client.txclient import TxSandrunClient

from .worker import Worker, run_worker

pytestmark = pytest.mark.timeout(60)

GENEROUS = ("--jobs-per-hour", "1000", "--max-active-per-ip", "50", "--cpu-quota", "1000")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker(*GENEROUS) as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_a_job_submitted_streamed_waited_for_and_downloaded(worker: Worker,
                                                                   tmp_path: Path) -> None:
    client = TxSandrunClient(worker.url, reactor)
    info = await client.info()
    assert info["service"] == "sandrun"
    code = ("import os, sys, time\n"
            "print('one', flush=True); time.sleep(0.3)\n"
            "print('two', file=sys.stderr, flush=True)\n"
            "open('result.txt', 'w').write('ok')\n"
            "sys.exit(2)\n")
    submitted = await client.submit_code(code, manifest={"outputs": ["result.txt"]})
    events: list[StreamEvent] = []
    done = await client.stream(submitted.job_id, events.append)
    assert isinstance(done, Done) and (done.reason, done.exit_code) == ("exit_nonzero", 2)
    chunks = [(e.stream, e.data) for e in events if isinstance(e, OutputChunk)]
    assert chunks == [("stdout", "one\n"), ("stderr", "two\n")]

    job = await client.wait(submitted.job_id, timeout=30)
    assert (job.status, job.exit_code, list(job.output_files)) == ("failed", 2, ["result.txt"])
    logs = await client.logs(job.job_id)
    assert (logs.stdout, logs.stderr) == ("one\n", "two\n")
    outputs = await client.outputs(job.job_id)
    assert [f.path for f in outputs] == ["result.txt"]
    assert await client.download(job.job_id, "result.txt") == b"ok"
    assert not await client.verify(job, "A" * 43 + "=")  # an unsigned worker's result
    written = await client.download_all(job.job_id, str(tmp_path / "out"))
    assert written == ["result.txt"] and (tmp_path / "out" / "result.txt").read_text() == "ok"
    with pytest.raises(NotFoundError):
        await client.status(job.job_id)


@pytest_twisted.ensureDeferred
async def test_a_directory_and_files_upload_and_cancel(worker: Worker, tmp_path: Path) -> None:
    client = TxSandrunClient(worker.url, reactor)
    (tmp_path / "main.py").write_text("print(open('data.txt').read())")
    (tmp_path / "data.txt").write_text("from the directory")
    (tmp_path / "ignored.txt").write_text("no")
    (tmp_path / ".sandrunignore").write_text("ignored.txt\n")
    # "**": the uploaded files count as outputs too, so they show what was uploaded.
    submitted = await client.submit_directory(str(tmp_path), {"entrypoint": "main.py",
                                                              "outputs": ["**"]})
    job = await client.wait(submitted.job_id, timeout=30)
    assert job.succeeded and set(job.output_files) == {"main.py", "data.txt"}
    assert (await client.logs(job.job_id)).stdout == "from the directory\n"

    sleeper = await client.submit_files({"s.py": "import time; time.sleep(30)"},
                                        {"entrypoint": "s.py"})
    cancelled = await client.cancel(sleeper.job_id)
    assert cancelled.deleted and cancelled.job_id == sleeper.job_id


@pytest_twisted.ensureDeferred
async def test_errors_carry_the_servers_message(worker: Worker) -> None:
    client = TxSandrunClient(worker.url, reactor)
    with pytest.raises(BadRequestError) as refused:
        await client.submit_code("1", manifest={"nope": True})
    assert refused.value.status == 400 and "nope" in refused.value.details
    with pytest.raises(NotFoundError):
        await client.stream("job-nosuchjob0000", lambda event: None)
    with pytest.raises(SandrunConnectionError):
        await TxSandrunClient("http://127.0.0.1:1", reactor, timeout=2).status("job-x")


@pytest_twisted.ensureDeferred
async def test_run_and_a_long_poll_wait_on_the_reactor(worker: Worker) -> None:
    client = TxSandrunClient(worker.url, reactor)
    result = await client.run("print('tx')", keep=False)
    assert result.succeeded and result.stdout == "tx\n" and not result.kept
    submitted = await client.submit_code("import time; time.sleep(1)")
    job = await client.wait(submitted.job_id, timeout=30)
    assert job.status == "completed"
    asked = [line for line in worker.log().splitlines()
             if f"GET /status/{submitted.job_id} " in line]
    assert len(asked) == 1
    await client.cancel(submitted.job_id)
