"""Keeps the kernel's IP stack out of the IPIP frames the datapath consumes.

Our receive rings are AF_PACKET taps (ETH_P_ALL), which see a frame in
__netif_receive_skb_core before tc ingress does. A tc ingress classifier
that drops IPv4 protocol 4 to this node therefore costs the tunnel nothing
and spares the kernel ip_rcv, a route lookup and a raw-socket clone per
frame (about an eighth of the CPU a TCP stream costs on the sending side,
measured with perf on the veth testbed). It is an eBPF direct-action
program: this kernel has no tc action modules, and direct action needs
none. Eleven instructions, assembled here, so running ipipfast needs no
compiler. If it cannot be attached, the datapath's raw IPIP socket still
keeps the kernel from answering the frames; they are just processed twice.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

# bpf(2)'s number differs per architecture (arch/*/include/uapi/asm/unistd*.h;
# the generic table of arm64, riscv and loongarch has 280).
SYS_BPF = {"x86_64": 321, "i386": 357, "i686": 357, "aarch64": 280, "armv7l": 386, "armv6l": 386,
           "riscv64": 280, "loongarch64": 280, "ppc64le": 361, "ppc64": 361, "s390x": 351}
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
TC_ACT_SHOT, TC_ACT_UNSPEC = 2, -1
INGRESS = 0xFFFFFFF2          # clsact's ingress hook
PRIO = 0xBF                   # our filter's priority, to find it again (as RTPROT_IPIPFAST)
NAME = "ipipfast_ipip"


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, dst | (src << 4), off, imm)


def program(local: IPv4Address) -> bytes:
    """Drop (TC_ACT_SHOT) IPv4 protocol 4 to local, let the rest go on."""
    ld_abs = {2: 0x28, 1: 0x30, 4: 0x20}        # BPF_LD|BPF_ABS|size: r0 = ntoh(skb[k])
    jne32 = 0x56                                # BPF_JMP32|BPF_JNE|BPF_K: 32-bit compare, no sign extension
    addr = struct.unpack("<i", struct.pack("<I", int(local)))[0]
    return b"".join([
        _insn(0xBF, dst=6, src=1),              # r6 = ctx (LD_ABS reads through it)
        _insn(ld_abs[2], imm=12),               # ethertype
        _insn(jne32, off=6, imm=0x0800),
        _insn(ld_abs[1], imm=23),               # IPv4 protocol
        _insn(jne32, off=4, imm=4),
        _insn(ld_abs[4], imm=30),               # IPv4 destination
        _insn(jne32, off=2, imm=addr),
        _insn(0xB7, imm=TC_ACT_SHOT),           # ours: the ring has it already
        _insn(0x95),                            # exit
        _insn(0xB7, imm=TC_ACT_UNSPEC),         # anything else: on to the next filter
        _insn(0x95),
    ])


def bpf_syscall_number(machine: str | None = None) -> int:
    """bpf(2)'s system call number on this machine (or on `machine`, as
    uname -m names it); OSError on an architecture we do not know."""
    machine = machine or os.uname().machine
    if machine not in SYS_BPF:
        raise OSError(errno.ENOSYS, f"bpf(2) system call number unknown for {machine!r}: the tc ingress "
                                    "drop cannot be loaded here")
    return SYS_BPF[machine]


def load(local: IPv4Address) -> int:
    """Loads the program; returns its fd."""
    number = bpf_syscall_number()
    insns = ctypes.create_string_buffer(program(local))
    license = ctypes.create_string_buffer(b"Apache-2.0")
    log_buf = ctypes.create_string_buffer(1 << 16)
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIQQIIQII16s", BPF_PROG_TYPE_SCHED_CLS, len(insns.raw) // 8, ctypes.addressof(insns),
        ctypes.addressof(license), 1, len(log_buf), ctypes.addressof(log_buf), 0, 0, NAME.encode()[:15]))
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(number, BPF_PROG_LOAD, attr, len(attr.raw))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_LOAD: {os.strerror(err)}: {log_buf.value.decode(errors='replace')}")
    return fd


def attach(ifindex: int, local: IPv4Address) -> None:
    """Attaches the drop at ifindex's tc ingress (replacing one a crashed
    run left behind)."""
    fd = load(local)
    try:
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            ipr.tc("replace-filter", "bpf", ifindex, ":1", fd=fd, name=NAME, parent=INGRESS,
                   prio=PRIO, classid=1, direct_action=True)
    finally:
        os.close(fd)  # the filter holds its own reference


def detach(ifindex: int) -> bool:
    """Removes the drop; False if it was not there."""
    with IPRoute() as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, ":1", parent=INGRESS, prio=PRIO)
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.EINVAL):
                raise
            return False
    return True
