"""``sandrun run|status|logs|download|cancel`` as a user runs them, against a real worker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandrun.client import SandrunClient

from .worker import REPO, Worker, run_worker

pytestmark = pytest.mark.timeout(60)

GENEROUS = ("--jobs-per-hour", "1000", "--max-active-per-ip", "50", "--cpu-quota", "1000")
_JOB_ID = re.compile(r"sandrun: job (job-[A-Za-z0-9_-]+)")


@dataclass
class Ran:
    code: int
    stdout: str
    stderr: str

    @property
    def job_id(self) -> str:
        found = _JOB_ID.search(self.stderr)
        assert found, self.stderr
        return found.group(1)


def sandrun(url: str, *argv: str, cwd: str | None = None, timeout: float = 45) -> Ran:
    env = dict(os.environ, SANDRUN_URL=url,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "sandrun", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)
    return Ran(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker(*GENEROUS) as running:
        yield running


def write(root: object, files: dict[str, str]) -> str:
    base = str(root)
    for path, content in files.items():
        full = os.path.join(base, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(content)
    return base


PROJECT = {
    "main.py": (
        "import os, sys\n"
        "os.makedirs('out/sub', exist_ok=True)\n"
        "open('out/result.txt', 'w').write('args=' + ','.join(sys.argv[1:]))\n"
        "open('out/sub/table.csv', 'w').write(os.environ['GREETING'] + '\\n')\n"
        "print('hello on stdout')\n"
        "print('hello on stderr', file=sys.stderr)\n"),
    "data/input.txt": "input\n",
    "secret.key": "never uploaded",
    ".sandrunignore": "*.key\n",
}


def test_run_streams_output_and_puts_outputs_in_the_outputs_dir(worker: Worker,
                                                                 tmp_path: Path) -> None:
    project = write(tmp_path / "project", PROJECT)
    ran = sandrun(worker.url, "run", project, "--env", "GREETING=hi there",
                  "--output", "out/**", "--", "one", "--two", cwd=str(tmp_path))
    assert ran.code == 0, ran.stderr
    assert ran.stdout == "hello on stdout\n"  # the job's stdout, and nothing else
    assert "hello on stderr\n" in ran.stderr
    outputs = tmp_path / "sandrun-outputs" / ran.job_id
    assert (outputs / "out" / "result.txt").read_text() == "args=one,--two"
    assert (outputs / "out" / "sub" / "table.csv").read_text() == "hi there\n"
    assert sorted(p.name for p in outputs.rglob("*") if p.is_file()) == \
        ["result.txt", "table.csv"]
    assert f"2 output files in sandrun-outputs/{ran.job_id}" in ran.stderr
    # Done and downloaded: the job is gone from the worker.
    assert worker.get(f"/status/{ran.job_id}").status == 404


def test_without_output_patterns_unchanged_inputs_are_not_downloaded(worker: Worker,
                                                                     tmp_path: Path) -> None:
    project = write(tmp_path / "p", PROJECT)
    dest = tmp_path / "elsewhere"
    ran = sandrun(worker.url, "run", project, "--env", "GREETING=x", "--outputs-dir", str(dest),
                  "--quiet")
    assert ran.code == 0, ran.stderr
    assert ran.stderr == "hello on stderr\n"  # --quiet: only the job's own stderr
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["out/result.txt", "out/sub/table.csv"]  # no main.py, no data/input.txt
    assert not (tmp_path / "sandrun-outputs").exists()


def test_a_failing_job_exit_status_is_propagated(worker: Worker, tmp_path: Path) -> None:
    script = write(tmp_path, {"fail.py": "import sys\nprint('bad')\nsys.exit(3)\n"})
    ran = sandrun(worker.url, "run", os.path.join(script, "fail.py"), cwd=str(tmp_path))
    assert ran.code == 3
    assert ran.stdout == "bad\n"
    assert "exited with status 3" in ran.stderr


def test_a_timeout_exits_124_and_a_memory_limit_125(worker: Worker, tmp_path: Path) -> None:
    write(tmp_path, {"slow.py": "import time\ntime.sleep(30)\n",
                     "hog.py": "x = bytearray(400 * 1024 * 1024)\nx[::4096] = b'1' * len(x[::4096])\n"})
    ran = sandrun(worker.url, "run", str(tmp_path / "slow.py"), "--timeout", "1",
                  cwd=str(tmp_path))
    assert ran.code == 124, ran.stderr
    assert "ran out of time (1 s)" in ran.stderr
    ran = sandrun(worker.url, "run", str(tmp_path / "hog.py"), "--memory", "64",
                  cwd=str(tmp_path))
    assert ran.code == 125, ran.stderr
    assert "ran out of memory (64 MB)" in ran.stderr


def test_a_large_upload_shows_progress_on_stderr(worker: Worker, tmp_path: Path) -> None:
    project = write(tmp_path / "big", {"main.py": "import os\nprint(os.path.getsize('blob'))\n"})
    with open(os.path.join(project, "blob"), "wb") as f:
        f.write(os.urandom(1_500_000))  # random: gzip cannot shrink it under 1 MB
    ran = sandrun(worker.url, "run", project, "--no-download", cwd=str(tmp_path))
    assert ran.code == 0, ran.stderr
    assert ran.stdout == "1500000\n"
    assert re.search(r"sandrun: uploading 1\.5 MB\n", ran.stderr), ran.stderr
    assert re.search(r"sandrun: uploaded 1\.5 MB in [0-9.]+ s\n", ran.stderr), ran.stderr
    small = sandrun(worker.url, "run", str(tmp_path / "big" / "main.py"), "--no-download")
    assert "uploading" not in small.stderr  # small uploads stay quiet


def test_status_logs_download_and_cancel_commands(worker: Worker, tmp_path: Path) -> None:
    project = write(tmp_path / "p", PROJECT)
    ran = sandrun(worker.url, "run", project, "--env", "GREETING=kept", "--output", "out/**",
                  "--keep", "--no-download", cwd=str(tmp_path))
    assert ran.code == 0, ran.stderr
    job_id = ran.job_id

    status = sandrun(worker.url, "status", job_id)
    assert status.code == 0
    document = json.loads(status.stdout)
    assert (document["job_id"], document["status"]) == (job_id, "completed")
    assert set(document["output_files"]) == {"out/result.txt", "out/sub/table.csv"}

    logs = sandrun(worker.url, "logs", job_id)
    assert (logs.code, logs.stdout, logs.stderr) == (0, "hello on stdout\n", "hello on stderr\n")
    follow = sandrun(worker.url, "logs", "--follow", job_id)
    assert (follow.code, follow.stdout) == (0, "hello on stdout\n")

    one = sandrun(worker.url, "download", job_id, "out/sub/table.csv", "-o", str(tmp_path / "one"))
    assert one.code == 0, one.stderr
    assert (tmp_path / "one" / "out" / "sub" / "table.csv").read_text() == "kept\n"
    escape = sandrun(worker.url, "download", job_id, "../../etc/passwd", "-o",
                     str(tmp_path / "one"))
    assert escape.code == 1 and "contains '..'" in escape.stderr  # refused before asking

    every = sandrun(worker.url, "download", job_id, cwd=str(tmp_path))
    assert every.code == 0, every.stderr
    assert (tmp_path / "sandrun-outputs" / job_id / "out" / "result.txt").read_text() == \
        "args="
    gone = sandrun(worker.url, "status", job_id)  # a full download deletes the job
    assert gone.code == 1 and "Job not found" in gone.stderr

    sleeper = SandrunClient(worker.url).submit_code("import time; time.sleep(30)").job_id
    cancel = sandrun(worker.url, "cancel", sleeper)
    assert cancel.code == 0 and f"job {sleeper} " in cancel.stderr
    assert worker.get(f"/status/{sleeper}").status == 404


def test_status_verifies_a_signature_only_against_the_right_worker(tmp_path: Path) -> None:
    from sandrun.identity import WorkerIdentity, write_private_key

    key = WorkerIdentity.generate()
    write_private_key(key, str(tmp_path / "k.pem"))
    with run_worker("--worker-key", str(tmp_path / "k.pem"), *GENEROUS) as signed:
        client = SandrunClient(signed.url)
        job_id = client.submit_code("print(1)").job_id
        client.wait(job_id, timeout=30)
        good = sandrun(signed.url, "status", job_id, "--worker-id", key.worker_id)
        assert good.code == 0 and "result signature verified" in good.stderr
        other = WorkerIdentity.generate().worker_id
        bad = sandrun(signed.url, "status", job_id, "--worker-id", other)
        assert bad.code == 76 and "NOT validly signed" in bad.stderr


def test_a_rate_limited_run_exits_75_with_the_servers_reason(tmp_path: Path) -> None:
    script = write(tmp_path, {"hello.py": "print('hello')\n"})
    with run_worker("--max-active-per-ip", "1", "--max-upload-mb", "1") as limited:
        client = SandrunClient(limited.url)
        occupying = client.submit_code("import time; time.sleep(30)").job_id
        try:
            ran = sandrun(limited.url, "run", os.path.join(script, "hello.py"))
            assert ran.code == 75, ran.stderr
            assert "Rate limit exceeded" in ran.stderr
            assert re.search(r"\(retry after [0-9.]+ s\)", ran.stderr), ran.stderr
            assert ran.stdout == ""
        finally:
            client.cancel(occupying)

        # The same worker refuses an upload over its 1 MB limit: 65, after showing progress.
        big = write(tmp_path / "big", {"main.py": "print(1)\n"})
        with open(os.path.join(big, "blob"), "wb") as f:
            f.write(os.urandom(1_200_000))
        too_big = sandrun(limited.url, "run", big)
        assert too_big.code == 65, too_big.stderr
        assert "Upload too large" in too_big.stderr


def test_an_unreachable_server_exits_69(tmp_path: Path) -> None:
    script = write(tmp_path, {"x.py": "print(1)\n"})
    started = time.monotonic()
    ran = sandrun("http://127.0.0.1:1", "run", os.path.join(script, "x.py"))
    assert ran.code == 69
    assert "Cannot reach http://127.0.0.1:1" in ran.stderr
    assert time.monotonic() - started < 20
