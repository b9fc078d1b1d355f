"""cgroup v2 device filter: a small eBPF program, loaded and attached with bpf(2).

cgroup v2 has no ``devices`` controller.  Instead the kernel runs the
``BPF_PROG_TYPE_CGROUP_DEVICE`` programs attached (``BPF_CGROUP_DEVICE``) to a
process's cgroup each time it opens a device node or makes one with
``mknod``; a program returns 1 to allow, 0 to refuse (``EPERM``).  This is how
runc and crun limit a container's devices; Sandrun builds the same kind of
program, for a fixed allow-list, without a compiler or a BPF library: no Python
library loads cgroup device programs without one (bcc needs clang and kernel
headers), and the program needs only eight instruction kinds, encoded below.

The program, for rules ``(major, minor, access)``::

        w2 = *(u32 *)(r1 + 0)      access_type: (access << 16) | device type
        w3 = w2
        w2 &= 0xffff               device type
        w3 >>= 16                  requested access: mknod 1, read 2, write 4
        if r2 != CHAR goto deny    block devices: never
        w4 = *(u32 *)(r1 + 4)      major
        w5 = *(u32 *)(r1 + 8)      minor
      rule 0:
        if r4 != major goto rule 1
        if r5 != minor goto rule 1
        w1 = w3                    (only when the rule allows less than all three)
        w1 &= access
        if r1 != r3 goto rule 1    asked for something the rule does not give
        r0 = 1
        exit
      rule 1: ...
      deny:
        r0 = 0
        exit

A program is attached without flags: the job's cgroup then admits no other
program beneath it (it has no children anyway), attaching another replaces it
atomically, and programs that ancestors attached with ``BPF_F_ALLOW_MULTI``
(systemd's ``DevicePolicy``) still run too: every one must allow.  The kernel
releases a cgroup's programs when the cgroup is removed; a program whose last
descriptor is closed then is freed.  Needs Linux 4.15 and ``CAP_SYS_ADMIN``
(or ``CAP_BPF``).

No Twisted: this module runs in the launcher.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from sandrun.sandbox import namespaces as ns

# include/uapi/linux/bpf.h
_SYS_BPF = 321  # x86_64, like the other numbers in namespaces.py
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6  # the attach type
DEV_BLOCK = 1  # BPF_DEVCG_DEV_*: the low 16 bits of access_type
DEV_CHAR = 2
ACC_MKNOD = 1  # BPF_DEVCG_ACC_*: the high 16 bits
ACC_READ = 2
ACC_WRITE = 4
ACC_ALL = ACC_MKNOD | ACC_READ | ACC_WRITE
NAME = b"sandrun_devices"  # what `bpftool prog` shows (15 characters at most)
LICENSE = b"MIT"  # Sandrun's; the program calls no helper, so any licence loads
LOG_BYTES = 1 << 16  # the verifier's explanation, asked for only after a refusal

# Instruction encoding: 8 bytes, little-endian: opcode, dst | src << 4, offset (s16), imm (s32).
_LDX_W = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_AND32_K = 0x54  # BPF_ALU | BPF_AND | BPF_K: wdst &= imm
_RSH32_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K: wdst >>= imm
_MOV32_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X: wdst = wsrc
_MOV64_K = 0xB7  # BPF_ALU64 | BPF_MOV | BPF_K: dst = imm
_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K: if dst != imm: pc += off
_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X: if dst != src: pc += off
_EXIT = 0x95  # BPF_JMP | BPF_EXIT: return r0

Rule = tuple[int, int, int]  # (major, minor, ACC_* bits) of a character device


class BpfError(OSError):
    """bpf(2) refused: the errno, and the step in the message."""


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction, as the kernel reads it."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def program(rules: list[Rule] | tuple[Rule, ...]) -> bytes:
    """The filter allowing exactly ``rules`` (character devices only), as instructions."""
    # (opcode, dst, src, offset or the label a jump goes to, imm); labels resolved below.
    code: list[tuple[int, int, int, int | str, int]] = [
        (_LDX_W, 2, 1, 0, 0),
        (_MOV32_X, 3, 2, 0, 0),
        (_AND32_K, 2, 0, 0, 0xFFFF),
        (_RSH32_K, 3, 0, 0, 16),
        (_JNE_K, 2, 0, "deny", DEV_CHAR),
        (_LDX_W, 4, 1, 4, 0),
        (_LDX_W, 5, 1, 8, 0),
    ]
    labels: dict[str, int] = {}
    for number, (major, minor, access) in enumerate(rules):
        if not (0 <= major < 1 << 31 and 0 <= minor < 1 << 31 and 0 < access <= ACC_ALL):
            raise ValueError(f"device rule {major}:{minor} access {access} is out of range")
        labels[f"rule {number}"] = len(code)
        after = f"rule {number + 1}" if number + 1 < len(rules) else "deny"
        code += [(_JNE_K, 4, 0, after, major), (_JNE_K, 5, 0, after, minor)]
        if access != ACC_ALL:
            code += [(_MOV32_X, 1, 3, 0, 0), (_AND32_K, 1, 0, 0, access),
                     (_JNE_X, 1, 3, after, 0)]
        code += [(_MOV64_K, 0, 0, 0, 1), (_EXIT, 0, 0, 0, 0)]
    labels["deny"] = len(code)
    code += [(_MOV64_K, 0, 0, 0, 0), (_EXIT, 0, 0, 0, 0)]
    # A jump's offset counts from the instruction after it.
    return b"".join(insn(op, dst, src, labels[off] - index - 1 if isinstance(off, str) else off,
                         imm)
                    for index, (op, dst, src, off, imm) in enumerate(code))


# -- bpf(2) ---------------------------------------------------------------------------------
# Each command reads the leading fields of ``union bpf_attr`` it needs; the kernel
# treats the bytes not passed as zero.


class _ProgLoad(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32),
                ("insns", ctypes.c_uint64), ("license", ctypes.c_uint64),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32),
                ("prog_flags", ctypes.c_uint32), ("prog_name", ctypes.c_char * 16)]


class _ProgAttach(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32),
                ("attach_type", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32)]


class _ProgQuery(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("query_flags", ctypes.c_uint32), ("attach_flags", ctypes.c_uint32),
                ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class _InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32),
                ("info", ctypes.c_uint64)]


class _ById(ctypes.Structure):
    _fields_ = [("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32),
                ("open_flags", ctypes.c_uint32)]


def _bpf(command: int, attr: ctypes.Structure, what: str) -> int:
    result = ns._libc.syscall(_SYS_BPF, ctypes.c_int(command), ctypes.byref(attr),
                              ctypes.c_uint(ctypes.sizeof(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return int(result)


def load(code: bytes) -> int:
    """Load a device program; its descriptor (close-on-exec, as every bpf descriptor).

    On a refusal, asks again for the verifier's log and puts its end in the error.
    """
    insns = ctypes.create_string_buffer(code, len(code))
    licence = ctypes.create_string_buffer(LICENSE)
    attr = _ProgLoad(prog_type=BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(code) // 8,
                     insns=ctypes.addressof(insns), license=ctypes.addressof(licence),
                     prog_name=NAME)
    try:
        return _bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD of the device filter")
    except BpfError as first:
        log = ctypes.create_string_buffer(LOG_BYTES)
        attr.log_level, attr.log_size, attr.log_buf = 1, LOG_BYTES, ctypes.addressof(log)
        try:
            fd = _bpf(BPF_PROG_LOAD, attr, "BPF_PROG_LOAD of the device filter")
        except BpfError:
            said = log.value.decode(errors="replace").strip().splitlines()[-3:]
            raise BpfError(first.errno, f"{first.strerror}"
                           f"{' (verifier: ' + ' / '.join(said) + ')' if said else ''}") from None
        return fd  # loaded the second time: a passing failure


def attach(prog_fd: int, cgroup_dir: str) -> None:
    """Attach the program to the cgroup at ``cgroup_dir``, replacing the one attached there."""
    target = _open_dir(cgroup_dir)
    try:
        _bpf(BPF_PROG_ATTACH, _ProgAttach(target_fd=target, attach_bpf_fd=prog_fd,
                                          attach_type=BPF_CGROUP_DEVICE),
             f"BPF_PROG_ATTACH of the device filter to {cgroup_dir}")
    finally:
        os.close(target)


def attached(cgroup_dir: str) -> list[int]:
    """The ids of the device programs attached to the cgroup itself (not inherited)."""
    target = _open_dir(cgroup_dir)
    try:
        ids = (ctypes.c_uint32 * 64)()
        attr = _ProgQuery(target_fd=target, attach_type=BPF_CGROUP_DEVICE,
                          prog_ids=ctypes.addressof(ids), prog_cnt=64)
        _bpf(BPF_PROG_QUERY, attr, f"BPF_PROG_QUERY of {cgroup_dir}")
        return list(ids[:attr.prog_cnt])
    finally:
        os.close(target)


def prog_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (as ``attached`` and ``bpftool`` name it)."""
    info = (ctypes.c_uint32 * 2)()  # struct bpf_prog_info begins: type, id
    _bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoByFd(bpf_fd=prog_fd, info_len=8,
                                           info=ctypes.addressof(info)),
         "BPF_OBJ_GET_INFO_BY_FD")
    return int(info[1])


def loaded(program_id: int) -> bool:
    """Whether the kernel still holds the program with this id."""
    try:
        os.close(_bpf(BPF_PROG_GET_FD_BY_ID, _ById(prog_id=program_id), "BPF_PROG_GET_FD_BY_ID"))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def _open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
