"""The job's seccomp policy: a default-deny allow-list built with libseccomp.

Two filters are stacked (the kernel applies the most restrictive answer):

1. the allow-list: every system call not named here fails with ``EPERM``;
   ``socket``/``socketpair`` only for AF_UNIX, AF_INET, AF_INET6; ``clone``
   only without namespace flags; ``clone3`` fails with ``ENOSYS`` so libc
   falls back to ``clone``, whose flags can be inspected; any other ABI
   (i386 through ``int 0x80``, x32) kills the process.
2. an ioctl filter refusing ``TIOCSTI`` and ``TIOCLINUX``, compared on the
   low 32 bits the kernel actually uses.

libseccomp refuses a rule whose action equals the default action, so the
ioctl refusals need a filter whose default is allow; hence two filters.

Both are compiled to BPF once, by the worker before it starts the launcher; a
job only pays for one ``prctl`` per filter.  The allow-list is laid out as a
binary tree of system call numbers (libseccomp's optimize level 2): the kernel
checks every filter it is given by running it once per system call number,
and a tree makes that, and every later system call, logarithmic instead of
linear in the list's length (loading it takes 0.2 ms less here).
"""

from __future__ import annotations

import ctypes
import errno
import os

from sandrun.sandbox import namespaces

ALLOWED_SYSCALLS = """
accept accept4 access alarm arch_prctl bind brk capget capset chdir chmod chown
clock_getres clock_gettime clock_nanosleep close close_range connect copy_file_range creat
dup dup2 dup3 epoll_create epoll_create1 epoll_ctl epoll_pwait epoll_pwait2 epoll_wait
eventfd eventfd2 execve execveat exit exit_group faccessat faccessat2 fadvise64 fallocate
fchdir fchmod fchmodat fchown fchownat fcntl fdatasync fgetxattr flistxattr flock fork
fremovexattr fsetxattr fstat fstatfs fsync ftruncate futex futex_waitv futimesat
get_mempolicy get_robust_list get_thread_area getcpu getcwd getdents getdents64 getegid
geteuid getgid getgroups getitimer getpeername getpgid getpgrp getpid getppid getpriority
getrandom getresgid getresuid getrlimit getrusage getsid getsockname getsockopt gettid
gettimeofday getuid getxattr inotify_add_watch inotify_init inotify_init1 inotify_rm_watch
ioctl kill lchown lgetxattr link linkat listen listxattr llistxattr lremovexattr lseek
lsetxattr lstat madvise membarrier memfd_create mincore mkdir mkdirat mknod mknodat mlock
mlock2 mlockall mmap mprotect mremap msgctl msgget msgrcv msgsnd msync munlock munlockall
munmap nanosleep newfstatat open openat openat2 pause pidfd_open pidfd_send_signal pipe
pipe2 pkey_alloc pkey_free pkey_mprotect poll ppoll prctl pread64 preadv preadv2 prlimit64
pselect6 pwrite64 pwritev pwritev2 read readahead readlink readlinkat readv recvfrom
recvmmsg recvmsg remap_file_pages removexattr rename renameat renameat2 restart_syscall
rmdir rseq rt_sigaction rt_sigpending rt_sigprocmask rt_sigqueueinfo rt_sigreturn
rt_sigsuspend rt_sigtimedwait rt_tgsigqueueinfo sched_get_priority_max
sched_get_priority_min sched_getaffinity sched_getattr sched_getparam sched_getscheduler
sched_rr_get_interval sched_setaffinity sched_setattr sched_setparam sched_setscheduler
sched_yield select semctl semget semop semtimedop sendfile sendmmsg sendmsg sendto
set_robust_list set_thread_area set_tid_address setfsgid setfsuid setgid setgroups
setitimer setpgid setpriority setregid setresgid setresuid setreuid setrlimit setsid
setsockopt setuid shmat shmctl shmdt shmget shutdown sigaltstack signalfd signalfd4
splice stat statfs statx symlink symlinkat sync_file_range sysinfo tee tgkill
time timer_create timer_delete timer_getoverrun timer_gettime timer_settime timerfd_create
timerfd_gettime timerfd_settime times tkill truncate umask uname unlink unlinkat utime
utimensat utimes vfork wait4 waitid write writev
""".split()

# Blocked by name in the security spec; they must never appear above.
BLOCKED_SYSCALLS = """
ptrace process_vm_readv process_vm_writev mount umount2 pivot_root chroot unshare setns
keyctl add_key request_key bpf perf_event_open userfaultfd io_uring_setup io_uring_enter
io_uring_register kexec_load kexec_file_load init_module finit_module delete_module reboot
swapon swapoff acct quotactl open_by_handle_at name_to_handle_at lookup_dcookie syslog
sync syncfs
""".split()

ALLOWED_SOCKET_FAMILIES = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
TIOCSTI = 0x5412
TIOCLINUX = 0x541C
# personality(2) values glibc and common tools use to query or set harmless bits.
ALLOWED_PERSONALITIES = (0x0, 0x8, 0x20000, 0x20008, 0xFFFFFFFF)


def _export(syscall_filter: object) -> bytes:
    import tempfile  # in the worker only: the launcher would inherit random's fork hook

    with tempfile.TemporaryFile() as f:
        syscall_filter.export_bpf(f)  # type: ignore[attr-defined]
        f.seek(0)
        return f.read()


def build_filters() -> list[bytes]:
    """Compile the policy to BPF programs, in the order they are loaded."""
    import pyseccomp as sc

    allow = sc.SyscallFilter(defaction=sc.ERRNO(errno.EPERM))
    allow.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    allow.set_attr(sc.Attr.CTL_OPTIMIZE, 2)
    assert not set(ALLOWED_SYSCALLS) & set(BLOCKED_SYSCALLS)
    for name in ALLOWED_SYSCALLS:
        allow.add_rule(sc.ALLOW, name)
    for family in ALLOWED_SOCKET_FAMILIES:
        allow.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
        allow.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, family))
    allow.add_rule(sc.ALLOW, "clone",
                   sc.Arg(0, sc.MASKED_EQ, namespaces.ALL_NAMESPACE_FLAGS, 0))
    allow.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for persona in ALLOWED_PERSONALITIES:
        allow.add_rule(sc.ALLOW, "personality", sc.Arg(0, sc.EQ, persona))

    ioctls = sc.SyscallFilter(defaction=sc.ALLOW)
    ioctls.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    for request in (TIOCSTI, TIOCLINUX):
        ioctls.add_rule(sc.ERRNO(errno.EPERM), "ioctl",
                        sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    return [_export(allow), _export(ioctls)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class PreparedFilters:
    """BPF programs held in ctypes buffers, ready to load after a fork."""

    def __init__(self, programs: list[bytes]) -> None:
        self._buffers = [ctypes.create_string_buffer(p, len(p)) for p in programs]
        self._progs = [_SockFprog(len(p) // 8, ctypes.addressof(buf))
                       for p, buf in zip(programs, self._buffers)]

    def load(self) -> None:
        """Install every filter; needs ``no_new_privs`` (set by the caller first)."""
        for prog in self._progs:
            namespaces.prctl(namespaces.PR_SET_SECCOMP, namespaces.SECCOMP_MODE_FILTER,
                             ctypes.addressof(prog))


def join_programs(programs: list[bytes]) -> bytes:
    """One file for the launcher: each program prefixed by its length (4 bytes)."""
    return b"".join(len(p).to_bytes(4, "little") + p for p in programs)


def split_programs(data: bytes) -> list[bytes]:
    programs = []
    while data:
        size = int.from_bytes(data[:4], "little")
        if size % 8 or size > len(data) - 4 or size == 0:
            raise ValueError("corrupt seccomp program file")
        programs.append(data[4:4 + size])
        data = data[4 + size:]
    if not programs:
        raise ValueError("empty seccomp program file")
    return programs


if __name__ == "__main__":  # pragma: no cover - a debugging aid
    for i, program in enumerate(build_filters()):
        print(f"filter {i}: {len(program) // 8} instructions")
    os._exit(0)
