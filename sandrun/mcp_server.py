"""``sandrun-mcp``: Sandrun as Model Context Protocol tools, over stdio.

Built on the official ``mcp`` Python SDK (``MCPServer`` in mcp 2.x, the same
class that 1.x called ``FastMCP``).  The tools call a Sandrun worker or
coordinator through ``SandrunClient``, in a thread so the server's event loop
stays free:

- ``run_code(language, code, args?, stdin?, timeout?)``: run a snippet, wait,
  return its status, exit code, stdout, stderr and outputs;
- ``run_files(files, manifest)``: the same for a set of files and a manifest;
- ``get_status(job_id)``, ``get_logs(job_id)``, ``get_outputs(job_id)``.

A server error (rate limit, bad manifest, unknown job, ...) is a tool error
whose text is the server's ``error``, ``details`` and ``retry_after``.
Nothing but the protocol may go to stdout; diagnostics go to stderr.

    sandrun-mcp --server http://127.0.0.1:8443     # or SANDRUN_URL
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sandrun import __version__
from sandrun.client import SandrunClient, SandrunError, WaitTimeoutError
from sandrun.client.body import LANGUAGES
from sandrun.client.models import Job, OutputFile

__all__ = ["build_server", "main"]

INLINE_OUTPUT_BYTES = 64 * 1024  # an output this small and textual comes back inline
INLINE_TOTAL_BYTES = 256 * 1024  # at most this much inline text per answer
DEFAULT_JOB_TIMEOUT = 300  # the worker's default when a manifest gives none
WAIT_SLACK = 60  # seconds of queueing allowed on top of the job's own timeout
_TEXT_TYPES = ("application/json", "application/xml", "application/javascript",
               "application/x-yaml", "application/yaml", "application/csv")

T = TypeVar("T")

INSTRUCTIONS = (
    "Runs code in Sandrun, an anonymous sandbox: no network, a fresh directory per job, "
    "limits on time and memory, nothing kept after the job. run_code runs a snippet "
    f"(languages: {', '.join(sorted(set(LANGUAGES)))}) and returns its exit code, stdout, "
    "stderr and output files; run_files runs several files with a manifest "
    "(entrypoint, args, env, stdin, outputs, timeout, memory_mb, requirements). "
    "Files the job writes come back as outputs; small text outputs are inline.")


def _sdk() -> tuple[Any, type[Exception]]:
    """The SDK's server class and tool error: ``MCPServer`` in mcp 2, ``FastMCP`` in 1.x."""
    try:
        from mcp.server.mcpserver import MCPServer
        from mcp.server.mcpserver.exceptions import ToolError
    except ImportError:
        from mcp.server.fastmcp import FastMCP as MCPServer  # type: ignore[no-redef,attr-defined,unused-ignore]
        from mcp.server.fastmcp.exceptions import ToolError  # type: ignore[no-redef,unused-ignore]
    return MCPServer, ToolError


def build_server(client: SandrunClient) -> Any:
    """The MCP server whose tools use ``client``."""
    MCPServer, _ = _sdk()
    server = MCPServer("sandrun", instructions=INSTRUCTIONS, version=__version__)

    @server.tool()
    async def run_code(language: str, code: str, args: list[str] | None = None,
                       stdin: str | None = None, timeout: int | None = None) -> dict[str, Any]:
        """Run a code snippet in the sandbox and wait for it to finish.

        language: python, javascript, bash, ruby, r, perl or php.
        args: command-line arguments. stdin: text given on standard input.
        timeout: wall-clock limit in seconds (the worker's default is 300).
        Returns status, reason, exit_code, stdout, stderr and outputs.
        """
        def run() -> dict[str, Any]:
            submitted = client.submit_code(code, language, args=args, stdin=stdin,
                                           timeout=timeout)
            snippet = {LANGUAGES.get(language.strip().lower(), ""): _sha256(code)}
            return _finish(client, submitted.job_id, timeout, unchanged=snippet)

        return await _call(run)

    @server.tool()
    async def run_files(files: dict[str, str],
                        manifest: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run a set of text files, with an optional Sandrun manifest, and wait for it to finish.

        files: path -> text content. manifest (optional for one file, which is then its
        own entrypoint): entrypoint, args, env, stdin, outputs (glob patterns), timeout,
        memory_mb, interpreter, requirements, environment.
        Returns status, reason, exit_code, stdout, stderr, install (the dependency
        install's log), limits (the limits it ran under) and outputs.
        """
        manifest = dict(manifest or {})

        def run() -> dict[str, Any]:
            submitted = client.submit_files(files, manifest or None)
            limit = manifest.get("timeout") if isinstance(manifest.get("timeout"), int) else None
            inputs = {} if manifest.get("outputs") else \
                {path: _sha256(text) for path, text in files.items()}
            return _finish(client, submitted.job_id, limit, unchanged=inputs)

        return await _call(run)

    @server.tool()
    async def get_status(job_id: str) -> dict[str, Any]:
        """The status of a job: queued, running, completed or failed, with how it ran."""
        return await _call(lambda: _status(client.status(job_id)))

    @server.tool()
    async def get_logs(job_id: str) -> dict[str, Any]:
        """The stdout and stderr a job has printed so far."""
        def logs() -> dict[str, Any]:
            got = client.logs(job_id)
            return {"job_id": got.job_id, "stdout": got.stdout, "stderr": got.stderr,
                    "install": got.install,
                    "stdout_truncated": got.stdout_truncated,
                    "stderr_truncated": got.stderr_truncated}

        return await _call(logs)

    @server.tool()
    async def get_outputs(job_id: str) -> list[dict[str, Any]]:
        """The output files of a finished job; small text files come with their content."""
        return await _call(lambda: _outputs(client, job_id))

    return server


async def _call(work: Callable[[], T]) -> T:
    """Run blocking client work in a thread; a Sandrun error becomes a tool error."""
    import anyio.to_thread

    _, ToolError = _sdk()
    try:
        return await anyio.to_thread.run_sync(work)
    except SandrunError as e:
        raise ToolError(str(e)) from e
    except ValueError as e:  # e.g. an unknown language
        raise ToolError(str(e)) from e


def _finish(client: SandrunClient, job_id: str, timeout: int | None,
            unchanged: Mapping[str, str]) -> dict[str, Any]:
    """Wait for the job; its status, logs and outputs (minus inputs that came back as sent).

    Without an ``outputs`` list every file of the job is an output, the
    uploaded ones included: echoing the caller's own code back is noise.
    """
    try:
        job = client.wait(job_id, timeout=(timeout or DEFAULT_JOB_TIMEOUT) + WAIT_SLACK)
    except WaitTimeoutError:
        result = _status(client.status(job_id))
        result["note"] = "still not finished; ask again with get_status and get_logs"
        return result
    logs = client.logs(job_id)
    result = _status(job)
    result.update(stdout=logs.stdout, stderr=logs.stderr, install=logs.install,
                  stdout_truncated=logs.stdout_truncated, stderr_truncated=logs.stderr_truncated,
                  outputs=_outputs(client, job_id, unchanged))
    return result


def _status(job: Job) -> dict[str, Any]:
    run = job.execution
    return {"job_id": job.job_id, "status": job.status, "reason": run.reason,
            "exit_code": run.exit_code, "signal": run.signal, "message": run.message,
            "queue_position": job.queue_position, "wall_time_ms": run.wall_time_ms,
            "cpu_seconds": run.cpu_seconds, "memory_peak_bytes": run.memory_peak_bytes,
            # What it ran under, the worker's defaults filled in: "timeout" means "300 s".
            "limits": {"timeout": run.timeout, "memory_mb": run.memory_mb,
                       "cpu_seconds": run.cpu_seconds_limit},
            "worker_id": job.worker.worker_id}


def _outputs(client: SandrunClient, job_id: str,
             unchanged: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    listed = client.outputs(job_id)
    budget = INLINE_TOTAL_BYTES
    found: list[dict[str, Any]] = []
    for output in listed.files:
        if unchanged and unchanged.get(output.path) == output.sha256:
            continue
        entry: dict[str, Any] = {"path": output.path, "size_bytes": output.size_bytes,
                                 "mime_type": output.mime_type, "sha256": output.sha256}
        if _inline(output) and output.size_bytes <= budget:
            text = _text(client.download(job_id, output.path))
            if text is not None:
                entry["text"] = text
                budget -= output.size_bytes
        found.append(entry)
    return found


def _inline(output: OutputFile) -> bool:
    if output.size_bytes > INLINE_OUTPUT_BYTES:
        return False
    kind = (output.mime_type or "").split(";")[0].strip()
    return kind.startswith("text/") or kind in _TEXT_TYPES or kind in ("",
                                                                       "application/octet-stream")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _text(data: bytes) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sandrun-mcp", description="Sandrun tools for MCP clients, over stdio.")
    parser.add_argument("--server", metavar="URL",
                        help="worker or coordinator URL (default: $SANDRUN_URL or "
                             "http://127.0.0.1:8443)")
    parser.add_argument("--version", action="version", version=f"sandrun-mcp {__version__}")
    args = parser.parse_args(argv)
    try:
        client = SandrunClient(args.server)
    except ValueError as e:
        sys.exit(f"sandrun-mcp: {e}")
    try:
        server = build_server(client)
    except ImportError:
        sys.exit("sandrun-mcp: the mcp package is missing: pip install 'sandrun[mcp]'")
    server.run("stdio")



if __name__ == "__main__":
    main()
