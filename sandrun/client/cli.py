"""The client side of the ``sandrun`` command: ``run``, ``status``, ``logs``, ``download``, ``cancel``.

``sandrun/cli.py`` owns the parser and ``sys.argv``; it calls
``add_client_commands`` to add these subcommands and ``run_client_command``
to run one.  Output of the job goes to stdout and stderr as the job wrote it;
everything ``sandrun`` itself says goes to stderr, prefixed ``sandrun:``.

Exit status of ``sandrun run`` (``EXIT_CODES`` and ``exit_code_for`` below; the README's
table is this one, and ``tests/integration/test_first_hour.py`` runs every row):

====  ================================================================
0     the job completed (its entrypoint exited 0); ``--detach``: submitted
N     the job's entrypoint exited with N (1-255)
128+N the job was killed by signal N
124   the job ran out of time (``timeout``)
125   the job hit a resource limit: memory, CPU time, output or disk
130   the job was cancelled, here (Ctrl-C) or elsewhere (``sandrun cancel``,
      ``DELETE``)
75    try again later: rate limited (429) or queue/storage full (503);
      the message gives the server's reason and ``retry_after``
70    the job could not run: sandbox error, dependency install failed,
      worker lost (also through a coordinator) or shut down
69    the server could not be reached, is not a Sandrun server, or
      answered with a server error
66    PATH does not exist or cannot be read
65    the server refused the submission (invalid manifest/upload, too large)
76    ``--worker-id`` was given and the result's signature does not verify,
      or the replicas of a ``--replicas N`` job disagree
1     any other error (unknown or expired job, unsafe output archive, ...)
2     bad command line
====  ================================================================

The other commands (and ``sandrun verify``) exit 0 on success and use the same codes for
errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import IO, Any

__all__ = ["EXIT_CODES", "add_client_commands", "error_exit_code", "exit_code_for",
           "run_client_command"]

COMMANDS = ("run", "status", "logs", "download", "cancel")
UPLOAD_PROGRESS_BYTES = 1024 * 1024
MAX_STDIN_BYTES = 1024 * 1024  # the worker's own cap on a manifest's stdin (Limits)

EX_DATAERR = 65
EX_NOINPUT = 66
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EXIT_TIMEOUT = 124
EXIT_LIMIT = 125
EXIT_CANCELLED = 130

# A finished job's ``reason`` -> exit status (``exit_nonzero`` and ``signaled`` are computed).
EXIT_CODES: dict[str, int] = {
    "completed": 0,
    "timeout": EXIT_TIMEOUT,
    "memory_limit": EXIT_LIMIT,
    "cpu_limit": EXIT_LIMIT,
    "output_limit": EXIT_LIMIT,
    "disk_limit": EXIT_LIMIT,
    "cancelled": EXIT_CANCELLED,
    "sandbox_error": EX_SOFTWARE,
    "install_failed": EX_SOFTWARE,
    "worker_lost": EX_SOFTWARE,
    "shutdown": EX_SOFTWARE,
    "replica_disagreement": 76,  # as an unverified result: there is no answer to trust
}

# Entrypoints tried, in order, for a directory with neither --entrypoint nor job.json.
_ENTRYPOINT_GUESSES = ("main.py", "main.sh", "main.js", "main.mjs", "main.rb", "main.R",
                       "main.pl", "main.php", "main")


def exit_code_for(status: str, reason: str | None, exit_code: int | None,
                  signal: int | None = None) -> int:
    """The exit status of ``sandrun run`` for a finished job (see the module table)."""
    if status == "completed":
        return 0
    if reason == "exit_nonzero" and exit_code is not None and 0 < exit_code < 256:
        return exit_code
    if reason == "signaled":
        return 128 + signal if signal else EX_SOFTWARE
    if reason in EXIT_CODES:
        return EXIT_CODES[reason]
    if exit_code is not None and 0 < exit_code < 256:
        return exit_code
    return EX_SOFTWARE


# -- parser -----------------------------------------------------------------------------


def add_client_commands(subparsers: Any) -> None:
    """Add ``run``, ``status``, ``logs``, ``download`` and ``cancel`` to ``sandrun``'s parser."""
    common = argparse.ArgumentParser(add_help=False)
    add_connection_options(common, suppress=True)
    common.add_argument("-q", "--quiet", action="store_true",
                        help="say nothing on stderr but errors")

    run = subparsers.add_parser(
        "run", parents=[common], help="run a directory or a file in the sandbox",
        description="Upload PATH_OR_FILE, stream its output live, download its outputs and "
                    "exit with the job's exit status (124 timeout, 125 resource limit, "
                    "75 rate limited: see the documentation). Arguments after -- go to the "
                    "job.")
    # Arguments for the job come after "--", wherever the options are: argparse alone
    # cannot take "run DIR --env A=1 -- x y" (it binds positionals at their first sight).
    run.__class__ = _SplitAtDashes
    run.usage = "sandrun run [options] PATH_OR_FILE [-- ARG ...]"
    run.add_argument("path", metavar="PATH_OR_FILE", help="directory (packed, honouring "
                     ".sandrunignore) or single file; arguments for the job follow --")
    run.set_defaults(args=[])
    run.add_argument("--entrypoint", help="file to run, relative to the directory")
    run.add_argument("--interpreter", help="interpreter (default: from the extension)")
    run.add_argument("--env", action="append", default=[], metavar="K=V",
                     help="environment variable for the job (repeatable)")
    run.add_argument("--output", action="append", default=[], metavar="GLOB",
                     help="output pattern to keep (repeatable; default: every file)")
    run.add_argument("--timeout", type=int, metavar="SECONDS", help="wall-clock limit")
    run.add_argument("--memory", type=int, metavar="MB", help="memory limit in MB")
    run.add_argument("--cpu-seconds", type=float, metavar="SECONDS", help="CPU-time limit")
    run.add_argument("--replicas", type=int, metavar="N",
                     help="through a coordinator: run on N workers and accept only a "
                          "result they all signed alike")
    run.add_argument("--environment", help="environment template (see /environments)")
    run.add_argument("--requirements", metavar="FILE",
                     help="requirements.txt, package.json or Gemfile in the upload")
    run.add_argument("--stdin-file", metavar="FILE", help="file given to the job on stdin")
    run.add_argument("--outputs-dir", metavar="DIR",
                     help="where outputs go (default ./sandrun-outputs/JOB_ID)")
    run.add_argument("--no-download", action="store_true", help="do not download outputs")
    run.add_argument("--keep", action="store_true",
                     help="leave the job on the server (default: delete it once done)")
    run.add_argument("--worker-id", help="verify the signed result against this worker id")
    run.add_argument("-i", "--interactive", action="store_true",
                     help="send our stdin to the job even from a terminal (read to end of "
                          "file first); without it stdin is sent when it is not a terminal")
    run.add_argument("--json", action="store_true",
                     help="print one JSON document (status, logs, output paths) on stdout "
                          "instead of the job's live output")
    run.add_argument("-d", "--detach", action="store_true",
                     help="print the job id on stdout and exit 0 once the job is accepted")

    status = subparsers.add_parser("status", parents=[common],
                                   help="show a job's status (JSON)")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--worker-id", help="also verify the signed result (exit 76 if not)")

    logs = subparsers.add_parser("logs", parents=[common], help="print a job's output")
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="stream output live until the job ends")

    download = subparsers.add_parser("download", parents=[common],
                                     help="download a job's outputs")
    download.add_argument("job_id", metavar="JOB_ID")
    download.add_argument("file", nargs="?", metavar="PATH",
                          help="one output (default: all of them, which deletes the job)")
    download.add_argument("-o", "--outputs-dir", metavar="DIR",
                          help="destination (default ./sandrun-outputs/JOB_ID)")

    cancel = subparsers.add_parser("cancel", parents=[common],
                                   help="cancel a job and delete its data")
    cancel.add_argument("job_id", metavar="JOB_ID")


def add_connection_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """``--server``, ``--cacert``, ``--insecure``: before the subcommand (global, with
    ``suppress=False``) or after it (``suppress=True``: absent unless given, so the
    global value stands)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--server", metavar="URL", default=default,
                        help="worker or coordinator URL (default: $SANDRUN_URL or "
                             "http://127.0.0.1:8443)")
    parser.add_argument("--cacert", metavar="FILE", default=default,
                        help="CA certificate(s) that sign an https:// server's certificate "
                             "(default: the system's, or $SSL_CERT_FILE)")
    parser.add_argument("--insecure", action="store_true",
                        default=argparse.SUPPRESS if suppress else False,
                        help="do not check an https:// server's certificate (testing only)")


def ssl_context_for(args: argparse.Namespace) -> Any:
    """The TLS context ``--cacert``/``--insecure`` ask for; None: the system's defaults
    (which honour ``SSL_CERT_FILE``)."""
    import ssl

    cacert, insecure = getattr(args, "cacert", None), getattr(args, "insecure", False)
    if not cacert and not insecure:
        return None
    context = ssl.create_default_context(cafile=cacert or None)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _SplitAtDashes(argparse.ArgumentParser):
    """A parser that hands everything after the first ``--`` to ``args``, unparsed."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        strings = list(sys.argv[1:] if args is None else args)
        rest: list[str] = []
        if "--" in strings:
            cut = strings.index("--")
            strings, rest = strings[:cut], strings[cut + 1:]
        parsed, extras = super().parse_known_args(strings, namespace)
        parsed.args = list(getattr(parsed, "args", None) or []) + rest
        return parsed, extras


# -- running ----------------------------------------------------------------------------


def run_client_command(args: argparse.Namespace, stdout: IO[str] | None = None,
                       stderr: IO[str] | None = None) -> int:
    """Run one client command; its exit status."""
    from sandrun.client.errors import SandrunError
    from sandrun.client.sync import SandrunClient

    out = stdout or sys.stdout
    err = stderr or sys.stderr
    say = _Say(err, args.quiet)
    try:
        client = SandrunClient(getattr(args, "server", None), ssl_context=ssl_context_for(args))
    except (ValueError, OSError) as e:  # a bad URL; a --cacert that cannot be read
        say.error(str(e))
        return 2
    handlers: dict[str, Callable[[Any, argparse.Namespace, IO[str], _Say], int]] = {
        "run": _run, "status": _status, "logs": _logs, "download": _download,
        "cancel": _cancel}
    try:
        return handlers[args.command](client, args, out, say)
    except SandrunError as e:
        say.error(str(e))
        return error_exit_code(e)
    except KeyboardInterrupt:
        say.error("interrupted")
        return EXIT_CANCELLED


def error_exit_code(e: Exception) -> int:
    """The exit status for a client error (see the module table)."""
    from sandrun.client import errors

    reason = getattr(e, "reason", None)
    if reason in ("worker_lost", "shutdown"):  # a coordinator's 410 for a lost worker
        return EXIT_CODES[reason]
    if isinstance(e, (errors.RateLimitedError, errors.ServiceUnavailableError)):
        return EX_TEMPFAIL
    if isinstance(e, (errors.SandrunConnectionError, errors.ServerError, errors.ProtocolError)):
        return EX_UNAVAILABLE
    if isinstance(e, (errors.BadRequestError, errors.PayloadTooLargeError,
                      errors.UnsupportedMediaTypeError)):
        return EX_DATAERR
    return 1


class _Say:
    def __init__(self, stream: IO[str], quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            print(f"sandrun: {message}", file=self.stream, flush=True)

    def error(self, message: str) -> None:
        print(f"sandrun: {message}", file=self.stream, flush=True)


def _run(client: Any, args: argparse.Namespace, out: IO[str], say: _Say) -> int:
    from sandrun.client.errors import NotFoundError, SandrunError, StreamUnavailableError

    path = args.path
    if not os.path.exists(path):
        say.error(f"{path}: no such file or directory")
        return EX_NOINPUT
    try:
        manifest = _manifest(args)
        given = None if args.stdin_file else _stdin_for_job(args)
    except (ValueError, OSError) as e:
        say.error(str(e))
        return EX_NOINPUT if isinstance(e, OSError) else 2
    if given:  # piped in, as docker run -i does
        manifest = {**(manifest or {}), "stdin": given}
    if args.json:  # stdout is the JSON document alone
        say = _Say(say.stream, True)
    progress = _UploadProgress(say)
    inputs: dict[str, str] = {}
    if os.path.isdir(path):
        try:
            manifest = _directory_manifest(path, manifest)
        except (ValueError, OSError) as e:
            say.error(str(e))
            return 2
        submitted, packed = client.submit_directory_packed(path, manifest, progress=progress)
        for relpath, why in packed.skipped:
            say.info(f"not uploaded: {relpath} ({why})")
        inputs = {f.path: f.sha256 for f in packed.files}
    else:
        if manifest is not None:
            manifest.setdefault("entrypoint", os.path.basename(path))
        try:
            submitted = client.submit_file(path, manifest, progress=progress)
        except PermissionError as e:
            say.error(f"{path}: {e.strerror}")
            return EX_NOINPUT
        inputs = {os.path.basename(path): _sha256_file(path)}
    progress.finish()
    job_id = submitted.job_id
    if args.detach:
        out.write(job_id + "\n")
        out.flush()
        return 0
    say.info(f"job {job_id} {submitted.status}"
             + (f" (position {submitted.position})" if submitted.position else ""))
    shown = _Shown()
    try:
        try:
            if args.json:
                client.wait(job_id)
            else:
                _follow(client, job_id, out, say, shown)
        except StreamUnavailableError:
            _poll(client, job_id, out, say, shown)
        job = client.status(job_id)
        if not job.finished:
            job = client.wait(job_id)
    except KeyboardInterrupt:
        _cancel_quietly(client, job_id, say)
        return EXIT_CANCELLED
    except NotFoundError:
        # Gone while we watched: cancelled (DELETE, sandrun cancel) from elsewhere.
        say.error(f"job {job_id} was cancelled and deleted elsewhere")
        return EXIT_CANCELLED
    code = exit_code_for(job.status, job.reason, job.exit_code, job.execution.signal)
    logs = None
    if args.json or job.reason == "install_failed":
        try:
            logs = client.logs(job_id)
        except SandrunError:
            logs = None
    if job.reason == "install_failed" and logs is not None and not shown.install:
        _write(say.stream, logs.install)  # why it failed, even with -q
    if job.status != "completed":
        say.info(_describe_failure(job, args))
    if args.worker_id:
        if not client.verify(job, args.worker_id):
            say.error(f"the result of {job_id} is NOT validly signed by {args.worker_id}")
            return EX_PROTOCOL
        say.info("result signature verified")
    keep_all = bool(args.output) or bool((manifest or {}).get("outputs"))
    written: list[str] = []
    if job.reason != "worker_lost":  # its outputs went with it
        written = _collect_outputs(client, job, args, inputs, keep_all, say)
    if args.keep:  # the id is what --keep is for: shown even with -q
        say.error(f"job {job_id} kept on the server: sandrun download {job_id}, "
                  f"sandrun cancel {job_id}")
    if args.json:
        document = {"job_id": job_id, "status": job.status, "reason": job.reason,
                    "exit_code": job.exit_code, "signal": job.execution.signal,
                    "message": job.execution.message, "exit_status": code,
                    "execution_metadata": job.raw.get("execution_metadata"),
                    "stdout": logs.stdout if logs else None,
                    "stderr": logs.stderr if logs else None,
                    "install": logs.install if logs else None,
                    "outputs": written, "kept": bool(args.keep)}
        out.write(json.dumps(document, indent=2) + "\n")
        out.flush()
    return code


class _Shown:
    """What of a job's log has been shown on our terminal."""

    def __init__(self) -> None:
        self.install = False


def _stdin_for_job(args: argparse.Namespace, stdin: IO[str] | None = None) -> str | None:
    """Our stdin, for the job: when it is not a terminal, or with ``-i``; None: none."""
    stream = stdin if stdin is not None else sys.stdin
    if stream is None or stream.closed:
        return None
    try:
        tty = stream.isatty()
    except (OSError, ValueError):
        return None
    if tty and not args.interactive:
        return None
    try:
        data = stream.buffer.read(MAX_STDIN_BYTES + 1) if hasattr(stream, "buffer") \
            else stream.read(MAX_STDIN_BYTES + 1).encode()
    except (OSError, ValueError):  # not readable after all
        return None
    if len(data) > MAX_STDIN_BYTES:
        raise ValueError(f"stdin: more than {MAX_STDIN_BYTES} bytes; the worker takes at most "
                         "that (put the data in a file of the upload instead)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("stdin: not UTF-8 text; put binary data in a file of the upload") \
            from None


def _manifest(args: argparse.Namespace) -> dict[str, Any] | None:
    """The manifest fields given on the command line; None when none were."""
    fields: dict[str, Any] = {}
    if args.entrypoint:
        fields["entrypoint"] = args.entrypoint
    if args.interpreter:
        fields["interpreter"] = args.interpreter
    if args.args:
        fields["args"] = list(args.args)
    if args.env:
        env = {}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--env {item!r}: use NAME=VALUE")
            env[name] = value
        fields["env"] = env
    if args.output:
        fields["outputs"] = list(args.output)
    if args.timeout is not None:
        fields["timeout"] = args.timeout
    if args.memory is not None:
        fields["memory_mb"] = args.memory
    if args.cpu_seconds is not None:
        fields["cpu_seconds"] = args.cpu_seconds
    if args.replicas is not None:
        fields["replicas"] = args.replicas
    if args.environment:
        fields["environment"] = args.environment
    if args.requirements:
        fields["requirements"] = args.requirements
    if args.stdin_file:
        with open(args.stdin_file, encoding="utf-8") as f:
            fields["stdin"] = f.read()
    return fields or None


def _directory_manifest(path: str, given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The form manifest for a directory: job.json overlaid with the command line.

    None (send no form manifest) when the directory has a job.json and the
    command line adds nothing: the worker reads job.json itself.
    """
    job_json = os.path.join(path, "job.json")
    base: dict[str, Any] = {}
    if os.path.isfile(job_json):
        if given is None:
            return None
        with open(job_json, encoding="utf-8") as f:
            try:
                base = json.load(f)
            except ValueError as e:
                raise ValueError(f"{job_json}: not valid JSON ({e})") from None
        if not isinstance(base, dict):
            raise ValueError(f"{job_json}: must be a JSON object")
    manifest = {**base, **(given or {})}
    if "entrypoint" not in manifest:
        found = [name for name in _ENTRYPOINT_GUESSES if os.path.isfile(os.path.join(path, name))]
        if not found:
            raise ValueError(f"{path}: no job.json and no main.* file; give --entrypoint")
        manifest["entrypoint"] = found[0]
    return manifest


def _follow(client: Any, job_id: str, out: IO[str], say: _Say,
            shown: _Shown | None = None) -> None:
    """Copy the live output to our stdout and stderr until the job ends.

    The install step's log goes to stderr (unless ``-q``): it is never the job's stdout.
    """
    from sandrun.client.errors import SandrunConnectionError, SandrunError, StreamUnavailableError
    from sandrun.client.models import OutputChunk, StatusUpdate

    shown = shown or _Shown()
    printed = {"stdout": 0, "stderr": 0, "install": 0}
    try:
        for event in client.stream(job_id):
            if isinstance(event, OutputChunk):
                if event.stream == "install":
                    if not say.quiet:
                        _write(say.stream, event.data)
                        shown.install = True
                else:
                    _write(out if event.stream == "stdout" else say.stream, event.data)
                printed[event.stream] = printed.get(event.stream, 0) + len(event.data)
            elif isinstance(event, StatusUpdate) and event.status == "running":
                say.info(f"job {job_id} running")
    except SandrunConnectionError as e:
        if not any(printed.values()):
            raise StreamUnavailableError(e.error, e.details) from None
        say.info(f"live output interrupted ({e.details}); waiting for the job")
        job = client.wait(job_id)
        if job.reason == "worker_lost":
            return  # nothing more to fetch from a worker that is gone
        try:
            logs = client.logs(job_id)
        except SandrunError as lost:
            say.info(f"the rest of the output is lost: {lost}")
            return
        _write(out, logs.stdout[printed["stdout"]:])
        _write(say.stream, logs.stderr[printed["stderr"]:])


def _poll(client: Any, job_id: str, out: IO[str], say: _Say,
          shown: _Shown | None = None) -> None:
    """No live output: wait for the end, then print everything at once."""
    job = client.wait(job_id)
    if job.reason == "worker_lost":
        return
    logs = client.logs(job_id)
    if logs.install and not say.quiet:
        _write(say.stream, logs.install)
        if shown is not None:
            shown.install = True
    _write(out, logs.stdout)
    _write(say.stream, logs.stderr)


def _write(stream: IO[str], text: str) -> None:
    if text:
        stream.write(text)
        stream.flush()


def _describe_failure(job: Any, args: argparse.Namespace) -> str:
    reason = job.reason or "unknown"
    run = job.execution
    # The limits it ran under come from the worker (its defaults filled in).
    timeout = run.timeout or args.timeout
    memory = run.memory_mb or args.memory
    cpu = run.cpu_seconds_limit or args.cpu_seconds
    what = {"exit_nonzero": f"exited with status {job.exit_code}",
            "signaled": f"was killed by signal {job.execution.signal}",
            "timeout": "ran out of time" + (f" ({timeout} s)" if timeout else ""),
            "memory_limit": "ran out of memory" + (f" ({memory} MB)" if memory else ""),
            "cpu_limit": "used up its CPU time" + (f" ({cpu:g} s)" if cpu else ""),
            "output_limit": "printed more output than the worker keeps",
            "disk_limit": "filled its job directory",
            "cancelled": "was cancelled",
            "worker_lost": "was lost with its worker (it died or restarted)",
            "install_failed": "could not install its dependencies",
            "sandbox_error": "could not be started in the sandbox",
            "replica_disagreement": "got different results from its replicas"}.get(
                reason, f"failed ({reason})")
    message = job.execution.message
    return f"job {job.job_id} {what}" + (f": {message}" if message else "")


def _collect_outputs(client: Any, job: Any, args: argparse.Namespace, inputs: Mapping[str, str],
                     keep_all: bool, say: _Say) -> list[str]:
    """Download the outputs, then delete the job from the server unless ``--keep``.

    Without an explicit ``outputs`` list the worker lists only what the job
    made or changed; uploaded files that come back unchanged are never
    downloaded again (older workers list them too).
    """
    if args.no_download:
        return []
    wanted = [path for path, info in job.output_files.items()
              if keep_all or inputs.get(path) != info.sha256]
    dest = args.outputs_dir or os.path.join("sandrun-outputs", job.job_id)
    if wanted and not args.keep and len(wanted) == len(job.output_files):
        # The worker deletes the job after; the archive's paths are relative to dest.
        written = [os.path.join(dest, p) for p in client.download_all(job.job_id, dest)]
    else:
        written = [client.download_to(job.job_id, path, dest) for path in wanted]
        if not args.keep:
            client.cancel(job.job_id)
    if written:
        say.info(f"{len(written)} output file{'s' if len(written) != 1 else ''} in {dest}")
    return [str(path) for path in written]


def _cancel_quietly(client: Any, job_id: str, say: _Say) -> None:
    from sandrun.client.errors import SandrunError

    try:
        client.cancel(job_id)
        say.error(f"interrupted: job {job_id} cancelled")
    except SandrunError as e:
        say.error(f"interrupted; cancelling {job_id} failed: {e}")


def _sha256_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


class _UploadProgress:
    """Upload progress on stderr for bodies over 1 MB: a live line on a terminal, else two."""

    def __init__(self, say: _Say, clock: Callable[[], float] = time.monotonic) -> None:
        self.say = say
        self.clock = clock
        self.tty = say.stream.isatty() if hasattr(say.stream, "isatty") else False
        self.started: float | None = None
        self.shown = -1.0
        self.total = 0

    def __call__(self, sent: int, total: int) -> None:
        if self.say.quiet or total <= UPLOAD_PROGRESS_BYTES:
            return
        now = self.clock()
        if self.started is None:
            self.started, self.total = now, total
            if not self.tty:
                self.say.info(f"uploading {_mb(total)}")
        if self.tty and (now - self.shown >= 0.1 or sent == total):
            self.shown = now
            self.say.stream.write(f"\rsandrun: uploading {_mb(sent)} / {_mb(total)} "
                                  f"({100 * sent // total}%)")
            self.say.stream.flush()

    def finish(self) -> None:
        if self.started is None:
            return
        if self.tty:
            self.say.stream.write("\n")
        self.say.info(f"uploaded {_mb(self.total)} in {self.clock() - self.started:.1f} s")
        self.started = None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


# -- the other commands -------------------------------------------------------------------


def _status(client: Any, args: argparse.Namespace, out: IO[str], say: _Say) -> int:
    job = client.status(args.job_id)
    out.write(json.dumps(job.raw, indent=2) + "\n")
    if args.worker_id:
        if not client.verify(job, args.worker_id):
            say.error(f"the result of {job.job_id} is NOT validly signed by {args.worker_id}")
            return EX_PROTOCOL
        say.info("result signature verified")
    return 0


def _logs(client: Any, args: argparse.Namespace, out: IO[str], say: _Say) -> int:
    from sandrun.client.errors import StreamUnavailableError

    if args.follow:
        try:
            _follow(client, args.job_id, out, say)
            return 0
        except StreamUnavailableError:
            _poll(client, args.job_id, out, say)
            return 0
    logs = client.logs(args.job_id)
    _write(out, logs.stdout)
    _write(say.stream, logs.stderr)
    for name, cut in (("stdout", logs.stdout_truncated), ("stderr", logs.stderr_truncated)):
        if cut:
            say.info(f"{name} was truncated at the worker's output limit")
    return 0


def _download(client: Any, args: argparse.Namespace, out: IO[str], say: _Say) -> int:
    dest = args.outputs_dir or os.path.join("sandrun-outputs", args.job_id)
    if args.file:
        written = client.download_to(args.job_id, args.file, dest)
        say.info(f"wrote {written}")
        return 0
    paths = client.download_all(args.job_id, dest)
    say.info(f"{len(paths)} output file{'s' if len(paths) != 1 else ''} in {dest}")
    return 0


def _cancel(client: Any, args: argparse.Namespace, out: IO[str], say: _Say) -> int:
    result = client.cancel(args.job_id)
    say.info(f"job {result.job_id} {'cancelled and ' if result.cancelled else ''}deleted")
    return 0
