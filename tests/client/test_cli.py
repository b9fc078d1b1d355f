"""The client commands' parsing, manifests and exit statuses (no server needed)."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest

from sandrun.cli import build_parser
from sandrun.client.cli import (
    EX_DATAERR,
    EX_TEMPFAIL,
    EX_UNAVAILABLE,
    _directory_manifest,
    _manifest,
    error_exit_code,
    exit_code_for,
    run_client_command,
)
from sandrun.client.errors import (
    BadRequestError,
    NotFoundError,
    QueueFullError,
    RateLimitedError,
    SandrunConnectionError,
    SandrunError,
    ServerError,
)


@pytest.mark.parametrize(("status", "reason", "exit_code", "signal", "expected"), [
    ("completed", "completed", 0, None, 0),
    ("failed", "exit_nonzero", 3, None, 3),
    ("failed", "exit_nonzero", 255, None, 255),
    ("failed", "signaled", None, 9, 137),
    ("failed", "timeout", None, None, 124),
    ("failed", "memory_limit", None, 9, 125),
    ("failed", "cpu_limit", None, None, 125),
    ("failed", "output_limit", None, None, 125),
    ("failed", "disk_limit", None, None, 125),
    ("failed", "cancelled", None, None, 130),
    ("failed", "sandbox_error", None, None, 70),
    ("failed", "install_failed", None, None, 70),
    ("failed", "worker_lost", None, None, 70),
    ("failed", "replica_disagreement", 0, None, 76),
    ("failed", "something_new", None, None, 70),
])
def test_a_finished_job_maps_to_its_documented_exit_status(
        status: str, reason: str, exit_code: int | None, signal: int | None,
        expected: int) -> None:
    assert exit_code_for(status, reason, exit_code, signal) == expected


def test_client_errors_map_to_their_exit_statuses() -> None:
    assert error_exit_code(RateLimitedError("Rate limit exceeded", retry_after=3)) == EX_TEMPFAIL
    assert error_exit_code(QueueFullError("Queue full")) == EX_TEMPFAIL
    assert error_exit_code(SandrunConnectionError("Cannot reach")) == EX_UNAVAILABLE
    assert error_exit_code(ServerError("HTTP 500")) == EX_UNAVAILABLE
    assert error_exit_code(BadRequestError("Invalid manifest")) == EX_DATAERR
    assert error_exit_code(NotFoundError("Job not found")) == 1
    # A coordinator answers 410 for the logs of a job whose worker is gone.
    lost = SandrunError("Worker lost", "w1 is down", status=410, reason="worker_lost")
    assert error_exit_code(lost) == 70


def test_server_and_tls_options_go_before_the_command_as_well_as_after_it() -> None:
    assert parse("--server", "http://a:1", "status", "job-x").server == "http://a:1"
    assert parse("status", "job-x", "--server", "http://b:2").server == "http://b:2"
    assert parse("status", "job-x").server is None
    both = parse("--insecure", "--cacert", "ca.pem", "run", "x.py")
    assert both.insecure is True and both.cacert == "ca.pem"
    assert parse("run", "x.py", "--insecure").insecure is True


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_arguments_after_double_dash_go_to_the_job_wherever_the_options_are() -> None:
    args = parse("run", "proj", "--env", "A=1", "--timeout", "5", "--", "x", "--y", "-z")
    assert (args.path, args.args, args.env, args.timeout) == ("proj", ["x", "--y", "-z"],
                                                               ["A=1"], 5)
    assert parse("run", "proj").args == []
    assert parse("run", "--output", "out/*", "proj", "--", "--").args == ["--"]


def test_command_line_fields_become_a_manifest() -> None:
    args = parse("run", "p", "--entrypoint", "src/app.py", "--interpreter", "python3",
                 "--env", "A=1", "--env", "B=x=y", "--output", "out/", "--output", "*.csv",
                 "--timeout", "9", "--memory", "256", "--environment", "default",
                 "--requirements", "requirements.txt", "--", "one")
    assert _manifest(args) == {
        "entrypoint": "src/app.py", "interpreter": "python3", "args": ["one"],
        "env": {"A": "1", "B": "x=y"}, "outputs": ["out/", "*.csv"], "timeout": 9,
        "memory_mb": 256, "environment": "default", "requirements": "requirements.txt"}
    assert _manifest(parse("run", "p")) is None
    assert _manifest(parse("run", "p", "--replicas", "3")) == {"replicas": 3}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        _manifest(parse("run", "p", "--env", "novalue"))


def test_a_directory_manifest_overlays_job_json_or_guesses_main(tmp_path: Path) -> None:
    root = str(tmp_path)
    open(os.path.join(root, "main.sh"), "w").close()
    assert _directory_manifest(root, None) == {"entrypoint": "main.sh"}
    assert _directory_manifest(root, {"timeout": 3}) == {"entrypoint": "main.sh", "timeout": 3}
    with open(os.path.join(root, "job.json"), "w") as f:
        json.dump({"entrypoint": "run.py", "timeout": 10, "env": {"A": "1"}}, f)
    assert _directory_manifest(root, None) is None  # the worker reads job.json itself
    assert _directory_manifest(root, {"timeout": 3}) == {
        "entrypoint": "run.py", "timeout": 3, "env": {"A": "1"}}


def test_a_directory_without_an_entrypoint_is_refused_before_upload(tmp_path: Path) -> None:
    (tmp_path / "lib.py").write_text("")
    with pytest.raises(ValueError, match="--entrypoint"):
        _directory_manifest(str(tmp_path), None)


def test_a_missing_path_exits_66_without_contacting_the_server(tmp_path: Path) -> None:
    err = io.StringIO()
    args = parse("run", str(tmp_path / "nope"), "--server", "http://127.0.0.1:1")
    assert run_client_command(args, io.StringIO(), err) == 66
    assert "no such file or directory" in err.getvalue()


def test_an_unreachable_server_exits_69_with_the_reason() -> None:
    err = io.StringIO()
    args = parse("status", "job-x", "--server", "http://127.0.0.1:1")
    assert run_client_command(args, io.StringIO(), err) == 69
    assert "Cannot reach http://127.0.0.1:1" in err.getvalue()
    assert run_client_command(parse("status", "job-x", "--server", "ftp://x"),
                              io.StringIO(), io.StringIO()) == 2
