"""The kernel surface a job reaches: seccomp refusals, other ABIs, capabilities, namespaces.

The probes are small C programs built on the host with ``gcc -static`` at test
time and run as the job, so every call goes straight to the kernel by number
through ``syscall(2)``, with nothing in between that could hide a refusal.
"""

from __future__ import annotations

import errno
import signal
from typing import Any

import pytest_twisted

from sandrun.sandbox.seccomp import BLOCKED_SYSCALLS
from sandrun.wire import Reason

from .conftest import JobRunner, install

SYSCALL_PROBE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <linux/sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

static void report(const char *name, long rc) {
    printf("%s %d\n", name, rc == -1 ? errno : 0);
    fflush(stdout);
}

#define TRY(name, ...) do { errno = 0; report(name, syscall(__VA_ARGS__)); } while (0)

static void try_clone(const char *name, unsigned long flags) {
    errno = 0;
    long rc = syscall(SYS_clone, flags | SIGCHLD, 0, 0, 0, 0);
    if (rc == 0)
        _exit(0);  /* a child that should never have been made */
    report(name, rc);
}

int main(void) {
    char c = 'x';
    TRY("getpid", SYS_getpid);
    TRY("ptrace", SYS_ptrace, 16 /* PTRACE_ATTACH */, 1, 0, 0);
    TRY("process_vm_readv", SYS_process_vm_readv, 1, 0, 0, 0, 0, 0);
    TRY("process_vm_writev", SYS_process_vm_writev, 1, 0, 0, 0, 0, 0);
    TRY("mount", SYS_mount, "none", "/tmp", "tmpfs", 0, 0);
    TRY("umount2", SYS_umount2, "/proc", 2);
    TRY("pivot_root", SYS_pivot_root, "/tmp", "/tmp");
    TRY("chroot", SYS_chroot, "/tmp");
    TRY("unshare", SYS_unshare, CLONE_NEWUSER);
    TRY("setns", SYS_setns, 0, 0);
    TRY("keyctl", SYS_keyctl, 0 /* KEYCTL_GET_KEYRING_ID */, -3, 0, 0, 0);
    TRY("add_key", SYS_add_key, "user", "sandrun", "x", 1, -3);
    TRY("request_key", SYS_request_key, "user", "sandrun", 0, 0);
    TRY("bpf", SYS_bpf, 0, 0, 0);
    TRY("perf_event_open", SYS_perf_event_open, 0, 0, -1, -1, 0);
    TRY("userfaultfd", SYS_userfaultfd, 0);
    TRY("io_uring_setup", SYS_io_uring_setup, 1, 0);
    TRY("io_uring_enter", SYS_io_uring_enter, 0, 0, 0, 0, 0, 0);
    TRY("io_uring_register", SYS_io_uring_register, 0, 0, 0, 0);
    TRY("kexec_load", SYS_kexec_load, 0, 0, 0, 0);
    TRY("kexec_file_load", SYS_kexec_file_load, -1, -1, 0, 0, 0);
    TRY("init_module", SYS_init_module, 0, 0, "");
    TRY("finit_module", SYS_finit_module, 0, "", 0);
    TRY("delete_module", SYS_delete_module, "ext4", 0);
    TRY("reboot", SYS_reboot, 0xfee1dead, 672274793, 0x4321fedc, 0);
    TRY("swapon", SYS_swapon, "/tmp/swap", 0);
    TRY("swapoff", SYS_swapoff, "/tmp/swap");
    TRY("acct", SYS_acct, "/tmp/acct");
    TRY("quotactl", SYS_quotactl, 0, "/", 0, 0);
    TRY("open_by_handle_at", SYS_open_by_handle_at, -100, 0, 0);
    TRY("name_to_handle_at", SYS_name_to_handle_at, -100, "/", 0, 0, 0);
    TRY("lookup_dcookie", SYS_lookup_dcookie, 0, 0, 0);
    TRY("syslog", SYS_syslog, 3 /* SYSLOG_ACTION_READ_ALL */, 0, 0);
    TRY("sync", SYS_sync);
    TRY("syncfs", SYS_syncfs, 0);
    /* namespace flags to clone, one by one */
    try_clone("clone_newuser", CLONE_NEWUSER);
    try_clone("clone_newns", CLONE_NEWNS);
    try_clone("clone_newpid", CLONE_NEWPID);
    try_clone("clone_newnet", CLONE_NEWNET);
    try_clone("clone_newipc", CLONE_NEWIPC);
    try_clone("clone_newuts", CLONE_NEWUTS);
    try_clone("clone_newcgroup", CLONE_NEWCGROUP);
    try_clone("clone_newtime", 0x80 /* CLONE_NEWTIME */);
    {
        struct clone_args args = {0};
        args.flags = CLONE_NEWUSER;
        args.exit_signal = SIGCHLD;
        errno = 0;
        long rc = syscall(SYS_clone3, &args, sizeof(args));
        if (rc == 0)
            _exit(0);
        report("clone3_newuser", rc);
    }
    /* socket families other than unix, inet, inet6 */
    TRY("socket_netlink", SYS_socket, AF_NETLINK, SOCK_RAW, 0);
    TRY("socket_packet", SYS_socket, AF_PACKET, SOCK_RAW, 0);
    TRY("socket_vsock", SYS_socket, 40 /* AF_VSOCK */, SOCK_STREAM, 0);
    TRY("socket_alg", SYS_socket, 38 /* AF_ALG */, SOCK_SEQPACKET, 0);
    TRY("socket_key", SYS_socket, 15 /* AF_KEY */, SOCK_RAW, 2);
    TRY("socketpair_netlink", SYS_socketpair, AF_NETLINK, SOCK_RAW, 0, 0);
    TRY("socket_inet_raw", SYS_socket, AF_INET, SOCK_RAW, 1 /* ICMP */);
    /* terminal injection, also with junk in the upper 32 bits the kernel ignores */
    TRY("ioctl_tiocsti", SYS_ioctl, 0, TIOCSTI, &c);
    TRY("ioctl_tiocsti_high", SYS_ioctl, 0, 0xdead00000000UL | TIOCSTI, &c);
    TRY("ioctl_tioclinux", SYS_ioctl, 0, TIOCLINUX, &c);
    /* and what a job does need still works */
    TRY("ioctl_fionread", SYS_ioctl, 0, FIONREAD, &c);
    TRY("socket_unix", SYS_socket, AF_UNIX, SOCK_STREAM, 0);
    TRY("socket_inet6", SYS_socket, AF_INET6, SOCK_DGRAM, 0);
    try_clone("fork", 0);
    return 0;
}
"""

CLONE_NAMESPACES = ["clone_newuser", "clone_newns", "clone_newpid", "clone_newnet",
                    "clone_newipc", "clone_newuts", "clone_newcgroup", "clone_newtime"]
SOCKETS = ["socket_netlink", "socket_packet", "socket_vsock", "socket_alg", "socket_key",
           "socketpair_netlink", "socket_inet_raw"]
IOCTLS = ["ioctl_tiocsti", "ioctl_tiocsti_high", "ioctl_tioclinux"]


async def _probe(runner: JobRunner, cc: Any, source: str) -> Any:
    job_dir = runner.new_dir()
    return await runner.run((install(cc(source), job_dir, "probe"),), job_dir=job_dir,
                            stdin=b"stdin is a memfd, not a terminal")


@pytest_twisted.ensureDeferred
async def test_every_blocked_system_call_fails_with_EPERM(runner: JobRunner, cc: Any) -> None:
    ran = await _probe(runner, cc, SYSCALL_PROBE)
    assert ran.reason == Reason.COMPLETED, ran.describe()
    results = {name: int(code) for name, code in (line.split() for line in ran.lines())}
    assert results.pop("getpid") == 0  # the probe itself works
    for name in BLOCKED_SYSCALLS + CLONE_NAMESPACES + SOCKETS + IOCTLS:
        code = results.pop(name)
        assert code == errno.EPERM, (name, errno.errorcode.get(code, code))
    # clone3 cannot have its flags inspected by seccomp, so it is refused outright with
    # ENOSYS, which makes libc fall back to clone (whose flags are checked above).
    assert results.pop("clone3_newuser") == errno.ENOSYS
    assert results.pop("ioctl_fionread") == 0
    assert results.pop("socket_unix") == results.pop("socket_inet6") == 0
    assert results.pop("fork") == 0
    assert results == {}


INT80 = r"""
#include <stdio.h>
int main(void) {
    long rc;
    printf("before\n");
    fflush(stdout);
    /* i386 getpid through the 32-bit entry point */
    __asm__ volatile("int $0x80" : "=a"(rc) : "a"(20) : "memory");
    printf("after %ld\n", rc);
    return 0;
}
"""

X32 = r"""
#include <errno.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    printf("before\n");
    fflush(stdout);
    errno = 0;
    long rc = syscall(0x40000000 | SYS_getpid);  /* x32 ABI */
    printf("after %ld %d\n", rc, errno);
    return 0;
}
"""


@pytest_twisted.ensureDeferred
async def test_the_i386_abi_through_int_0x80_kills_the_job(runner: JobRunner, cc: Any) -> None:
    ran = await _probe(runner, cc, INT80)
    assert ran.reason == Reason.SIGNALED, ran.describe()
    assert ran.result.signal == signal.SIGSYS
    assert ran.out == "before\n"


@pytest_twisted.ensureDeferred
async def test_an_x32_system_call_kills_the_job(runner: JobRunner, cc: Any) -> None:
    ran = await _probe(runner, cc, X32)
    assert ran.reason == Reason.SIGNALED, ran.describe()
    assert ran.result.signal == signal.SIGSYS
    assert ran.out == "before\n"


@pytest_twisted.ensureDeferred
async def test_unshare_of_a_user_namespace_fails(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "unshare -U true; echo rc=$?; unshare -rn true; "
                            "echo rc=$?"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    assert ran.lines() == ["rc=1", "rc=1"]
    assert ran.stderr.count(b"Operation not permitted") == 2, ran.describe()


@pytest_twisted.ensureDeferred
async def test_no_capability_no_new_privileges_and_a_seccomp_filter(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/self/status;"
                            " grep -E '^(Cap|NoNewPrivs|Seccomp)' /proc/1/status"))
    assert ran.reason == Reason.COMPLETED, ran.describe()
    fields = [line.split(":\t") for line in ran.lines()]
    caps = [value for key, value in fields if key.startswith("Cap")]
    assert len(caps) == 10  # CapInh CapPrm CapEff CapBnd CapAmb, for the shell and for grep
    assert set(caps) == {"0000000000000000"}
    assert [value for key, value in fields if key == "NoNewPrivs"] == ["1", "1"]
    assert [value for key, value in fields if key == "Seccomp"] == ["2", "2"]


@pytest_twisted.ensureDeferred
async def test_the_job_runs_as_an_unprivileged_uid_with_no_groups(runner: JobRunner) -> None:
    ran = await runner.python("import os; print(os.getresuid(), os.getresgid(), os.getgroups())")
    assert ran.reason == Reason.COMPLETED, ran.describe()
    uid = eval(ran.out.split(")")[0] + ")")[0]
    assert uid in runner.uids
    assert ran.out == f"{(uid, uid, uid)} {(uid, uid, uid)} []\n"


@pytest_twisted.ensureDeferred
async def test_the_host_name_is_the_sandboxs(runner: JobRunner) -> None:
    ran = await runner.run(("bash", "-c", "hostname; hostname evil; echo rc=$?"))
    assert ran.lines() == ["sandrun", "rc=1"], ran.describe()
