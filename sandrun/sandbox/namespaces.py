"""Thin wrappers over the Linux system calls the sandbox needs.

Python 3.11's ``os`` module lacks ``unshare``, ``setns``, ``mount``,
``pivot_root``, ``open_tree``, ``move_mount``, ``capset`` and ``prctl``; they
are called through ctypes.
Every wrapper raises ``OSError`` with the errno and the step's name, so a
failure can be reported as a ``sandbox_error`` that says what broke.

This module runs between fork and exec: stdlib only, no Twisted.
"""

from __future__ import annotations

import ctypes
import os


def _load_libc() -> ctypes.CDLL:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        # ctypes.util pulls in subprocess and threading, which would make the
        # launcher, the process that forks every job, bigger; only if needed.
        from ctypes.util import find_library

        return ctypes.CDLL(find_library("c"), use_errno=True)


_libc = _load_libc()
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080
ALL_NAMESPACE_FLAGS = (CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
                       | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWTIME)

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_SECCOMP = 22
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2

_SYS_SETNS = 308
_SYS_UNSHARE = 272
_SYS_PIVOT_ROOT = 155
_SYS_CAPGET = 125
_SYS_CAPSET = 126
_SYS_CLOSE_RANGE = 436
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
CLOSE_RANGE_CLOEXEC = 1 << 2
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x00000004
MAX_FD = 0xFFFFFFFF


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.syscall(_SYS_UNSHARE, ctypes.c_ulong(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.syscall(_SYS_SETNS, ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    def enc(text: str | None) -> bytes | None:
        return None if text is None else os.fsencode(text)

    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    _check(_libc.syscall(_SYS_PIVOT_ROOT, os.fsencode(new_root), os.fsencode(put_old)),
           "pivot_root")


def open_tree_clone(path: str) -> int:
    """A detached copy of the mount at ``path`` (like a bind source), as a descriptor.

    The copy can be attached with ``move_mount`` by a process in another mount
    namespace, which a path could not reach: this is how a job that was set up
    ahead of time receives a directory the worker mounted later.
    """
    return _check(_libc.syscall(_SYS_OPEN_TREE, ctypes.c_int(AT_FDCWD), os.fsencode(path),
                                ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)),
                  f"open_tree {path}")


def move_mount(tree: int, target: str) -> None:
    """Attach a detached mount (from ``open_tree_clone``) at ``target``."""
    _check(_libc.syscall(_SYS_MOVE_MOUNT, ctypes.c_int(tree), b"", ctypes.c_int(AT_FDCWD),
                         os.fsencode(target), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH)),
           f"move_mount {target}")


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(_libc.prctl(option, arg2, arg3, arg4, arg5), f"prctl({option})")


def close_range_cloexec(first: int) -> None:
    """Mark every descriptor from ``first`` up close-on-exec (Linux 5.11+)."""
    _check(_libc.syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first), ctypes.c_uint(MAX_FD),
                         ctypes.c_uint(CLOSE_RANGE_CLOEXEC)), "close_range")


def close_all_but(*keep: int) -> None:
    """Close every descriptor from 3 up except those in ``keep``."""
    first = 3
    for fd in sorted(set(keep)) + [MAX_FD + 1]:
        if fd > first:
            _check(_libc.syscall(_SYS_CLOSE_RANGE, ctypes.c_uint(first),
                                 ctypes.c_uint(min(fd - 1, MAX_FD)), ctypes.c_uint(0)),
                   "close_range")
        first = max(first, fd + 1)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Made once: in a freshly forked process, building ctypes objects costs page copies.
_CAP_HEADER = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
_CAP_DATA = (_CapData * 2)()


def last_capability() -> int:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_bounding_set(last_cap: int) -> None:
    """Drop every capability from the bounding set, and check that none is left.

    Needs CAP_SETPCAP.  The bounding set only limits what an ``execve`` can
    grant, it is inherited by every child and can never be raised again, so
    the launcher (which never execs) empties its own once at start and every
    job it forks starts without one.
    """
    for cap in range(last_cap + 1):
        prctl(PR_CAPBSET_DROP, cap)
    left = [cap for cap in range(last_cap + 1) if prctl(PR_CAPBSET_READ, cap)]
    if left:
        raise OSError(f"capabilities still in the bounding set: {left}")


def clear_capabilities() -> None:
    """Empty the effective, permitted, inheritable and ambient sets.

    ``setresuid`` to a non-zero uid clears effective and permitted but leaves
    the inheritable set alone, so it is cleared here explicitly.
    """
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _CAP_HEADER.version, _CAP_HEADER.pid = _LINUX_CAPABILITY_VERSION_3, 0
    ctypes.memset(_CAP_DATA, 0, ctypes.sizeof(_CAP_DATA))
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(_CAP_HEADER), ctypes.byref(_CAP_DATA)),
           "capset")


def warm_up() -> None:
    """Take, ahead of time, the page copies the first calls after a fork would cost.

    Calls with no effect (reads) through the same ctypes paths the job's
    setup uses; see the launcher's ``_warm_up``.
    """
    prctl(PR_CAPBSET_READ, 0)
    _CAP_HEADER.version, _CAP_HEADER.pid = _LINUX_CAPABILITY_VERSION_3, 0
    ctypes.memset(_CAP_DATA, 0, ctypes.sizeof(_CAP_DATA))
    _check(_libc.syscall(_SYS_CAPGET, ctypes.byref(_CAP_HEADER), ctypes.byref(_CAP_DATA)),
           "capget")
