"""The web page in a real browser: headless Chromium driven by Selenium.

Against a real worker, and against a real coordinator in front of a real
worker: load the page and the API reference, type a Python snippet into the
editor, upload a file (a tarball, through the coordinator), run it with
Ctrl+Enter, see its output arrive line by line over the WebSocket and the final
status, download the output file it wrote, see the API's message for a 400 (a
refused environment variable) and a 429 (over the client's quota), and check
the page fits a phone's width.  Screenshots of each step are written to the folder this
test prints (``bench/results/web-page/`` by default, or ``$SANDRUN_ARTIFACTS``).

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/install.sh``)
and root (the worker sandboxes real jobs).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.common import remove_worker_cgroup
from tests.integration.worker import REPO, request, run_worker, why_no_worker

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def why_no_browser() -> str | None:
    if why_no_worker() is not None:
        return why_no_worker()
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        return "needs chromium and chromium-driver (scripts/install.sh installs them)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (the test extra)"
    return None


pytestmark = pytest.mark.skipif(why_no_browser() is not None, reason=why_no_browser() or "")

# Prints three lines with pauses (each flushed), then writes an output file from the upload.
SNIPPET = ("import time\n"
           "print('line 1', flush=True); time.sleep(1.0)\n"
           "print('line 2', flush=True); time.sleep(1.0)\n"
           "print('line 3', flush=True)\n"
           "open('result.txt', 'w').write('got ' + open('data.txt').read())\n")
SLEEPER_FILES = {"main.py": "import time\ntime.sleep(60)\n"}
SLEEPER_MANIFEST: dict[str, Any] = {"timeout": 60}


@pytest.fixture(scope="module")
def artifacts() -> str:
    folder = os.environ.get("SANDRUN_ARTIFACTS") or os.path.join(REPO, "bench", "results",
                                                                  "web-page")
    os.makedirs(folder, exist_ok=True)
    print(f"\nweb page screenshots: {folder}")
    return folder


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sandrun-chromium-")
    downloads = tempfile.mkdtemp(prefix="sandrun-downloads-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.add_experimental_option("prefs", {
        "download.default_directory": downloads, "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        shutil.rmtree(downloads, ignore_errors=True)


def until(predicate: Callable[[], Any], within: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    value: str = driver.find_element(By.ID, element_id).text
    return value


def run_with_keyboard(driver: Any) -> None:
    """Ctrl+Enter in the editor, as a person would."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.CSS_SELECTOR, ".CodeMirror-code").click()
    ActionChains(driver).key_down(Keys.CONTROL).send_keys(Keys.ENTER).key_up(
        Keys.CONTROL).perform()


def type_code(driver: Any, code: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver.find_element(By.CSS_SELECTOR, ".CodeMirror-code").click()
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL).send_keys(
        Keys.DELETE).perform()
    # Line by line, each typed from the start of its line: the editor indents nothing here.
    for line in code.splitlines():
        ActionChains(driver).send_keys(line).send_keys(Keys.ENTER).perform()


def exercise(driver: Any, url: str, artifacts: str, tag: str,
             occupy: Callable[[], Callable[[], None]], signed: str, tarball: bool) -> None:
    """The whole flow against one server; ``occupy`` spends the client's quota (returns undo)."""
    from selenium.webdriver.common.by import By

    def shot(step: str) -> None:
        driver.save_screenshot(os.path.join(artifacts, f"{tag}-{step}.png"))

    # The API reference renders from the bundled Redoc and this service's own document.
    driver.get(url + "/docs")
    title = "Sandrun worker" if tag == "worker" else "Sandrun coordinator"
    until(lambda: title in driver.find_element(By.TAG_NAME, "body").text, 30, "the docs")
    assert "/submit" in driver.find_element(By.TAG_NAME, "body").text
    shot("0-docs")

    driver.get(url + "/")
    assert driver.title == "Sandrun"
    until(lambda: driver.find_elements(By.CSS_SELECTOR, "#language option"), 10, "languages")
    assert "python" in text(driver, "language").lower()
    shot("1-loaded")

    type_code(driver, SNIPPET)
    typed = driver.execute_script("return window.sandrunEditor.getValue()")
    assert typed.strip() == SNIPPET.strip()
    # The worker gets a plain file (the JSON form); the coordinator a tarball (the
    # multipart form, unpacked by the worker).
    if tarball:
        upload = os.path.join(driver.downloads, "data.tar.gz")
        with tarfile.open(upload, "w:gz") as tar:
            member = tarfile.TarInfo("data.txt")
            member.size = len(b"uploaded bytes")
            tar.addfile(member, io.BytesIO(b"uploaded bytes"))
    else:
        upload = os.path.join(driver.downloads, "data.txt")
        with open(upload, "w") as f:
            f.write("uploaded bytes")
    driver.find_element(By.ID, "files").send_keys(upload)
    listed = os.path.basename(upload)
    until(lambda: listed in text(driver, "filelist"), 5, "the upload listed")
    shot("2-typed")

    run_with_keyboard(driver)
    try:
        watch_the_run(driver, shot, signed)
    except AssertionError:
        shot("failed")
        raise

    os.unlink(upload)  # read by the page when it ran
    link = until(lambda: driver.find_elements(By.LINK_TEXT, "result.txt"), 10, "the link")[0]
    link.click()
    saved = os.path.join(driver.downloads, "result.txt")
    until(lambda: os.path.exists(saved) and os.path.getsize(saved) > 0, 15, "the download")
    with open(saved) as f:
        assert f.read() == "got uploaded bytes"

    # A 400: an environment variable the sandbox refuses; the API's message is shown.
    driver.find_element(By.CSS_SELECTOR, "#options summary").click()
    driver.find_element(By.ID, "env").send_keys("LD_PRELOAD=/x.so")
    driver.find_element(By.ID, "run").click()
    until(lambda: driver.find_element(By.ID, "error").is_displayed(), 15, "the 400 message")
    message = text(driver, "error")
    assert message.startswith("400 Invalid manifest") and "LD_PRELOAD" in message, message
    shot("5-error-400")
    driver.find_element(By.ID, "env").clear()

    # A 429: the client's one active job is taken by a job submitted outside the page.
    undo = occupy()
    try:
        driver.find_element(By.ID, "run").click()
        until(lambda: text(driver, "error").startswith("429"), 15, "the 429 message")
        message = text(driver, "error")
        assert "Rate limit exceeded" in message and "retry in" in message, message
        shot("6-error-429")
    finally:
        undo()

    # A phone's width: the page still fits, nothing scrolls sideways.
    driver.set_window_size(390, 844)
    wide = driver.execute_script(
        "return document.documentElement.scrollWidth > window.innerWidth + 1")
    assert not wide
    shot("7-phone")


def watch_the_run(driver: Any, shot: Callable[[str], None], signed: str) -> None:
    """The snippet's output arrives line by line, then its end and the result's figures."""
    from selenium.webdriver.common.by import By

    seen: list[str] = []

    def output() -> str:
        now = text(driver, "output")
        if not seen or seen[-1] != now:
            seen.append(now)
        return now

    until(lambda: "line 1" in output(), 30, "the first line")
    shot("3-running")
    until(lambda: "line 3" in output(), 30, "the last line")
    # Seen growing: the first line alone, then the rest, while the job ran.
    assert any("line 1" in s and "line 2" not in s for s in seen), seen
    assert any("line 2" in s and "line 3" not in s for s in seen), seen
    until(lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")
          == "done", 30, "the end of the job")
    assert text(driver, "status") == "completed"
    assert text(driver, "reason") == "completed" and text(driver, "exit") == "0"
    assert text(driver, "cpu").endswith(" s") and text(driver, "wall").endswith(" s")
    assert text(driver, "memory-peak").endswith("MiB")
    assert signed in text(driver, "signature")
    shot("4-finished")


def test_the_page_runs_a_job_on_a_real_worker(browser: Any, artifacts: str) -> None:
    with run_worker("--max-active-per-ip", "1") as worker:
        def occupy() -> Callable[[], None]:
            job_id = worker.submit(SLEEPER_FILES, SLEEPER_MANIFEST)

            def undo() -> None:
                worker.delete(f"/jobs/{job_id}")

            return undo

        exercise(browser, worker.url, artifacts, "worker", occupy, signed="unsigned",
                 tarball=False)


def test_the_page_runs_a_job_through_a_real_coordinator(browser: Any, artifacts: str) -> None:
    from tests.integration.test_coordinator_pool import (
        CoordinatorProcess,
        PoolWorker,
        keygen,
    )

    scratch = tempfile.mkdtemp(prefix="sandrun-page-pool-")
    key = os.path.join(scratch, "w1.pem")
    worker_id = keygen(key)
    worker = PoolWorker("w1", scratch, key)
    workers_path = os.path.join(scratch, "workers.json")
    with open(workers_path, "w") as f:
        json.dump([{"name": "w1", "worker_id": worker_id, "endpoint": worker.url,
                    "max_concurrent_jobs": 2}], f)
    coordinator = CoordinatorProcess(scratch, workers_path,
                                     ("--health-interval", "1", "--max-active-per-ip", "1"))
    try:
        worker.start()
        worker.wait_healthy()
        coordinator.start_and_wait()

        def occupy() -> Callable[[], None]:
            sleeper = {"manifest": SLEEPER_MANIFEST, "files": SLEEPER_FILES}
            reply = request(coordinator.url, "POST", "/submit", json.dumps(sleeper).encode(),
                            {"Content-Type": "application/json"})
            assert reply.status == 200, reply.body
            job_id = reply.json()["job_id"]

            def undo() -> None:
                request(coordinator.url, "DELETE", f"/jobs/{job_id}")

            return undo

        exercise(browser, coordinator.url, artifacts, "coordinator", occupy,
                 signed="signature verified", tarball=True)
        assert coordinator.stop() == 0, coordinator.log()
        assert worker.stop() == 0, worker.log()
        assert worker.mounts() == []
    finally:
        for process in (coordinator, worker):
            if process.running():
                process.kill()
        for point in reversed(worker.mounts()):
            subprocess.run(["umount", "-l", point], check=False)
        remove_worker_cgroup(worker.cgroup)
        shutil.rmtree(scratch, ignore_errors=True)

