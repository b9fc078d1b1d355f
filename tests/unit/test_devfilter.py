"""The cgroup v2 device filter's program: its encoding, and what it decides.

The decisions are checked by running the generated instructions in a small
interpreter of the eight instruction kinds the generator uses (any other
opcode fails the test); the real kernel runs them in
``tests/integration/test_sandbox_gpu.py``.
"""

from __future__ import annotations

import itertools
import struct

import pytest

from sandrun.sandbox import devfilter, devices
from sandrun.sandbox.devfilter import ACC_ALL, ACC_MKNOD, ACC_READ, ACC_WRITE, DEV_BLOCK, DEV_CHAR

RW = ACC_READ | ACC_WRITE
GPU_NODES = (("nvidia1", 195, 1), ("nvidiactl", 195, 255), ("nvidia-uvm", 508, 0),
             ("nvidia-uvm-tools", 508, 1))
STANDARD = [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)]
MASK32 = (1 << 32) - 1


def run(code: bytes, kind: int, access: int, major: int, minor: int) -> int:
    """What the program returns for one device access (1 allows, 0 refuses)."""
    assert len(code) % 8 == 0
    insns = [struct.unpack("<BBhi", code[i:i + 8]) for i in range(0, len(code), 8)]
    ctx = struct.pack("<III", (access << 16) | kind, major, minor)
    regs = [0] * 11
    regs[1] = -1  # the context pointer: only loads through it are allowed
    pc = steps = 0
    while True:
        steps += 1
        assert steps <= len(insns), "a loop (the kernel would refuse it)"
        op, regs_byte, off, imm = insns[pc]
        dst, src = regs_byte & 0x0F, regs_byte >> 4
        pc += 1
        if op == 0x61:  # dst = *(u32 *)(ctx + off)
            assert regs[src] == -1 and off in (0, 4, 8)
            regs[dst] = struct.unpack_from("<I", ctx, off)[0]
        elif op == 0x54:
            regs[dst] = (regs[dst] & imm) & MASK32
        elif op == 0x74:
            regs[dst] = (regs[dst] & MASK32) >> imm
        elif op == 0xBC:
            regs[dst] = regs[src] & MASK32
        elif op == 0xB7:
            regs[dst] = imm
        elif op == 0x55:
            pc += off if regs[dst] != imm else 0
        elif op == 0x5D:
            pc += off if regs[dst] != regs[src] else 0
        elif op == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"opcode {op:#x} is not one the generator should emit")
        assert 0 <= pc < len(insns), "jumped out of the program"


def test_each_instruction_kind_is_encoded_as_the_kernel_reads_it() -> None:
    # opcode, dst | src << 4, offset (little-endian s16), imm (little-endian s32)
    assert devfilter.insn(0x61, 2, 1, off=4) == bytes.fromhex("61 12 0400 00000000")
    assert devfilter.insn(0x55, 4, 0, off=3, imm=195) == bytes.fromhex("55 04 0300 c3000000")
    assert devfilter.insn(0x5D, 1, 3, off=-1) == bytes.fromhex("5d 31 ffff 00000000")
    assert devfilter.insn(0x54, 2, imm=0xFFFF) == bytes.fromhex("54 02 0000 ffff0000")
    assert devfilter.insn(0x95) == bytes.fromhex("95 00 0000 00000000")


def test_the_program_for_one_rule_is_exactly_these_instructions() -> None:
    code = devfilter.program([(1, 3, RW)])
    assert code.hex(" ", 8).split() == [
        "6112000000000000",  # w2 = access_type
        "bc23000000000000",  # w3 = w2
        "54020000ffff0000",  # w2 &= 0xffff
        "7403000010000000",  # w3 >>= 16
        "5502090002000000",  # if r2 != CHAR goto deny (+9)
        "6114040000000000",  # w4 = major
        "6115080000000000",  # w5 = minor
        "5504060001000000",  # if r4 != 1 goto deny (+6)
        "5505050003000000",  # if r5 != 3 goto deny (+5)
        "bc31000000000000",  # w1 = w3
        "5401000006000000",  # w1 &= read | write
        "5d31020000000000",  # if r1 != r3 goto deny (+2)
        "b700000001000000",  # r0 = 1
        "9500000000000000",  # exit
        "b700000000000000",  # deny: r0 = 0
        "9500000000000000",  # exit
    ]


def test_a_rule_allowing_everything_skips_the_access_check() -> None:
    assert len(devfilter.program([(195, 0, ACC_ALL)])) // 8 == 7 + 4 + 2
    assert len(devfilter.program([(195, 0, RW)])) // 8 == 7 + 7 + 2


def test_no_rules_refuses_everything() -> None:
    code = devfilter.program([])
    for kind, access in itertools.product((DEV_CHAR, DEV_BLOCK), (ACC_READ, ACC_MKNOD)):
        assert run(code, kind, access, 1, 3) == 0


def test_a_job_without_a_gpu_may_read_and_write_the_five_devices_and_make_none() -> None:
    code = devfilter.program(devices.filter_rules(None))
    for major, minor in STANDARD:
        for access in (ACC_READ, ACC_WRITE, RW):
            assert run(code, DEV_CHAR, access, major, minor) == 1, (major, minor, access)
        for access in (ACC_MKNOD, ACC_MKNOD | ACC_READ, ACC_ALL):
            assert run(code, DEV_CHAR, access, major, minor) == 0, (major, minor, access)
        assert run(code, DEV_BLOCK, ACC_READ, major, minor) == 0
    for major, minor in ((195, 0), (195, 255), (1, 1), (1, 11), (5, 0), (5, 2), (4, 1),
                         (136, 0), (10, 200), (0, 0), (1, 4), (3 + (1 << 16), 1)):
        assert run(code, DEV_CHAR, ACC_READ, major, minor) == 0, (major, minor)


def test_a_gpu_job_may_use_and_make_exactly_its_own_nodes_and_the_five() -> None:
    code = devfilter.program(devices.filter_rules(GPU_NODES))
    allowed = STANDARD + [(195, 1), (195, 255), (508, 0), (508, 1)]
    for (major, minor), access in itertools.product(allowed, range(1, 8)):
        assert run(code, DEV_CHAR, access, major, minor) == 1, (major, minor, access)
        assert run(code, DEV_BLOCK, access, major, minor) == 0, (major, minor, access)
    # Another GPU, another uvm minor, a minor that matches another rule's major...
    for major, minor in ((195, 0), (195, 2), (195, 254), (508, 2), (1, 195), (255, 195),
                         (195, 1 + (1 << 8)), (1, 1), (1, 11)):
        for access in (ACC_READ, ACC_WRITE, ACC_MKNOD):
            assert run(code, DEV_CHAR, access, major, minor) == 0, (major, minor, access)


def test_a_rule_out_of_range_is_refused_before_anything_is_built() -> None:
    for rule in ((-1, 0, RW), (1, 1 << 31, RW), (1, 3, 0), (1, 3, 8)):
        with pytest.raises(ValueError):
            devfilter.program([rule])


def test_the_gpu_rules_are_the_v1_cgroups_allow_list() -> None:
    assert [f"c {major}:{minor} rwm" for major, minor, access in
            devices.filter_rules(GPU_NODES) if access == ACC_ALL] == devices.rules(GPU_NODES)
