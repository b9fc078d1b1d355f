"""A new user's first hour, with the real ``sandrun`` command against a real worker.

One test (or more) per row of ``sandrun run``'s exit-status table (``sandrun.client.cli``
and the README), and the command-line habits people bring from docker and curl: piped
stdin, ``--json``, ``--detach``, ``--server`` before the command, one-line errors for a
server that is not Sandrun (or not TLS), and a suggestion for a mistyped option.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandrun.client import SandrunClient

from .test_client_cli import GENEROUS, Ran, sandrun, write
from .worker import REPO, Worker, run_worker

pytestmark = pytest.mark.timeout(90)

# A short default timeout, so a job that sets none runs out of it quickly.
DEFAULT_TIMEOUT = 2


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker(*GENEROUS, "--default-timeout", str(DEFAULT_TIMEOUT)) as running:
        yield running


def job(tmp_path: Path, name: str, code: str) -> str:
    write(tmp_path, {name: code})
    return str(tmp_path / name)


def run_with_stdin(url: str, data: str, *argv: str) -> Ran:
    env = dict(os.environ, SANDRUN_URL=url,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "sandrun", *argv], input=data, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return Ran(done.returncode, done.stdout, done.stderr)


# -- the exit-status table, row by row --------------------------------------------------------


def test_row_0_a_completed_job(worker: Worker, tmp_path: Path) -> None:
    assert sandrun(worker.url, "run", job(tmp_path, "ok.py", "print('ok')\n")).code == 0


def test_row_n_the_entrypoints_own_status(worker: Worker, tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", job(tmp_path, "three.py", "raise SystemExit(3)\n"))
    assert ran.code == 3, ran.stderr


def test_row_128_plus_n_killed_by_a_signal(worker: Worker, tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", job(tmp_path, "segv.py",
                                         "import ctypes\nctypes.string_at(0)\n"))
    assert ran.code == 128 + 11, ran.stderr
    assert "killed by signal 11" in ran.stderr


def test_row_124_out_of_time_says_the_limit_even_when_the_default_applied(
        worker: Worker, tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", job(tmp_path, "slow.py", "import time\ntime.sleep(30)\n"))
    assert ran.code == 124, ran.stderr
    assert f"ran out of time ({DEFAULT_TIMEOUT} s)" in ran.stderr  # no --timeout was given


def test_row_125_a_resource_limit(worker: Worker, tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", job(tmp_path, "chatty.py", "print('x' * 100)\n"),
                  "--cpu-seconds", "0.5", "--", "ignored")
    assert ran.code == 0, ran.stderr  # a job within its limits
    hog = job(tmp_path, "spin.py", "while True:\n    pass\n")
    ran = sandrun(worker.url, "run", hog, "--cpu-seconds", "0.5", "--timeout", "30")
    assert ran.code == 125, ran.stderr
    assert "used up its CPU time (0.5 s)" in ran.stderr


def test_row_130_a_job_cancelled_from_elsewhere(worker: Worker, tmp_path: Path) -> None:
    sleeper = job(tmp_path, "sleeper.py", "import time\nprint('up', flush=True)\n"
                                          "time.sleep(60)\n")
    env = dict(os.environ, SANDRUN_URL=worker.url,
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen([sys.executable, "-m", "sandrun", "run", sleeper, "--timeout",
                                "60"], env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline() == "up\n"  # it runs, and we watch it
    job_id = next(iter(worker_jobs(worker)))
    assert worker.delete(f"/jobs/{job_id}").status == 200  # as sandrun cancel would
    code = process.wait(30)
    stderr = process.stderr.read()
    assert code == 130, stderr
    assert f"job {job_id} was cancelled and deleted elsewhere" in stderr


def worker_jobs(worker: Worker) -> list[str]:
    """Ids of the jobs the worker runs now, newest first (the worker logs each start)."""
    started = re.findall(r"job (job-[A-Za-z0-9_-]+) started", worker.log())
    live = [j for j in dict.fromkeys(reversed(started))
            if worker.get(f"/status/{j}").status == 200
            and worker.get(f"/status/{j}").json()["status"] == "running"]
    assert live, worker.log()[-2000:]
    return live


def test_row_75_rate_limited_is_covered_with_its_reason_in_test_client_cli() -> None:
    from tests.integration import test_client_cli

    assert hasattr(test_client_cli, "test_a_rate_limited_run_exits_75_with_the_servers_reason")


def test_row_70_an_install_that_fails_and_its_log_is_shown_even_quietly(
        worker: Worker, tmp_path: Path) -> None:
    project = write(tmp_path / "p", {"main.py": "print('never')\n",
                                     "requirements.txt": "--index-url http://example.invalid\n"})
    ran = sandrun(worker.url, "run", project, "--requirements", "requirements.txt", "-q")
    assert ran.code == 70, ran.stderr
    assert ran.stdout == ""  # the program never ran, and the install's log is not stdout
    assert "sandrun: install failed:" in ran.stderr


def test_row_69_a_server_that_is_not_sandrun_is_one_line(tmp_path: Path) -> None:
    class Page(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = b"<!DOCTYPE html><html><body><h1>Not here</h1>" + b"x" * 500 + b"</html>"
            self.send_response(404 if self.path.startswith("/status") else 502)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        ran = sandrun(url, "run", job(tmp_path, "x.py", "print(1)\n"))
    finally:
        server.shutdown()
        server.server_close()
    assert ran.code == 69, ran.stderr
    assert ran.stderr.count("\n") == 1 and "<html" not in ran.stderr.lower(), ran.stderr
    assert "not the Sandrun API (text/html" in ran.stderr


def test_row_69_https_against_a_plain_http_worker_says_so_at_once(
        worker: Worker, tmp_path: Path) -> None:
    started = time.monotonic()
    ran = sandrun(worker.url.replace("http://", "https://"), "status", "job-" + "A" * 24)
    assert ran.code == 69, ran.stderr
    assert "does not speak TLS" in ran.stderr and "http://" in ran.stderr
    assert "_ssl.c" not in ran.stderr and ran.stderr.count("\n") == 1
    assert time.monotonic() - started < 20  # not the 30 s client timeout


def test_row_66_a_path_that_does_not_exist(worker: Worker, tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", str(tmp_path / "nowhere.py"))
    assert ran.code == 66 and "no such file or directory" in ran.stderr


def test_row_65_a_file_that_cannot_run_is_refused_naming_interpreter(
        worker: Worker, tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", job(tmp_path, "x.txt", "hello\n"))
    assert ran.code == 65, ran.stderr
    assert "interpreter" in ran.stderr and "x.txt" in ran.stderr


def test_row_76_a_result_not_signed_by_the_given_worker(worker: Worker, tmp_path: Path) -> None:
    from sandrun.identity import WorkerIdentity

    other = WorkerIdentity.generate().worker_id
    ran = sandrun(worker.url, "run", job(tmp_path, "x.py", "print(1)\n"), "--worker-id", other)
    assert ran.code == 76 and "NOT validly signed" in ran.stderr


def test_row_1_an_unknown_job(worker: Worker) -> None:
    ran = sandrun(worker.url, "status", "job-" + "B" * 24)
    assert ran.code == 1 and "Job not found" in ran.stderr


def test_row_2_a_mistyped_option_is_refused_with_the_close_one(worker: Worker,
                                                               tmp_path: Path) -> None:
    ran = sandrun(worker.url, "run", "--memroy", "64", job(tmp_path, "hi.js", "1\n"))
    assert ran.code == 2
    assert "unknown option --memroy (did you mean --memory?)" in ran.stderr
    assert "hi.js" not in ran.stderr.splitlines()[-1]  # the file is not blamed
    typo = sandrun(worker.url, "stauts", "job-x")
    assert typo.code == 2 and "did you mean status?" in typo.stderr


# -- habits from docker and curl ------------------------------------------------------------


def test_piped_stdin_reaches_the_job(worker: Worker, tmp_path: Path) -> None:
    reader = job(tmp_path, "rd.py", "import sys\nprint(sys.stdin.read().upper(), end='')\n")
    ran = run_with_stdin(worker.url, "x\ny\n", "run", reader)
    assert ran.code == 0, ran.stderr
    assert ran.stdout == "X\nY\n"


def test_json_prints_one_document_with_status_logs_and_outputs(worker: Worker,
                                                                tmp_path: Path) -> None:
    maker = job(tmp_path, "mk.py", "open('r.txt', 'w').write('42')\nprint('made')\n"
                                   "import sys\nprint('note', file=sys.stderr)\n")
    ran = sandrun(worker.url, "run", maker, "--json", cwd=str(tmp_path))
    assert ran.code == 0, ran.stderr
    document = json.loads(ran.stdout)  # stdout is the document alone
    assert (document["status"], document["exit_code"], document["reason"]) == \
        ("completed", 0, "completed")
    assert (document["stdout"], document["stderr"]) == ("made\n", "note\n")
    assert [os.path.basename(p) for p in document["outputs"]] == ["r.txt"]
    assert Path(tmp_path, document["outputs"][0]).read_text() == "42"
    assert document["execution_metadata"]["limits"]["timeout"] == DEFAULT_TIMEOUT


def test_detach_prints_the_job_id_and_keep_shows_it_even_quietly(worker: Worker,
                                                                  tmp_path: Path) -> None:
    script = job(tmp_path, "d.py", "print('detached')\n")
    ran = sandrun(worker.url, "run", script, "--detach")
    assert ran.code == 0, ran.stderr
    job_id = ran.stdout.strip()
    assert re.fullmatch(r"job-[A-Za-z0-9_-]+", job_id), ran.stdout
    assert SandrunClient(worker.url).wait(job_id, timeout=30).status == "completed"
    kept = sandrun(worker.url, "run", script, "-q", "--keep")
    assert kept.code == 0
    found = re.search(r"job (job-[A-Za-z0-9_-]+) kept on the server", kept.stderr)
    assert found, kept.stderr
    assert worker.get(f"/status/{found.group(1)}").status == 200


def test_server_may_come_before_the_command(worker: Worker, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SANDRUN_URL"}
    env["PYTHONPATH"] = REPO + os.pathsep + os.environ.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-m", "sandrun", "--server", worker.url, "run",
                           job(tmp_path, "s.py", "print('via global')\n")], env=env,
                          capture_output=True, text=True, timeout=60, check=False,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout == "via global\n", done.stderr
