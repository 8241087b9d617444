"""The tc drops' programs, run by the kernel itself (BPF_PROG_TEST_RUN) on
frames scapy builds, and bpf(2)'s number per architecture."""
from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from ipipfast import bpf, tc_drops

root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CAP_BPF) to load programs")
PROG_TEST_RUN = 10
SKB_CTX = 192  # sizeof(struct __sk_buff) as of 6.x; the kernel takes a shorter one too
LOCAL, PEER = "198.18.0.10", "198.18.0.11"
SHOT, UNSPEC = 2, 0xFFFFFFFF


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the C library's SYS_bpf")
def test_the_syscall_number_is_the_c_librarys(tmp_path: Path) -> None:
    """The oracle: SYS_bpf from this machine's own <sys/syscall.h>."""
    src = tmp_path / "nr.c"
    src.write_text('#include <stdio.h>\n#include <sys/syscall.h>\nint main(void) { printf("%d", SYS_bpf); }\n')
    subprocess.run(["gcc", "-o", str(tmp_path / "nr"), str(src)], check=True)
    expected = int(subprocess.run([str(tmp_path / "nr")], capture_output=True, text=True, check=True).stdout)
    assert bpf.syscall_number() == expected


def test_an_unknown_architecture_is_refused_by_name() -> None:
    with pytest.raises(OSError, match="'sparc64'"):
        bpf.syscall_number("sparc64")
    assert bpf.syscall_number("aarch64") == 280  # asm-generic's table, not x86_64's 321


def run(prog_fd: int, frame: bytes, mark: int = 0) -> int:
    """The program's verdict on frame carrying mark, as the kernel runs it."""
    data = ctypes.create_string_buffer(frame, len(frame))
    ctx = ctypes.create_string_buffer(struct.pack("<III", 0, 0, mark).ljust(SKB_CTX, b"\0"))
    attr = ctypes.create_string_buffer(struct.pack(
        "<IIIIQQIIIIQQIII4x", prog_fd, 0, len(frame), 0, ctypes.addressof(data), 0, 1, 0,
        len(ctx.raw), 0, ctypes.addressof(ctx), 0, 0, 0, 0))
    bpf.call(PROG_TEST_RUN, attr, "BPF_PROG_TEST_RUN")
    return struct.unpack_from("<I", attr.raw, 4)[0]


def ipip(src: str, dst: str) -> bytes:
    return raw(Ether() / IP(src=src, dst=dst, proto=4) / IP(src="198.19.0.2", dst="198.19.1.2") / ICMP())


@pytest.fixture
def counter() -> Iterator[tc_drops.Drops]:
    drops = tc_drops.Drops(bpf.create_array("test_drops", 8, 1))
    yield drops
    drops.close()


@root
def test_egress_drops_and_counts_ipip_without_the_datapaths_mark(counter: tc_drops.Drops) -> None:
    fd = bpf.load_program(tc_drops.egress_program(counter.counter_fd), "test_egress")
    try:
        assert run(fd, ipip(LOCAL, PEER), mark=tc_drops.MARK) == UNSPEC  # ours
        assert counter.foreign_ipip() == 0
        assert run(fd, ipip(LOCAL, PEER)) == SHOT                 # a pod's, masqueraded
        assert run(fd, ipip(LOCAL, PEER), mark=0x4000) == SHOT    # kube-proxy's masquerade mark
        assert run(fd, ipip(LOCAL, PEER), mark=tc_drops.MARK | 0x10000) == SHOT  # not exactly ours
        assert counter.foreign_ipip() == 3
        for other in (Ether() / IP(src=LOCAL, dst=PEER) / UDP(dport=53),
                      Ether(type=0x86DD) / bytes(40), Ether() / IP(src=LOCAL, dst=PEER, proto=47)):
            assert run(fd, raw(other)) == UNSPEC, other.summary()
        assert counter.foreign_ipip() == 3
    finally:
        os.close(fd)


@root
def test_ingress_drops_ipip_to_this_node_only() -> None:
    fd = bpf.load_program(tc_drops.ingress_program(IPv4Address(LOCAL)), "test_ingress")
    try:
        assert run(fd, ipip(PEER, LOCAL)) == SHOT
        assert run(fd, ipip(PEER, "198.18.0.12")) == UNSPEC
        assert run(fd, raw(Ether() / IP(src=PEER, dst=LOCAL) / UDP(dport=53))) == UNSPEC
    finally:
        os.close(fd)
