"""The happy paths: every interpreter on the host runs inside, with the job's files, input and env."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import pytest_twisted

from sandrun.sandbox.policy import SANDBOX_PATH, SandboxPolicy
from sandrun.wire import Reason

from .conftest import JobRunner

INPUT = "from the job dir\n"
PROGRAMS = {
    "python3": ("main.py", "print(6 * 7, open('input.txt').read().strip())\n",
                ("python3", "main.py")),
    "node": ("main.js", "const fs = require('fs');\n"
                        "console.log(6 * 7, fs.readFileSync('input.txt', 'utf8').trim());\n",
             ("node", "main.js")),
    "bash": ("main.sh", "echo $((6 * 7)) $(cat input.txt)\n", ("bash", "main.sh")),
    "perl": ("main.pl", "open(my $f, '<', 'input.txt'); my $l = <$f>; chomp $l;\n"
                        "print 6 * 7, \" $l\\n\";\n", ("perl", "main.pl")),
    "ruby": ("main.rb", "puts \"#{6 * 7} #{File.read('input.txt').strip}\"\n",
             ("ruby", "main.rb")),
    "php": ("main.php", "<?php echo 6 * 7, ' ', trim(file_get_contents('input.txt')), \"\\n\";\n",
            ("php", "main.php")),
    "Rscript": ("main.R", "cat(6 * 7, readLines('input.txt'), '\\n')\n",
                ("Rscript", "main.R")),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("language", sorted(PROGRAMS))
@pytest_twisted.ensureDeferred
async def test_an_interpreter_runs_a_program_from_the_job_directory(
        runner: JobRunner, language: str) -> None:
    name, source, argv = PROGRAMS[language]
    job_dir = runner.new_dir({name: source, "input.txt": INPUT})
    ran = await runner.run(argv, job_dir=job_dir,
                           policy=SandboxPolicy(timeout_seconds=30))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out.strip() == "42 from the job dir", ran.describe()


HELLO_C = r"""
#include <stdio.h>
int main(int argc, char **argv) {
    printf("static hello from %s\n", argv[0]);
    return 0;
}
"""


@pytest_twisted.ensureDeferred
async def test_a_static_binary_built_in_the_job_directory_runs(runner: JobRunner) -> None:
    job_dir = runner.new_dir({"hello.c": HELLO_C})
    subprocess.run(["gcc", "-static", "-o", os.path.join(job_dir, "hello"),
                    os.path.join(job_dir, "hello.c")], check=True)
    ran = await runner.run(("./hello",), job_dir=job_dir)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out == "static hello from ./hello\n"


@pytest_twisted.ensureDeferred
async def test_the_environment_is_scrubbed_to_the_sandboxs_and_the_manifests(
        runner: JobRunner) -> None:
    os.environ["SANDRUN_TEST_SECRET"] = "host-only"
    try:
        ran = await runner.run(("env",), env=(("MY_SETTING", "on"), ("OTHER", "a=b")))
    finally:
        del os.environ["SANDRUN_TEST_SECRET"]
    env = dict(line.split("=", 1) for line in ran.lines())
    assert env == {"PATH": SANDBOX_PATH, "HOME": "/job", "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp", "TERM": "dumb",
                   "MY_SETTING": "on", "OTHER": "a=b"}


@pytest_twisted.ensureDeferred
async def test_the_manifest_cannot_override_the_sandboxs_own_variables(
        runner: JobRunner) -> None:
    ran = await runner.run(("env",), env=(("PATH", "/job/bin"), ("HOME", "/"),
                                          ("LD_PRELOAD", "/job/evil.so")))
    env = dict(line.split("=", 1) for line in ran.lines())
    assert env["PATH"] == SANDBOX_PATH and env["HOME"] == "/job"
    assert env["LD_PRELOAD"] == "/job/evil.so"  # the job's own choice, for its own process


@pytest_twisted.ensureDeferred
async def test_stdin_is_delivered_and_defaults_to_empty(runner: JobRunner) -> None:
    data = b"line one\nline two\n" + bytes(range(256))
    ran = await runner.run(("cat",), stdin=data)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.stdout == data
    ran = await runner.run(("wc", "-c"))
    assert ran.out.strip() == "0"


@pytest_twisted.ensureDeferred
async def test_stdout_and_stderr_are_kept_apart(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "echo to-out; echo to-err >&2; echo more-out"))
    assert ran.stdout == b"to-out\nmore-out\n"
    assert ran.stderr == b"to-err\n"


@pytest.mark.timeout(20)
@pytest_twisted.ensureDeferred
async def test_output_arrives_chunk_by_chunk_while_the_job_runs(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "for i in 1 2 3; do echo tick $i; sleep 0.3; done"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    ticks = [(t, data) for t, stream, data in ran.chunks if stream == "stdout"]
    assert [data for _, data in ticks] == [b"tick 1\n", b"tick 2\n", b"tick 3\n"]
    gaps = [later - earlier for (earlier, _), (later, _) in zip(ticks, ticks[1:])]
    assert all(gap >= 0.2 for gap in gaps), gaps
    # The first line was delivered long before the job ended.
    assert ran.ended - ticks[0][0] >= 0.6


@pytest_twisted.ensureDeferred
async def test_exit_codes_and_signals_are_told_apart(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "exit 3"))
    assert (ran.reason, ran.result.exit_code, ran.result.signal) == (
        Reason.EXIT_NONZERO, 3, None)
    ran = await runner.python("import ctypes; ctypes.string_at(0)")
    assert (ran.reason, ran.result.exit_code, ran.result.signal) == (
        Reason.SIGNALED, None, signal.SIGSEGV)
    ran = await runner.run(("true",))
    assert (ran.reason, ran.result.exit_code, ran.result.signal) == (Reason.COMPLETED, 0, None)
    assert ran.result.wall_time_ms > 0 and ran.result.memory_peak_bytes > 0


@pytest_twisted.ensureDeferred
async def test_a_file_is_cut_at_the_file_size_limit_and_its_writer_ends_with_SIGXFSZ(runner: JobRunner) -> None:
    job_dir = runner.new_dir()
    policy = SandboxPolicy(file_size_bytes=1_000_000)
    ran = await runner.run(("bash", "-c", "head -c 2000000 /dev/zero > /job/big"),
                           job_dir=job_dir, policy=policy)
    # head is killed by SIGXFSZ; bash reports it as 128 + 25.
    assert (ran.reason, ran.result.exit_code) == (Reason.EXIT_NONZERO, 128 + 25), ran.describe()
    assert os.path.getsize(os.path.join(job_dir, "big")) == 1_000_000
    # The job's own process (PID 2, under the sandbox's init) gets SIGXFSZ as it would
    # outside, and so ends with disk_limit.
    ran = await runner.run(("dd", "if=/dev/zero", "of=/job/big2", "bs=1M", "count=2"),
                           job_dir=job_dir, policy=policy)
    assert (ran.reason, ran.result.exit_code, ran.result.signal) == (
        Reason.DISK_LIMIT, None, signal.SIGXFSZ), ran.describe()
    assert os.path.getsize(os.path.join(job_dir, "big2")) == 1_000_000
