"""What a job can see and touch of the filesystem: its own files, a read-only runtime, no more."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import pytest_twisted

from sandrun.sandbox.mounts import TOP_LINKS
from sandrun.sandbox.policy import SANDBOX_PATH
from sandrun.wire import Reason

from .conftest import JobRunner, install

LOOK = """
import json, os, sys
found = {}
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as f:
            f.read(1)
        found[path] = "readable"
    except OSError as e:
        found[path] = os.strerror(e.errno)
print(json.dumps(found))
"""


@pytest_twisted.ensureDeferred
async def test_host_secrets_and_homes_are_absent(runner: JobRunner) -> None:
    paths = ["/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh/ssh_host_rsa_key",
             "/root/.bashrc", "/root", "/home", "/run", "/sys/kernel", "/var/log",
             "/boot", "/mnt", "/proc/kmsg"]
    ran = await runner.run(("python3", "-I", "-S", "-c", LOOK, *paths))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    found = json.loads(ran.out)
    for path in paths[:-1]:
        assert found[path] == "No such file or directory", (path, found[path])
    # /proc is the job's own, but its kernel files still need privileges the job lacks.
    assert found["/proc/kmsg"] == "Permission denied"


@pytest_twisted.ensureDeferred
async def test_the_root_holds_only_the_sandbox_layout(runner: JobRunner) -> None:
    ran = await runner.python("import os, json; print(json.dumps(sorted(os.listdir('/'))))")
    allowed = {"usr", "etc", "job", "tmp", "dev", "proc", "opt", ".old"} | {
        name for name in TOP_LINKS if os.path.lexists(os.path.join("/", name))}
    listed = set(json.loads(ran.out))
    assert {"usr", "etc", "job", "tmp", "dev", "proc"} <= listed
    assert listed <= allowed, listed - allowed


@pytest_twisted.ensureDeferred
async def test_etc_is_the_sandbox_copy_with_its_own_passwd(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "ls /etc; echo ---; cat /etc/passwd; echo ---; "
                            "id -un; cat /etc/resolv.conf"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    listing, passwd, rest = ran.out.split("---\n")
    assert "shadow" not in listing.split()
    with open("/etc/passwd") as f:
        host_users = {line.split(":")[0] for line in f if line.strip()}
    users = {line.split(":")[0] for line in passwd.splitlines()}
    assert users - {"root", "nobody"} == {f"job{uid}" for uid in runner.uids}
    assert not (host_users - {"root", "nobody"}) & users
    whoami, resolv = rest.split("\n", 1)
    assert whoami in {f"job{uid}" for uid in runner.uids}
    assert "nameserver" not in resolv


@pytest_twisted.ensureDeferred
async def test_the_jobs_environ_is_its_own_scrubbed_environment(runner: JobRunner) -> None:
    os.environ["SANDRUN_TEST_SECRET"] = "host-only"
    try:
        ran = await runner.python(
            "print(open('/proc/self/environ', 'rb').read().decode())",
            env=(("GREETING", "hello"),))
    finally:
        del os.environ["SANDRUN_TEST_SECRET"]
    assert ran.reason == Reason.COMPLETED, ran.describe()
    env = dict(item.split("=", 1) for item in ran.out.rstrip("\n").split("\0") if item)
    assert env == {"PATH": SANDBOX_PATH, "HOME": "/job", "LANG": "C.UTF-8",
                   "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp", "TERM": "dumb",
                   "GREETING": "hello"}


@pytest_twisted.ensureDeferred
async def test_the_state_directory_and_worker_key_are_not_reachable(runner: JobRunner) -> None:
    state_dir = runner.sandbox.state_dir
    key = os.path.join(state_dir, "worker.key")
    with open(key, "w") as f:
        f.write("not for jobs\n")
    try:
        ran = await runner.run(("python3", "-I", "-S", "-c", LOOK, key, state_dir,
                                os.path.join(state_dir, "seccomp.bpf"),
                                f"/proc/{os.getpid()}/environ", "/.old/etc/shadow"))
    finally:
        os.unlink(key)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    found = json.loads(ran.out)
    # The worker's pid may exist in the job's PID namespace as one of the job's own.
    assert found.pop(f"/proc/{os.getpid()}/environ") in {"No such file or directory",
                                                        "readable"}
    assert set(found.values()) == {"No such file or directory"}, found


@pytest_twisted.ensureDeferred
async def test_the_job_sees_only_its_own_processes_under_the_sandboxs_init(
        runner: JobRunner) -> None:
    ran = await runner.python(
        "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),"
        " os.getpid(), os.getppid())")
    assert ran.out == "[1, 2] 2 1\n", ran.describe()


INIT_PROBE = """
import json, os
found = {}
for name in ("environ", "mem", "maps", "fd/0", "fd/3", "root/job", "cwd", "exe"):
    path = "/proc/1/" + name
    try:
        with open(path, "rb") as f:
            f.read(1)
        found[name] = "readable"
    except OSError as e:
        found[name] = e.strerror
with open("/proc/1/cmdline", "rb") as f:
    found["cmdline"] = f.read().rstrip(b"\\0").decode()
with open("/proc/1/status") as f:
    found["status"] = [line.split(":")[1].strip() for line in f
                       if line.startswith(("Name:", "Uid:", "CapEff:", "NoNewPrivs:",
                                           "Seccomp:"))]
print(json.dumps(found))
"""


@pytest_twisted.ensureDeferred
async def test_the_init_is_unreachable_and_has_every_layer_of_the_job(runner: JobRunner) -> None:
    os.environ["SANDRUN_TEST_SECRET"] = "host-only"
    try:
        ran = await runner.run(("python3", "-I", "-S", "-c", INIT_PROBE))
    finally:
        del os.environ["SANDRUN_TEST_SECRET"]
    assert ran.reason == Reason.COMPLETED, ran.describe()
    found = json.loads(ran.out)
    status = found.pop("status")
    assert found.pop("cmdline") == "sandrun-init"
    # Not dumpable: nothing of its memory, descriptors, environment or files opens.
    assert set(found.values()) == {"Permission denied"}, found
    name, uid, cap_eff, no_new_privs, seccomp_mode = status
    assert name == "sandrun-init"
    real, effective, saved, filesystem = (int(u) for u in uid.split())
    assert real == effective == saved == filesystem and real in runner.uids
    assert (cap_eff, no_new_privs, seccomp_mode) == ("0000000000000000", "1", "2")


WRITE = """
import errno, os, sys
for path in sys.argv[1:]:
    try:
        if path.endswith("/"):
            os.mkdir(path)
        else:
            with open(path, "ab") as f:
                f.write(b"x")
        print(path, "written")
    except OSError as e:
        print(path, errno.errorcode[e.errno])
"""


@pytest_twisted.ensureDeferred
async def test_writes_to_the_runtime_etc_root_and_dev_fail(runner: JobRunner) -> None:
    paths = ["/usr/sandrun-probe", "/usr/bin/python3", "/etc/sandrun-probe", "/etc/passwd",
             "/sandrun-probe", "/newdir/", "/dev/sandrun-probe", "/dev/null-copy/",
             "/proc/sys/kernel/hostname", "/proc/sys/vm/drop_caches"]
    ran = await runner.run(("python3", "-I", "-S", "-c", WRITE, *paths, "/job/ok", "/tmp/ok"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    outcome = dict(line.split() for line in ran.lines())
    for path in paths:
        assert outcome[path] in {"EROFS", "EACCES"}, (path, outcome[path])
    assert outcome["/job/ok"] == outcome["/tmp/ok"] == "written"


MKNOD = """
import errno, os, stat
for path, mode, dev in (("/job/mem", stat.S_IFCHR, os.makedev(1, 1)),
                        ("/tmp/kmsg", stat.S_IFCHR, os.makedev(1, 11)),
                        ("/job/disk", stat.S_IFBLK, os.makedev(254, 0))):
    try:
        os.mknod(path, mode | 0o666, dev)
        print(path, "made")
    except OSError as e:
        print(path, errno.errorcode[e.errno])
"""


@pytest_twisted.ensureDeferred
async def test_mknod_of_a_device_fails_with_EPERM(runner: JobRunner, job_dir: str) -> None:
    ran = await runner.python(MKNOD, job_dir=job_dir)
    assert ran.lines() == ["/job/mem EPERM", "/tmp/kmsg EPERM", "/job/disk EPERM"], \
        ran.describe()
    assert os.listdir(job_dir) == []


@pytest_twisted.ensureDeferred
async def test_dev_holds_only_the_harmless_devices(runner: JobRunner) -> None:
    ran = await runner.run(("python3", "-I", "-S", "-c", LOOK + "print(sorted(os.listdir('/dev')))",
                            "/dev/mem", "/dev/kmsg", "/dev/port", "/dev/vda", "/dev/tty",
                            "/dev/urandom", "/dev/null"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    found_line, listing = ran.lines()
    found = json.loads(found_line)
    assert found.pop("/dev/urandom") == found.pop("/dev/null") == "readable"
    assert set(found.values()) == {"No such file or directory"}, found
    assert listing == str(sorted(["fd", "full", "null", "random", "shm", "stderr", "stdin",
                                  "stdout", "urandom", "zero"]))


SUID_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    uid_t r, e, s;
    getresuid(&r, &e, &s);
    printf("uid %d %d %d\n", (int)r, (int)e, (int)s);
    int rc = setuid(0);
    printf("setuid0 %s\n", rc == 0 ? "ok" : strerror(errno));
    return 0;
}
"""


def _setuid_root(path: str) -> None:
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)


@pytest_twisted.ensureDeferred
async def test_a_setuid_root_binary_gains_nothing(runner: JobRunner, cc: Any,
                                                 tmp_path: Any) -> None:
    binary = cc(SUID_PROBE)
    deps = tmp_path / "deps"
    deps.mkdir()
    os.chmod(tmp_path, 0o755)
    shutil.copy(binary, deps / "suid")
    _setuid_root(str(deps / "suid"))
    job_dir = runner.new_dir()
    install(binary, job_dir, "suid")
    _setuid_root(os.path.join(job_dir, "suid"))
    ran = await runner.run(("bash", "-c", "/opt/deps/suid; /job/suid; stat -c '%a %u' /opt/deps/suid"),
                           job_dir=job_dir, ro_binds=((str(deps), "/opt/deps"),))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    uid = int(ran.lines()[0].split()[1])
    assert uid in runner.uids
    assert ran.lines() == [f"uid {uid} {uid} {uid}", "setuid0 Operation not permitted"] * 2 + [
        "4755 0"]  # the bit is there, and ignored (nosuid mount, no_new_privs)


NO_NEW_PRIVS = "print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')])"


def mountinfo_root(path: str) -> str:
    """``path`` as the root field of /proc/self/mountinfo names it: relative to its filesystem.

    The same as ``path`` only where that is on the host's root filesystem; where /tmp is a
    tmpfs of its own (Debian 13, Fedora) or / is a bind mount, it is not.
    """
    best = ("/", "/")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            root, point = line.split()[3:5]
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best[1]):
                best = (root, point)
    root, point = best
    rest = path[len(point):].lstrip("/")
    return os.path.join(root, rest) if rest else root


@pytest_twisted.ensureDeferred
async def test_every_mount_is_nosuid_and_only_the_scratch_ones_are_writable(
        runner: JobRunner, job_dir: str) -> None:
    ran = await runner.run(("cat", "/proc/self/mountinfo"), job_dir=job_dir)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    mounts = {}
    for line in ran.lines():
        fields = line.split()
        mounts[fields[4]] = (fields[3], set(fields[5].split(",")))
    assert set(mounts) == {"/", "/usr", "/etc", "/job", "/tmp", "/dev", "/dev/shm", "/proc"}
    state_dir = mountinfo_root(runner.sandbox.state_dir)
    usr, job = mountinfo_root("/usr"), mountinfo_root(job_dir)
    for point, (root, options) in mounts.items():
        assert "nosuid" in options, point
        writable = point in {"/job", "/tmp", "/dev/shm", "/proc"}
        assert ("rw" if writable else "ro") in options, point
        # Nothing of the host beyond the runtime, the sandbox's templates and the job.
        assert root in {"/", usr, job} or root.startswith(state_dir + "/"), (point, root)
    assert mounts["/usr"][0] == usr
    assert mounts["/job"][0] == job
    assert "nodev" in mounts["/job"][1] and "nodev" in mounts["/tmp"][1]


FD_PROBE = r"""
#include <fcntl.h>
#include <stdio.h>
int main(void) {
    for (int fd = 0; fd < 1024; fd++)
        if (fcntl(fd, F_GETFD) != -1)
            printf("%d\n", fd);
    return 0;
}
"""


@pytest_twisted.ensureDeferred
async def test_no_descriptor_beyond_0_1_2_is_inherited(runner: JobRunner, cc: Any) -> None:
    job_dir = runner.new_dir()
    probe = install(cc(FD_PROBE), job_dir, "fds")
    ran = await runner.run((probe,), job_dir=job_dir)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.lines() == ["0", "1", "2"]


@pytest_twisted.ensureDeferred
async def test_files_left_in_tmp_and_dev_shm_are_gone_for_the_next_job(
        runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "echo secret > /tmp/left; echo secret > /dev/shm/left;"
                            " ls /tmp /dev/shm"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.out.split() == ["/dev/shm:", "left", "/tmp:", "left"]
    ran = await runner.run(("bash", "-c", "ls -A /tmp /dev/shm"))
    assert ran.out.split() == ["/dev/shm:", "/tmp:"], ran.describe()


@pytest_twisted.ensureDeferred
async def test_the_job_directory_is_the_working_directory_and_writable(
        runner: JobRunner) -> None:
    job_dir = runner.new_dir({"input.txt": "data\n"})
    ran = await runner.run(("bash", "-c", "pwd; cat input.txt; echo out > result.txt"),
                           job_dir=job_dir)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.lines() == ["/job", "data"]
    with open(os.path.join(job_dir, "result.txt")) as f:
        assert f.read() == "out\n"
