"""The README's examples, run as written against a real worker, so they cannot drift.

Every fenced ``sh`` and ``python`` block of README.md that talks to a worker is run, in
order, in a scratch directory: the worker's address replaces ``127.0.0.1:8443``, the
``sandrun`` command is this checkout's, ``$JOB`` is a finished job with a ``result.txt``
output, and a ``JOB=job-…`` placeholder line takes the id the block's own submission got.
``curl`` fails on an HTTP error (``--fail-with-body``), and every block runs under
``set -euo pipefail``: a README command that no longer works fails this test.

Blocks that need what one test worker cannot give (a second machine, a coordinator, root
services, a GPU, docker) are listed in ``NOT_HERE`` with the reason; each entry must still
match a block, so the list cannot go stale either.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .worker import REPO, Worker, run_worker

pytestmark = pytest.mark.timeout(240)

README = Path(REPO, "README.md")
DOCUMENTED = "127.0.0.1:8443"

# A marker found in a block -> why that block is not run here.
NOT_HERE = {
    "sandrun serve": "starts a worker of its own (the operator commands are tested apart)",
    "sandrun-coordinator": "needs a pool of workers (tests/integration/test_coordinator_pool.py)",
    "systemctl": "installs a system service",
    "docker ": "needs docker",
    "scripts/": "installs packages or runs the suite",
    "$COORD": "needs a coordinator with replicas",
    '"gpu"': "needs a GPU",
}
if shutil.which("websocat") is None:
    NOT_HERE["websocat"] = "websocat is not installed here (the Python WebSocket block runs)"

PRELUDE = r"""set -euo pipefail
SANDRUN_README_OUT=$(mktemp)
curl() { command curl --fail-with-body --max-time 60 "$@" | tee -a "$SANDRUN_README_OUT"; echo >> "$SANDRUN_README_OUT"; }
last_job_id() { grep -o '"job_id": *"job-[^"]*"' "$SANDRUN_README_OUT" | tail -1 | grep -o 'job-[^"]*'; }
"""


@dataclass(frozen=True)
class Block:
    line: int
    language: str
    text: str


def blocks() -> list[Block]:
    text = README.read_text()
    return [Block(text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)]


def talks_to_a_worker(block: Block) -> bool:
    return block.language in ("sh", "python") and (
        DOCUMENTED in block.text or "$W" in block.text or "$JOB" in block.text
        or re.search(r"^\s*(?:\S+\s*\|\s*)?(?:\w+=\$\()?sandrun ", block.text, re.MULTILINE) is not None)


def not_here(block: Block) -> str | None:
    return next((why for marker, why in NOT_HERE.items() if marker in block.text), None)


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    # The README's examples make a dozen jobs: this client is exempt, as the README says.
    with run_worker("--quota-exempt", "127.0.0.1") as running:
        yield running


@pytest.fixture(scope="module")
def finished_job(worker: Worker) -> str:
    job_id = worker.submit({"main.py": "open('result.txt', 'w').write('done\\n')\n"},
                           {"entrypoint": "main.py", "outputs": ["*.txt"]})
    assert worker.wait(job_id)["status"] == "completed"
    return job_id


def sandrun_command(directory: Path) -> Path:
    """A ``sandrun`` on PATH that runs this checkout (the installed one may be another)."""
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    script = bin_dir / "sandrun"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m sandrun "$@"\n')
    script.chmod(0o755)
    return bin_dir


def run_block(block: Block, worker: Worker, job_id: str, cwd: Path,
              bin_dir: Path) -> subprocess.CompletedProcess[str]:
    host = worker.url.removeprefix("http://")
    text = block.text.replace(DOCUMENTED, host)
    env = dict(os.environ, JOB=job_id, SANDRUN_URL=worker.url,
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if block.language == "python":
        argv = [sys.executable, "-c", text]
    else:
        text = re.sub(r"^JOB=job-….*$", "JOB=$(last_job_id)", text, flags=re.MULTILINE)
        argv = ["bash", "-c", PRELUDE + text]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_every_readme_example_that_talks_to_a_worker_runs_as_written(
        worker: Worker, finished_job: str, tmp_path: Path) -> None:
    found = [b for b in blocks() if talks_to_a_worker(b)]
    bin_dir = sandrun_command(tmp_path)
    ran: list[int] = []
    for block in found:
        if not_here(block) is not None:
            continue
        cwd = tmp_path / f"block-{block.line}"
        cwd.mkdir()
        done = run_block(block, worker, finished_job, cwd, bin_dir)
        assert done.returncode == 0, (
            f"README.md line {block.line} ({block.language}) failed with {done.returncode}:\n"
            f"{block.text}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}")
        ran.append(block.line)
        if 'run("print(6 * 7)"' in block.text:
            assert done.stdout.split() == ["completed", "42"]  # as its comment says
    # The quick start, the submission forms, the endpoint tour, live output, the CLI and
    # the Python client at least; fewer means blocks stopped being recognised.
    assert len(ran) >= 9, ran


def test_every_block_left_out_is_left_out_for_a_reason_that_still_applies() -> None:
    found = [b for b in blocks() if b.language in ("sh", "python")]
    for marker in NOT_HERE:
        assert any(marker in b.text for b in found), f"no README block needs {marker!r} now"
