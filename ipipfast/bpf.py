"""bpf(2) through ctypes, as much as the tc programs of tc_drops.py need:
the system call, instruction encoding, loading a program, and array maps
the daemon reads. Programs are assembled in Python, so running ipipfast
needs neither a compiler nor libbpf."""
from __future__ import annotations

import ctypes
import errno
import os
import struct

# bpf(2)'s number differs per architecture (arch/*/include/uapi/asm/unistd*.h;
# the generic table of arm64, riscv and loongarch has 280).
SYS_BPF = {"x86_64": 321, "i386": 357, "i686": 357, "aarch64": 280, "armv7l": 386, "armv6l": 386,
           "riscv64": 280, "loongarch64": 280, "ppc64le": 361, "ppc64": 361, "s390x": 351}
MAP_CREATE, MAP_LOOKUP_ELEM, PROG_LOAD = 0, 1, 5
MAP_TYPE_ARRAY = 2
PROG_TYPE_SCHED_CLS = 3
PSEUDO_MAP_FD = 1
NAME_MAX = 15  # object names: 16 bytes with the NUL

_libc = ctypes.CDLL(None, use_errno=True)


def syscall_number(machine: str | None = None) -> int:
    """bpf(2)'s system call number on this machine (or on `machine`, as
    uname -m names it); OSError on an architecture we do not know."""
    machine = machine or os.uname().machine
    if machine not in SYS_BPF:
        raise OSError(errno.ENOSYS, f"bpf(2) system call number unknown for {machine!r}: the tc drops "
                                    "cannot be loaded here")
    return SYS_BPF[machine]


def call(cmd: int, attr: ctypes.Array, what: str) -> int:
    """bpf(cmd, attr); its result, or OSError naming `what`."""
    r = _libc.syscall(syscall_number(), cmd, attr, len(attr.raw))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return r


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def ld_map_fd(dst: int, fd: int) -> bytes:
    """dst = the map behind fd (BPF_LD_IMM64 with BPF_PSEUDO_MAP_FD: two slots)."""
    return insn(0x18, dst=dst, src=PSEUDO_MAP_FD, imm=fd) + insn(0)


def s32(value: int) -> int:
    """An unsigned 32-bit immediate as the signed field that holds it."""
    return struct.unpack("<i", struct.pack("<I", value))[0]


def load_program(insns: bytes, name: str, prog_type: int = PROG_TYPE_SCHED_CLS) -> int:
    """Loads a program; returns its fd. The verifier's log is in the error."""
    code = ctypes.create_string_buffer(insns)
    license = ctypes.create_string_buffer(b"Apache-2.0")
    log_buf = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIQQIIQII16s", prog_type, len(insns) // 8, ctypes.addressof(code), ctypes.addressof(license),
        1, len(log_buf), ctypes.addressof(log_buf), 0, 0, name.encode()[:NAME_MAX]))
    try:
        return call(PROG_LOAD, attr, "BPF_PROG_LOAD")
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror}: {log_buf.value.decode(errors='replace')}") from None


def create_array(name: str, value_size: int, entries: int) -> int:
    """An array map of `entries` values indexed by a u32, zeroed; returns its fd."""
    attr = ctypes.create_string_buffer(struct.pack("<IIIIIII16s", MAP_TYPE_ARRAY, 4, value_size, entries,
                                                   0, 0, 0, name.encode()[:NAME_MAX]))
    return call(MAP_CREATE, attr, "BPF_MAP_CREATE")


def lookup(fd: int, key: int, value_size: int) -> bytes:
    """The value at key of the array map behind fd."""
    k = ctypes.create_string_buffer(struct.pack("<I", key))
    value = ctypes.create_string_buffer(value_size)
    attr = ctypes.create_string_buffer(struct.pack("<IIQQQ", fd, 0, ctypes.addressof(k),
                                                   ctypes.addressof(value), 0))
    call(MAP_LOOKUP_ELEM, attr, "BPF_MAP_LOOKUP_ELEM")
    return value.raw
