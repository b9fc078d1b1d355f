"""Fetch only, on the host: wheels, --ignore-scripts, pure-Ruby gems; bounded in time and size.

The tests marked ``needs_network`` use the real registries (PyPI, npm) and
stay few and small; ``SANDRUN_TEST_OFFLINE=1`` skips them.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import time
from typing import Any

import pytest

from sandrun.environments.fetch import DependencyCache
from sandrun.environments.requirements import DependencyError, parse_requirements

from .helpers import have, make_gem_source, make_sdist, make_wheel, needs_network


def fetch(cache: DependencyCache, filename: str, text: str):  # type: ignore[no-untyped-def]
    return cache.fetch(parse_requirements(filename, text.encode()))


def entries(root: str) -> list[str]:
    """Every entry and leftover fetch directory under the cache root, as kind/name."""
    found = []
    for kind in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        found += [f"{kind}/{name}" for name in sorted(os.listdir(os.path.join(root, kind)))]
    return found


@needs_network
def test_a_pure_python_and_a_binary_wheel_are_fetched_once_into_the_cache(
        tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "cache")
    cache = DependencyCache(root, timeout=60)
    text = "six==1.16.0\nmarkupsafe==2.1.5\n"
    fetched = fetch(cache, "requirements.txt", text)
    key = parse_requirements("requirements.txt", text.encode()).key
    assert fetched.path == os.path.join(root, "pip", key) and not fetched.cached
    wheels = sorted(os.listdir(os.path.join(fetched.path, "wheels")))
    assert wheels == list(fetched.packages)
    assert wheels[1] == "six-1.16.0-py2.py3-none-any.whl"
    assert wheels[0].startswith("MarkupSafe-2.1.5-cp311-cp311-manylinux")
    for name in wheels:  # readable by every job uid, writable by none
        mode = os.stat(os.path.join(fetched.path, "wheels", name)).st_mode
        assert mode & stat.S_IROTH and not mode & (stat.S_IWOTH | stat.S_IWGRP)
    # No pip this time: a cache whose python does not exist still answers from the entry.
    no_pip = DependencyCache(root, timeout=60, python="/nonexistent/python3")
    again = fetch(no_pip, "requirements.txt", text)
    assert again.cached and again.path == fetched.path and again.packages == fetched.packages
    assert entries(root) == [f"pip/{key}"]


@needs_network
def test_an_unknown_pip_package_fails_with_pip_message_and_leaves_nothing(
        tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "cache")
    with pytest.raises(DependencyError) as caught:
        fetch(DependencyCache(root, timeout=60), "requirements.txt",
              "sandrun-no-such-package-7f3a9c==1.0\n")
    assert caught.value.message.startswith("sandrun-no-such-package-7f3a9c: no such package")
    assert "No matching distribution found" in caught.value.output
    assert entries(root) == []  # no entry, no leftover fetch directory


def test_an_sdist_only_package_is_refused_and_its_setup_py_never_runs(tmp_path: str) -> None:
    index = os.path.join(str(tmp_path), "index")
    os.makedirs(index)
    mark = os.path.join(str(tmp_path), "setup-py-ran")
    make_sdist(index, "sandrun-sdist-only", "1.0", mark)
    root = os.path.join(str(tmp_path), "cache")
    cache = DependencyCache(root, timeout=60, pip_args=("--no-index", "--find-links", index))
    with pytest.raises(DependencyError) as caught:
        fetch(cache, "requirements.txt", "sandrun-sdist-only==1.0\n")
    assert caught.value.message.startswith(
        "sandrun-sdist-only publishes no wheel for this worker's Python")
    assert "only a source distribution" in caught.value.message
    assert "never builds packages on the worker" in caught.value.message
    assert not os.path.exists(mark)
    assert entries(root) == []  # no entry, no leftover fetch directory


@needs_network
def test_a_real_sdist_only_package_from_pypi_is_refused(tmp_path: str) -> None:
    # docopt 0.6.2 has only ever been published as an sdist.
    with pytest.raises(DependencyError, match="only a source distribution"):
        fetch(DependencyCache(str(tmp_path), timeout=60), "requirements.txt", "docopt==0.6.2\n")


def test_a_fetch_over_the_size_cap_fails_and_leaves_nothing(tmp_path: str) -> None:
    index = os.path.join(str(tmp_path), "index")
    os.makedirs(index)
    make_wheel(index, "sandrun-big", "1.0", "DATA = '" + "x" * 200_000 + "'\n")
    root = os.path.join(str(tmp_path), "cache")
    cache = DependencyCache(root, timeout=60, max_bytes=50_000,
                            pip_args=("--no-index", "--find-links", index))
    with pytest.raises(DependencyError, match="larger than 50000 bytes"):
        fetch(cache, "requirements.txt", "sandrun-big==1.0\n")
    assert entries(root) == []  # no entry, no leftover fetch directory


def test_a_fetch_past_its_timeout_is_killed_with_its_children(tmp_path: str) -> None:
    # A stand-in for a pip that hangs: it starts a child that would outlive it.
    fake = os.path.join(str(tmp_path), "hanging-python")
    pidfile = os.path.join(str(tmp_path), "child.pid")
    with open(fake, "w") as f:
        f.write(f"#!/bin/sh\nsleep 60 &\necho $! > {pidfile}\nwait\n")
    os.chmod(fake, 0o755)
    root = os.path.join(str(tmp_path), "cache")
    started = time.monotonic()
    with pytest.raises(DependencyError, match="took longer than 1 s"):
        fetch(DependencyCache(root, timeout=1.0, python=fake), "requirements.txt", "six\n")
    # Killed at its timeout, not when the 60 s child would have let it end (the margin is
    # for a slow or loaded machine; what matters is that it did not wait for the child).
    assert time.monotonic() - started < 30
    with open(pidfile) as f:
        child = int(f.read())
    for _ in range(100):
        if not os.path.exists(f"/proc/{child}") or _zombie(child):
            break
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{child}") or _zombie(child)
    assert entries(root) == []  # no entry, no leftover fetch directory


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@needs_network
def test_an_npm_dependency_is_fetched_without_running_scripts(tmp_path: str) -> None:
    root = os.path.join(str(tmp_path), "cache")
    fetched = fetch(DependencyCache(root, timeout=60), "package.json",
                    json.dumps({"dependencies": {"is-number": "^7.0.0"},
                                "scripts": {"postinstall": "touch /tmp/should-not-run"}}))
    assert fetched.packages == ("is-number@7.0.0",)
    with open(os.path.join(fetched.path, "node_modules", "is-number", "package.json")) as f:
        assert json.load(f)["version"] == "7.0.0"
    with open(os.path.join(fetched.path, "package.json")) as f:
        assert "scripts" not in json.load(f)  # only the dependencies reached npm
    assert not os.path.exists(os.path.join(fetched.path, ".npm-cache"))


@needs_network
def test_an_unknown_npm_package_fails_with_npm_message(tmp_path: str) -> None:
    with pytest.raises(DependencyError) as caught:
        fetch(DependencyCache(str(tmp_path), timeout=60), "package.json",
              json.dumps({"dependencies": {"sandrun-no-such-package-7f3a9c": "1.0.0"}}))
    assert caught.value.message.startswith("npm could not fetch the dependencies")
    assert "404" in caught.value.message


@pytest.mark.skipif(not have("gem", "ruby"), reason="needs ruby and gem")
def test_pure_ruby_gems_are_fetched_with_their_dependencies(tmp_path: str) -> None:
    mark = os.path.join(str(tmp_path), "extconf-ran")
    source = make_gem_source(str(tmp_path), mark)
    cache = DependencyCache(os.path.join(str(tmp_path), "cache"), timeout=60,
                            gem_source=source)
    fetched = fetch(cache, "Gemfile", 'source "https://rubygems.org"\n'
                                      'gem "greeter-sandrun", "~> 1.0"\n')
    assert fetched.packages == ("greeter-sandrun-1.0.0.gem", "hello-sandrun-0.1.0.gem")
    assert sorted(os.listdir(os.path.join(fetched.path, "gems"))) == list(fetched.packages)
    with pytest.raises(DependencyError) as caught:
        fetch(cache, "Gemfile", 'gem "native-sandrun"\n')
    assert caught.value.message == (
        "gem native-sandrun 0.2.0 has native extensions (ext/extconf.rb), which Sandrun does "
        "not build; only pure-Ruby gems are supported")
    assert not os.path.exists(mark)
    with pytest.raises(DependencyError, match="gem sandrun-missing: could not fetch it"):
        fetch(cache, "Gemfile", 'gem "sandrun-missing"\n')


def test_a_set_stop_kills_the_tool_within_a_fraction_of_a_second(tmp_path: Any) -> None:
    import threading

    from sandrun.environments.process import run_bounded

    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    finished = run_bounded(["sleep", "30"], cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"},
                           timeout=60, stop=stop)
    assert finished.stopped and finished.returncode is None and not finished.ok
    assert time.monotonic() - started < 2.0


def test_the_tools_cpu_time_is_measured(tmp_path: Any) -> None:
    from sandrun.environments.process import run_bounded

    spin = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass"
    finished = run_bounded([sys.executable, "-c", spin], cwd=str(tmp_path), env={},
                           timeout=60)
    assert finished.ok and finished.cpu_seconds >= 0.3


def test_past_its_size_cap_the_cache_evicts_its_least_recently_used_entries_not_in_use(
        tmp_path: str) -> None:
    index = os.path.join(str(tmp_path), "index")
    os.makedirs(index)
    for n in range(4):
        make_wheel(index, f"sandrun-p{n}", "1.0", "DATA = '" + f"{n}" * 100_000 + "'\n")
    # Room for about two entries of ~100 KB.
    cache = DependencyCache(os.path.join(str(tmp_path), "cache"), max_total_bytes=250_000,
                            pip_args=("--no-index", "--find-links", index))

    def fetch(n: int) -> str:
        return cache.fetch(parse_requirements("requirements.txt",
                                              f"sandrun-p{n}==1.0\n".encode())).path

    first = fetch(0)
    second = fetch(1)
    cache.release(first)
    cache.release(second)
    os.utime(first, (time.time() - 100, time.time() - 100))  # the least recently used
    third = fetch(2)  # evicts the oldest idle entry: the first
    assert not os.path.exists(first) and os.path.exists(second) and os.path.exists(third)
    # An entry a running job binds is never evicted, whatever its age.
    os.utime(second, (time.time() - 200, time.time() - 200))
    os.utime(third, (time.time() - 300, time.time() - 300))  # in use: kept
    fourth = fetch(3)
    assert os.path.exists(third) and os.path.exists(fourth) and not os.path.exists(second)


def fake_npm(tmp_path: str, config: str) -> str:
    path = os.path.join(str(tmp_path), "npm")
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\ncat <<'EOF'\n{config}\nEOF\n")
    os.chmod(path, 0o755)
    return path


def test_npms_allow_flags_are_used_only_when_the_installed_npm_knows_them(
        tmp_path: str) -> None:
    from sandrun.environments.fetch import NPM_ALLOW_FLAGS, npm_allow_flags

    new = fake_npm(tmp_path, 'allow-directory = "all"\nallow-file = "all"\n'
                   'allow-git = "all"\nallow-remote = "all"\naudit = true')
    assert npm_allow_flags(new, {}) == NPM_ALLOW_FLAGS
    os.unlink(new)
    old = fake_npm(tmp_path, 'audit = true\ngit = "git"')  # an npm without them
    assert npm_allow_flags(old, {}) == ()
    assert npm_allow_flags(os.path.join(str(tmp_path), "absent"), {}) == ()
