"""The two tc programs ipipfast puts on the underlay, attached and removed
together; both eBPF direct-action classifiers (this kernel has no tc action
modules, and direct action needs none), assembled in bpf.py.

Ingress: keeps the kernel's IP stack out of the IPIP frames the datapath
consumes. Our receive rings are AF_PACKET taps (ETH_P_ALL), which see a
frame in __netif_receive_skb_core before tc ingress does. Dropping IPv4
protocol 4 to this node there costs the tunnel nothing and spares the
kernel ip_rcv, a route lookup and a raw-socket clone per frame (about an
eighth of the CPU a TCP stream costs on the sending side, measured with perf
on the veth testbed). If it cannot be attached, the datapath's raw IPIP
socket still keeps the kernel from answering the frames; they are just
processed twice.

Egress: no IPIP but ours leaves the node. A pod can send IPIP itself (a raw
socket, protocol 4) to another node; masqueraded on its way out, as Calico's
natOutgoing does, it carries this node's address, and every other node takes
it for tunnel traffic from a peer and delivers its inner packet, whatever it
is, past the policy of the pod that sent it. Calico drops "IPinIP encapped
packets originating in workloads" with iptables; here the underlay's tc
egress drops every IPv4 protocol 4 frame without the mark that the
datapath's send sockets carry (SO_MARK: tpacket_snd stamps each skb with its
socket's mark). A forwarded packet does not carry it: skb->mark is cleared
as the packet leaves the pod's namespace (skb_scrub_packet), and the marks
netfilter rules set on the node (kube-proxy's, Calico's) are other values.
What it drops is counted in an array map, which the daemon reads.
"""
from __future__ import annotations

import errno
import os
import struct
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import bpf

TC_ACT_SHOT, TC_ACT_UNSPEC = 2, -1
INGRESS = 0xFFFFFFF2          # clsact's ingress hook
EGRESS = 0xFFFFFFF3           # and its egress hook
PRIO = 0xBF                   # our filters' priority, to find them again (as RTPROT_IPIPFAST)
NAMES = {INGRESS: "ipipfast_ipip", EGRESS: "ipipfast_egress"}
# The datapath's frames carry this mark; the egress drop lets them by. An
# exact value, outside the bits that kube-proxy (0x4000, 0x8000) and Calico
# (0xffff0000) set, so that no packet they mark matches it by accident.
MARK = 0xBF
SKB_MARK = 8                  # offsetof(struct __sk_buff, mark)

_LD_ABS = {2: 0x28, 1: 0x30, 4: 0x20}  # BPF_LD|BPF_ABS|size: r0 = ntoh(skb[k]), through r6 = ctx
_JNE32, _JEQ32, _JEQ = 0x56, 0x16, 0x15  # jumps on an immediate (JMP32: no sign extension)


def _assemble(*items: bytes | tuple[int, int, int, str] | str) -> bytes:
    """Instructions, labels (str) and jumps (code, dst, imm, label) to one
    program, each jump's offset counted to its label."""
    at, slots = {}, 0
    for item in items:
        if isinstance(item, str):
            at[item] = slots
        else:
            slots += len(item) // 8 if isinstance(item, bytes) else 1
    out, slots = [], 0
    for item in items:
        if isinstance(item, bytes):
            out.append(item)
            slots += len(item) // 8
        elif isinstance(item, tuple):
            code, dst, imm, label = item
            out.append(bpf.insn(code, dst=dst, off=at[label] - slots - 1, imm=imm))
            slots += 1
    return b"".join(out)


def ingress_program(local: IPv4Address) -> bytes:
    """Drop (TC_ACT_SHOT) IPv4 protocol 4 to local, let the rest go on."""
    i = bpf.insn
    return _assemble(
        i(0xBF, dst=6, src=1),                    # r6 = ctx (LD_ABS reads through it)
        i(_LD_ABS[2], imm=12),                    # ethertype
        (_JNE32, 0, 0x0800, "pass"),
        i(_LD_ABS[1], imm=23),                    # IPv4 protocol
        (_JNE32, 0, 4, "pass"),
        i(_LD_ABS[4], imm=30),                    # IPv4 destination
        (_JNE32, 0, bpf.s32(int(local)), "pass"),
        i(0xB7, imm=TC_ACT_SHOT),                 # ours: the ring has it already
        i(0x95),                                  # exit
        "pass",
        i(0xB7, imm=TC_ACT_UNSPEC),               # anything else: on to the next filter
        i(0x95),
    )


def egress_program(counter_fd: int) -> bytes:
    """Drop IPv4 protocol 4 without MARK, adding one to the u64 at key 0 of
    the array map counter_fd; let the rest go on."""
    i = bpf.insn
    return _assemble(
        i(0xBF, dst=6, src=1),                    # r6 = ctx
        i(_LD_ABS[2], imm=12),
        (_JNE32, 0, 0x0800, "pass"),
        i(_LD_ABS[1], imm=23),
        (_JNE32, 0, 4, "pass"),
        i(0x61, dst=0, src=6, off=SKB_MARK),      # r0 = skb->mark
        (_JEQ32, 0, MARK, "pass"),                # the datapath's own
        i(0x62, dst=10, off=-4, imm=0),           # key 0 on the stack
        bpf.ld_map_fd(1, counter_fd),
        i(0xBF, dst=2, src=10),
        i(0x07, dst=2, imm=-4),                   # r2 = &key
        i(0x85, imm=1),                           # r0 = bpf_map_lookup_elem(r1, r2)
        (_JEQ, 0, 0, "drop"),
        i(0xB7, dst=1, imm=1),
        i(0xDB, dst=0, src=1),                    # lock *(u64 *)r0 += 1
        "drop",
        i(0xB7, imm=TC_ACT_SHOT),
        i(0x95),
        "pass",
        i(0xB7, imm=TC_ACT_UNSPEC),
        i(0x95),
    )


class Drops:
    """The attached programs, as the daemon keeps them: the egress drop's
    count, read from its map."""

    def __init__(self, counter_fd: int) -> None:
        self.counter_fd = counter_fd

    def foreign_ipip(self) -> int:
        """IPIP frames the egress drop has dropped since it was attached."""
        return struct.unpack("<Q", bpf.lookup(self.counter_fd, 0, 8))[0]

    def close(self) -> None:
        if self.counter_fd >= 0:
            os.close(self.counter_fd)
            self.counter_fd = -1


def attach(ifindex: int, local: IPv4Address) -> Drops:
    """Attaches both drops at ifindex's tc hooks, replacing those a stopped
    or crashed run left behind."""
    counter = bpf.create_array("ipipfast_drops", 8, 1)
    try:
        programs = {INGRESS: ingress_program(local), EGRESS: egress_program(counter)}
        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as e:
                if e.code != errno.EEXIST:
                    raise
            for hook, insns in programs.items():
                fd = bpf.load_program(insns, NAMES[hook])
                try:
                    ipr.tc("replace-filter", "bpf", ifindex, ":1", fd=fd, name=NAMES[hook], parent=hook,
                           prio=PRIO, classid=1, direct_action=True)
                finally:
                    os.close(fd)  # the filter holds its own reference
    except BaseException:
        os.close(counter)
        raise
    return Drops(counter)


def detach(ifindex: int) -> list[str]:
    """Removes both drops; returns the hooks they were on ("ingress", "egress")."""
    removed = []
    with IPRoute() as ipr:
        for hook, name in ((INGRESS, "ingress"), (EGRESS, "egress")):
            try:
                ipr.tc("del-filter", "bpf", ifindex, ":1", parent=hook, prio=PRIO)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
                continue
            removed.append(name)
    return removed

