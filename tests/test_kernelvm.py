"""Tests of the kernel-ipip peer VM (tests/kernelvm.py).

One VM is booted for the module.  All traffic stays in a namespace made here:
the namespace plays the "other node" (198.18.0.1) on the TAP, the VM is node
198.18.0.2 with a pod 198.19.2.2 behind its kernel tunl0.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import kernelvm
from kernelvm import KernelVM, KernelVMUnavailable

HOST_NODE = "198.18.0.1"
VM_NODE = "198.18.0.2"
PREFIX = 24
VM_POD = "198.19.2.2"  # pod behind the VM's tunl0 (pod CIDR 198.19.2.0/24)
HOST_POD_CIDR = "198.19.1.0/24"  # pods "behind" the namespace node
HOST_POD = "198.19.1.5"

ETH_P_ALL = 0x0003
IPPROTO_IPIP = 4

pytestmark = [pytest.mark.kernelvm, pytest.mark.netns]


@dataclass
class Node:
    vm: KernelVM
    ns: str
    tap: str
    artifacts: kernelvm.Artifacts


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if os.geteuid() != 0:
        pytest.skip("kernel VM tests need root (netns, TAP)")
    from pyroute2 import IPRoute, netns

    try:
        art = kernelvm.ensure_artifacts()
    except KernelVMUnavailable as e:
        pytest.skip(f"kernel VM unavailable: {e.reason}")
    sfx = secrets.token_hex(3)
    ns, tap = f"ipfkvm-{sfx}", f"kvt-{sfx}"
    netns.create(ns)
    vm = None
    try:
        kernelvm.create_tap(ns, tap, HOST_NODE, PREFIX)
        vm = KernelVM(ns, tap, VM_NODE, PREFIX, artifacts=art).start()
        print(f"\nkernel VM {art.kernel_version} booted in {vm.boot_seconds:.1f} s ({' '.join(art.accel)})")
        yield Node(vm, ns, tap, art)
    finally:
        if vm is not None:
            vm.close()
        try:
            with IPRoute(netns=ns) as ipr:
                for idx in ipr.link_lookup(ifname=tap):
                    ipr.link("del", index=idx)
        finally:
            netns.remove(ns)


# ---------------------------------------------------------------- helpers


def _scapy():
    from scapy.layers.inet import ICMP, IP
    from scapy.layers.l2 import Ether

    return Ether, IP, ICMP


class Capture:
    """AF_PACKET capture on the namespace's TAP (both directions).  While open
    it also holds a raw IPPROTO_IPIP socket so the namespace's kernel does not
    answer the VM's IPIP with ICMP protocol-unreachable."""

    def __init__(self, node: Node) -> None:
        self.sock = kernelvm.netns_socket(node.ns, socket.AF_PACKET, socket.SOCK_RAW,
                                          socket.htons(ETH_P_ALL))
        self.sock.bind((node.tap, 0))
        self.ipip_sink = kernelvm.netns_socket(node.ns, socket.AF_INET, socket.SOCK_RAW, IPPROTO_IPIP)
        self.sock.setblocking(False)
        while True:  # drop what was queued before
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                break

    def wait_for(self, pred: Callable[[object], bool], timeout: float = 10.0) -> object | None:
        Ether = _scapy()[0]
        deadline = time.monotonic() + timeout
        self.sock.setblocking(True)
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                frame = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                break
            pkt = Ether(frame)
            if pred(pkt):
                return pkt
        return None

    def close(self) -> None:
        self.sock.close()
        self.ipip_sink.close()

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_ipip(pkt: object, src: str, dst: str, inner_src: str, inner_dst: str, icmp_type: int) -> bool:
    _, IP, ICMP = _scapy()
    if not pkt.haslayer(IP):
        return False
    o = pkt[IP]
    if (o.proto, o.src, o.dst) != (IPPROTO_IPIP, src, dst) or not isinstance(o.payload, IP):
        return False
    i = o.payload
    return (i.src, i.dst) == (inner_src, inner_dst) and i.haslayer(ICMP) and i[ICMP].type == icmp_type


def _ipip_setup(vm: KernelVM) -> None:
    vm.setup_ipip(pod_ip=VM_POD, remote_routes=[(HOST_POD_CIDR, HOST_NODE)])


# ---------------------------------------------------------------- pure helpers (no VM)


def test_module_load_order() -> None:
    dep = kernelvm._parse_modules_dep(
        "kernel/net/ipv4/ipip.ko: kernel/net/ipv4/ip_tunnel.ko kernel/net/ipv4/tunnel4.ko\n"
        "kernel/net/ipv4/ip_tunnel.ko:\n"
        "kernel/net/ipv4/tunnel4.ko:\n"
        "kernel/drivers/net/virtio-net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n")
    order = kernelvm._module_load_order(dep, ["virtio_net", "ipip"])
    assert sorted(order) == ["failover", "ip_tunnel", "ipip", "net_failover", "tunnel4", "virtio_net"]
    for mod, (_, deps) in dep.items():
        for d in deps:
            assert order.index(d) < order.index(mod)
    with pytest.raises(KernelVMUnavailable):
        kernelvm._module_load_order(dep, ["nonexistent"])


def test_extract_vmlinux() -> None:
    import lzma

    elf = b"\x7fELF" + os.urandom(5000)
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    image = b"MZ" + os.urandom(300) + kernelvm.XZ_MAGIC + b"decoy" + os.urandom(200) + payload + b"\0" * 64
    assert kernelvm.extract_vmlinux(image) == elf
    with pytest.raises(KernelVMUnavailable):
        kernelvm.extract_vmlinux(b"no payload here")


def test_cpio_newc_layout() -> None:
    c = kernelvm._Cpio()
    c.file("bin/tool", b"abc", 0o755)
    c.symlink("bin/sh", "busybox")
    blob = c.to_bytes()
    names, off = [], 0
    while True:
        assert blob[off:off + 6] == b"070701" and off % 4 == 0
        f = [int(blob[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = blob[off + 110: off + 110 + namesize - 1].decode()
        names.append(name)
        data_off = off + 110 + namesize + (-(110 + namesize) % 4)
        if name == "bin/tool":
            assert blob[data_off:data_off + filesize] == b"abc" and f[1] & 0o170000 == 0o100000
        off = data_off + filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            break
    assert names == ["bin", "bin/tool", "bin/sh", "TRAILER!!!"]
    assert off == len(blob)


# ---------------------------------------------------------------- VM tests


def test_boot_and_uname(node: Node) -> None:
    rc, out = node.vm.sh("uname -r")
    assert rc == 0
    assert out.strip() == node.artifacts.kernel_version
    assert node.vm.boot_seconds is not None and node.vm.boot_seconds < 60


def test_command_channel(node: Node) -> None:
    vm = node.vm
    assert vm.sh("echo out; echo err >&2; exit 7") == (7, "out\nerr\n")
    t0 = time.monotonic()
    rc, _ = vm.sh("sleep 30; echo never", timeout=1)
    assert rc == 137 and time.monotonic() - t0 < 10
    # quoting, multi-line scripts and binary-ish output survive the channel
    script = "x='a b  \"c\"'\nprintf '%s|\\n' \"$x\"\nprintf '\\001\\377'"
    rc, out = vm.sh(script)
    assert rc == 0 and out.startswith('a b  "c"|\n')
    # `ip` is the real iproute2, not busybox's applet
    assert "iproute2" in vm.run("ip -V")


def test_ping_namespace_to_vm(node: Node) -> None:
    _, IP, ICMP = _scapy()
    s = kernelvm.netns_socket(node.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    try:
        ident = secrets.randbelow(0xFFFF)
        s.sendto(bytes(ICMP(type=8, id=ident, seq=1) / b"kernelvm-ping"), (VM_NODE, 0))
        s.settimeout(5)
        deadline = time.monotonic() + 5
        got = None
        while time.monotonic() < deadline:
            ip = IP(s.recv(2048))
            if ip.src == VM_NODE and ip[ICMP].type == 0 and ip[ICMP].id == ident:
                got = ip
                break
        assert got is not None, "no echo reply from the VM"
        assert bytes(got[ICMP].payload) == b"kernelvm-ping"
    finally:
        s.close()
    assert node.vm.ping(HOST_NODE), "VM could not ping the namespace node"


def test_vm_tunl0_emits_ipip(node: Node) -> None:
    vm = node.vm
    _ipip_setup(vm)
    _, IP, ICMP = _scapy()
    assert "ttl inherit nopmtudisc" in vm.run("ip -d link show tunl0")
    with Capture(node) as cap:
        vm.sh(f"ping -c 1 -W 1 -I {VM_POD} {HOST_POD}", timeout=10)  # nobody answers
        pkt = cap.wait_for(lambda p: _is_ipip(p, VM_NODE, HOST_NODE, VM_POD, HOST_POD, 8))
    assert pkt is not None, "no IPIP frame from the VM's tunl0"
    outer, inner = pkt[IP], pkt[IP].payload
    assert outer.ihl == 5 and outer.proto == 4
    assert outer.ttl == inner.ttl  # tunl0: ttl inherit
    assert isinstance(inner.payload, ICMP) and inner[ICMP].type == 8


def test_vm_decapsulates_ipip(node: Node) -> None:
    vm = node.vm
    _ipip_setup(vm)
    _, IP, ICMP = _scapy()
    ident = secrets.randbelow(0xFFFF)
    frame = (IP(src=HOST_NODE, dst=VM_NODE, proto=IPPROTO_IPIP, ttl=17)
             / IP(src=HOST_POD, dst=VM_POD, ttl=64)
             / ICMP(type=8, id=ident, seq=1) / b"via-ipip")
    tx = kernelvm.netns_socket(node.ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        with Capture(node) as cap:
            tx.sendto(bytes(frame), (VM_NODE, 0))
            pkt = cap.wait_for(lambda p: _is_ipip(p, VM_NODE, HOST_NODE, VM_POD, HOST_POD, 0)
                               and p[ICMP].id == ident)
    finally:
        tx.close()
    assert pkt is not None, "VM did not answer the encapsulated echo through tunl0"
    assert bytes(pkt[ICMP].payload) == b"via-ipip"


def test_explicit_tunnel_options(node: Node) -> None:
    """`ip tunnel add … mode ipip local/remote ttl tos pmtudisc` in the VM."""
    vm = node.vm
    _, IP, ICMP = _scapy()
    cidr, dst = "198.19.3.0/24", "198.19.3.7"
    try:
        vm.setup_ipip(dev="ipt1", local=VM_NODE, remote=HOST_NODE, ttl=33, tos="0x28",
                      pmtudisc=True, pod_ip=VM_POD, remote_routes=[(cidr, HOST_NODE)])
        detail = vm.run("ip -d link show ipt1")
        assert f"remote {HOST_NODE} local {VM_NODE} ttl 33 tos 0x28" in detail and "nopmtudisc" not in detail
        with Capture(node) as cap:
            vm.sh(f"ping -c 1 -W 1 -I {VM_POD} {dst}", timeout=10)
            pkt = cap.wait_for(lambda p: _is_ipip(p, VM_NODE, HOST_NODE, VM_POD, dst, 8))
        assert pkt is not None, "no IPIP frame from ipt1"
        outer = pkt[IP]
        assert (outer.ttl, outer.tos) == (33, 0x28)
        assert outer.flags.DF
    finally:
        vm.sh(f"ip route del {cidr}; ip link del ipt1")


def test_tcp_transfer_nc(node: Node) -> None:
    data = os.urandom(1 << 20)
    assert node.vm.receive_tcp(node.ns, VM_NODE, 5001, data) == (len(data), hashlib.md5(data).hexdigest())


def test_iperf3_in_vm(node: Node) -> None:
    vm = node.vm
    vm.spawn("iperf3 -s -1 -p 5202")
    time.sleep(0.5)
    p = subprocess.run(["ip", "netns", "exec", node.ns, "iperf3", "-c", VM_NODE, "-p", "5202",
                        "-t", "2", "-J"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    bps = json.loads(p.stdout)["end"]["sum_received"]["bits_per_second"]
    print(f"\niperf3 namespace -> VM (plain TCP over the TAP): {bps / 1e9:.2f} Gbit/s")
    assert bps > 1e6
