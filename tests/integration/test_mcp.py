"""``sandrun-mcp`` driven over stdio by the MCP SDK's own client, against a real worker."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

mcp = pytest.importorskip("mcp")

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from .worker import REPO, Worker, run_worker

pytestmark = pytest.mark.timeout(60)

GENEROUS = ("--jobs-per-hour", "1000", "--max-active-per-ip", "50", "--cpu-quota", "1000")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    with run_worker(*GENEROUS) as running:
        yield running


def session_run(url: str | None, steps: Any, env: dict[str, str] | None = None) -> Any:
    """Start ``sandrun-mcp`` as a subprocess, initialise a session and run ``steps(session)``."""
    args = ["-m", "sandrun.mcp_server"] + (["--server", url] if url else [])
    params = StdioServerParameters(
        command=sys.executable, args=args, cwd=REPO,
        env={"PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             **(env or {})})

    async def main(quiet: Any) -> Any:
        async with stdio_client(params, errlog=quiet) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            return await steps(session)

    with open(os.devnull, "w") as quiet:  # the server's own log lines
        return anyio.run(main, quiet)


def result_of(answer: Any) -> dict[str, Any]:
    assert not answer.is_error, answer.content
    document: dict[str, Any] = json.loads(answer.content[0].text)
    return document


def test_the_server_lists_its_tools_with_their_parameters(worker: Worker) -> None:
    async def steps(session: Any) -> Any:
        return (await session.list_tools()).tools

    tools = {tool.name: tool for tool in session_run(worker.url, steps)}
    assert set(tools) == {"run_code", "run_files", "get_status", "get_logs", "get_outputs"}
    run_code = tools["run_code"].input_schema
    assert set(run_code["required"]) == {"language", "code"}
    assert {"args", "stdin", "timeout"} <= set(run_code["properties"])
    assert set(tools["run_files"].input_schema["required"]) == {"files"}  # manifest optional
    assert "manifest" in tools["run_files"].input_schema["properties"]
    assert tools["get_status"].input_schema["required"] == ["job_id"]


def test_a_python_snippet_runs_and_its_output_comes_back(worker: Worker) -> None:
    code = ("import sys\n"
            "open('answer.txt', 'w').write('forty-two')\n"
            "print(6 * 7, sys.argv[1], sys.stdin.read())\n"
            "print('warning', file=sys.stderr)\n")

    async def steps(session: Any) -> Any:
        ran = result_of(await session.call_tool(
            "run_code", {"language": "python", "code": code, "args": ["arg"],
                         "stdin": "from-stdin", "timeout": 30}))
        job_id = ran["job_id"]
        status = result_of(await session.call_tool("get_status", {"job_id": job_id}))
        logs = result_of(await session.call_tool("get_logs", {"job_id": job_id}))
        outputs = await session.call_tool("get_outputs", {"job_id": job_id})
        return ran, status, logs, outputs

    ran, status, logs, outputs = session_run(worker.url, steps)
    assert (ran["status"], ran["exit_code"]) == ("completed", 0)
    assert ran["stdout"] == "42 arg from-stdin\n"
    assert ran["stderr"] == "warning\n"
    # The snippet itself is not echoed back; the file it wrote is, inline.
    assert [(o["path"], o.get("text")) for o in ran["outputs"]] == [("answer.txt", "forty-two")]
    assert (status["job_id"], status["status"], status["reason"]) == \
        (ran["job_id"], "completed", "completed")
    assert logs["stdout"] == "42 arg from-stdin\n"
    assert not outputs.is_error
    listed = {o["path"]: o for o in outputs.structured_content["result"]}
    assert listed["answer.txt"]["text"] == "forty-two" and "main.py" not in listed


def test_run_files_takes_a_manifest_and_reports_a_failure(worker: Worker) -> None:
    files = {"app/run.sh": 'echo "env=$GREETING"; exit 5\n'}
    manifest = {"entrypoint": "app/run.sh", "env": {"GREETING": "hi"}}

    async def steps(session: Any) -> Any:
        return result_of(await session.call_tool("run_files",
                                                 {"files": files, "manifest": manifest}))

    ran = session_run(worker.url, steps)
    assert (ran["status"], ran["reason"], ran["exit_code"]) == ("failed", "exit_nonzero", 5)
    assert ran["stdout"] == "env=hi\n"
    assert ran["outputs"] == []  # only the unchanged input, which is not echoed


def test_server_errors_are_tool_errors_with_the_servers_message(worker: Worker) -> None:
    async def steps(session: Any) -> Any:
        unknown = await session.call_tool("get_status", {"job_id": "job-nosuchjob0000"})
        bad = await session.call_tool("run_files", {"files": {"a.py": "1"},
                                                    "manifest": {"timeout": "soon"}})
        language = await session.call_tool("run_code", {"language": "cobol", "code": "x"})
        return unknown, bad, language

    unknown, bad, language = session_run(worker.url, steps)
    assert unknown.is_error and "Job not found" in unknown.content[0].text
    assert bad.is_error and "Invalid manifest" in bad.content[0].text
    assert "timeout" in bad.content[0].text
    assert language.is_error and "unknown language 'cobol'" in language.content[0].text


def test_the_server_url_comes_from_sandrun_url(worker: Worker) -> None:
    async def steps(session: Any) -> Any:
        return result_of(await session.call_tool("run_code", {"language": "bash",
                                                              "code": "echo from-env"}))

    ran = session_run(None, steps, env={"SANDRUN_URL": worker.url})
    assert ran["stdout"] == "from-env\n"


def test_an_unreachable_worker_is_a_tool_error_not_a_crash() -> None:
    async def steps(session: Any) -> Any:
        return await session.call_tool("get_logs", {"job_id": "job-x"})

    answer = session_run("http://127.0.0.1:1", steps)
    assert answer.is_error and "Cannot reach http://127.0.0.1:1" in answer.content[0].text


def test_run_files_needs_no_manifest_for_one_file_and_says_the_limits_it_ran_under(
        worker: Worker) -> None:
    async def steps(session: Any) -> Any:
        return result_of(await session.call_tool(
            "run_files", {"files": {"hello.py": "print('hi from one file')\n"}}))

    ran = session_run(worker.url, steps)
    assert (ran["status"], ran["exit_code"]) == ("completed", 0), ran
    assert ran["stdout"] == "hi from one file\n" and ran["install"] == ""
    assert ran["limits"] == {"timeout": 300, "memory_mb": 512, "cpu_seconds": None}
