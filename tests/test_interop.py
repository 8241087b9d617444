"""ipipfast against a real kernel ipip peer: a stock Debian kernel's tunl0 in QEMU.

One ipipfast node (Testbed node n0, 198.18.0.10, pod 198.19.0.2 behind a cali
veth) and the VM (198.18.0.11, tunl0, "pod" 198.19.1.2 on a dummy) share one
bridge in a switch namespace (198.18.0.1, the router/injector); see
interop_helpers.py.  The VM boots once per module (about 3 s under TCG).
Packets are built with scapy; AF_PACKET captures on the bridge ports, parsed
field by field by the helpers (no product code), are the oracle.  Inner
packets are crafted in the pod namespace (through ipipfast) or sent from the
switch namespace to the VM (which forwards them into tunl0).  Every node forwards
the inner packet once before encapsulating it, so "TTL 64" leaves as 63.

Outer headers, field by field (test_wire_outer_headers_match_the_kernel).
ipipfast and the kernel wrote the same value in every cell; version 4, IHL 5,
protocol 4, MF 0, offset 0 and a valid header checksum in every row, and the
inner header untouched (but for the forwarding hop) on both sides:

| inner packet (TTL, TOS, DF, length) | A: tunl0 defaults (ttl inherit, tos 0, nopmtudisc) | B: ttl 33, tos 0x28, pmtudisc | C: ttl inherit, tos inherit, nopmtudisc |
|---|---|---|---|
| 64, 0x00, DF, 64       | TOS 0x00, DF, TTL 63, len 84   | TOS 0x28, DF, TTL 33, len 84   | TOS 0x00, DF, TTL 63, len 84   |
| 2, 0x00, DF, 64        | TOS 0x00, DF, TTL 1, len 84    | TOS 0x28, DF, TTL 33, len 84   | TOS 0x00, DF, TTL 1, len 84    |
| 64, 0xb8, DF, 64       | TOS 0x00, DF, TTL 63, len 84   | TOS 0x28, DF, TTL 33, len 84   | TOS 0xb8, DF, TTL 63, len 84   |
| 64, ECT(0), DF, 64     | TOS 0x02, DF, TTL 63, len 84   | TOS 0x2a, DF, TTL 33, len 84   | TOS 0x02, DF, TTL 63, len 84   |
| 64, ECT(1), DF, 64     | TOS 0x01, DF, TTL 63, len 84   | TOS 0x29, DF, TTL 33, len 84   | TOS 0x01, DF, TTL 63, len 84   |
| 64, CE, DF, 64         | TOS 0x02, DF, TTL 63, len 84   | TOS 0x2a, DF, TTL 33, len 84   | TOS 0x02, DF, TTL 63, len 84   |
| 64, 0xb8+CE, DF, 64    | TOS 0x02, DF, TTL 63, len 84   | TOS 0x2a, DF, TTL 33, len 84   | TOS 0xba, DF, TTL 63, len 84   |
| 64, 0x00, no DF, 64    | TOS 0x00, no DF, TTL 63, len 84 | TOS 0x28, DF, TTL 33, len 84  | TOS 0x00, no DF, TTL 63, len 84 |
| 64, 0x00, DF, 1400     | TOS 0x00, DF, TTL 63, len 1420 | TOS 0x28, DF, TTL 33, len 1420 | TOS 0x00, DF, TTL 63, len 1420 |
| 64, 0x00, no DF, 1400  | TOS 0x00, no DF, TTL 63, len 1420 | TOS 0x28, DF, TTL 33, len 1420 | TOS 0x00, no DF, TTL 63, len 1420 |

Rules behind it (net/ipv4/ip_tunnel.c ip_tunnel_xmit, ip_tunnel_core.c
iptunnel_xmit, include/net/inet_ecn.h): outer TOS = the tunnel's tos (or the
inner TOS with "tos inherit") with the inner ECN field, CE written as ECT(0)
(INET_ECN_encapsulate); TTL = the tunnel's, or the inner's with "ttl inherit";
DF = set with pmtudisc (a fixed TTL implies it), else copied from the inner.

Behaviour by behaviour:

| behaviour | kernel tunl0 (Debian 6.1) | ipipfast | test |
|---|---|---|---|
| ping, TCP both ways | - | interoperates | test_ping_both_ways..., test_tcp_* |
| ECN on encap (RFC 6040 4.1) | copy, CE -> ECT(0) | same | test_ecn_pod_to_vm_and_back, test_ecn_through_kernel_encap_and_ipipfast_decap |
| ECN on decap, all 16 outer x inner | RFC 6040 4.2; CE outer + Not-ECT inner dropped (rx_frame_errors) | same (rx_drop_ecn) | test_ecn_decap_table_matches_the_kernel |
| frag-needed from a router, then a DF inner that no longer fits | route exception (600 s), next packet answered with frag-needed(PMTU - 20), pmtudisc and (since 5.11) nopmtudisc | same, per peer (status path_mtu) | test_kernel_/test_ipipfast_frag_needed_round_trip |
| DF inner over the tunnel MTU (1480) | frag-needed 1480 | same (the node's kernel, TUN MTU 1480) | test_frag_needed_for_packets_over_the_tunnel_mtu |
| outer fragments received | reassembled before ipip_rcv | reassembled (PACKET_FANOUT_FLAG_DEFRAG) | test_outer_fragments_from_the_kernel_are_reassembled |

Differences, each asserted:

| difference | kernel tunl0 | ipipfast | intended? | test |
|---|---|---|---|---|
| outer IP ID | __ip_select_ident in iptunnel_xmit, DF packets too: a shared counter per hash bucket of (saddr, daddr, proto) with a secret key, +1 per packet plus a random step after idle jiffies (ip_idents_reserve) | one counter per datapath, from 0 at start, +1 per encapsulated packet (per segment for GSO); workers take blocks of 64 from it | yes (values) | test_wire_ip_id |
| ... with tunnel.workers > 1 | never repeats toward a peer | never repeats (blocks from the shared counter) | same | test_wire_ip_id_unique_per_peer_across_workers |
| the packet a router refused with frag-needed | not reported to its sender (ipip_err only learns the MTU) | relayed at once as frag-needed(PMTU - 20) (RFC 2003 4.1) | yes | test_*_frag_needed_round_trip |
| host/net unreachable, TTL exceeded about an outer packet | dropped (ipip_err: -ENOENT when parms.iph.daddr == 0) | relayed to the inner sender, same type and code, from the node address | yes | test_kernel_tunl0_drops_..., test_ipipfast_relays_... |
| DF-clear inner over the learnt PMTU, nopmtudisc | outer fragmented locally to the PMTU (1300 + 140) | sent whole (1420, DF clear): the path fragments | yes (encap.h ipf_encap_classify) | test_df_clear_inner_over_the_learnt_path_mtu |
| DF-clear inner over the learnt PMTU, pmtudisc | dropped before the wire (Ip FragFails) | sent with DF (1420): the bottleneck drops it | equivalent loss | test_df_clear_inner_over_the_learnt_path_mtu |
| IPIP from a node not in the routes | decapsulated (remote any) | dropped, rx_drop_unknown_peer | yes | test_ipip_from_an_unknown_node |
| IPIP from a peer's address, from a MAC not its next hop's | decapsulated | dropped, rx_drop_source_mac | yes | test_a_peers_address_from_another_mac |
| IPIP in IPIP | decapsulated twice, forwarded | dropped, rx_drop_inner_ipip | yes | test_ipip_in_ipip |
| inner packet to the node's own underlay address | delivered to the node's stack (answered) | dropped, rx_drop_inner_to_local | yes | test_inner_packets_to_node_addresses |
| inner packet to another node's underlay address | forwarded onto the underlay | dropped, rx_drop_inner_to_peer | yes | test_inner_packets_to_node_addresses |
| IPIP to the node's address, another host's MAC | dropped in ip_rcv (PACKET_OTHERHOST) | dropped, rx_drop_other_host | same | test_frames_to_another_mac |
| ... under the broadcast MAC | decapsulated (drop_unicast_in_l2_multicast 0) | dropped, rx_drop_other_host | yes | test_frames_to_another_mac |
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

import kernelvm
from interop_helpers import (
    CE,
    ECN_NAMES,
    ECT0,
    ECT1,
    GATEWAY,
    IPEXT_ECN,
    IPF_NODE,
    IPF_POD,
    NOT_ECT,
    VM_NODE,
    VM_OTHER,
    VM_POD,
    Lab,
    Outer,
    describe,
    ecn_decap,
    ecn_encap,
    icmp_socket,
    inet_checksum,
    ipv4,
    open_lab,
    parse_ipip,
    recv_icmp,
    send_frame,
    send_ip,
    unique_id,
    vm_dev_stats,
    vm_ipext,
    vm_run,
)
from kernelvm import KernelVMUnavailable

from ipipfast_lab import traffic
from ipipfast_lab.daemons import wait_until

pytestmark = [pytest.mark.kernelvm, pytest.mark.netns]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lab_module() -> Iterator[Lab]:
    if os.geteuid() != 0:
        pytest.skip("interop tests need root (network namespaces, TAP, TUN, AF_PACKET)")
    try:
        art = kernelvm.ensure_artifacts()
    except KernelVMUnavailable as e:
        pytest.skip(f"kernel VM unavailable: {e.reason}")
    with open_lab(art) as lab:
        print(f"\nkernel VM {art.kernel_version} booted in {lab.vm.boot_seconds:.1f} s ({' '.join(art.accel)})")
        yield lab


@pytest.fixture
def lab(lab_module: Lab) -> Lab:
    """Both ends with tunl0's defaults (ttl inherit, tos 0, nopmtudisc) and no learnt PMTU."""
    lab_module.vm_tunnel()
    lab_module.start_daemon()
    return lab_module


# ---------------------------------------------------------------- packets


def echo(src: str, dst: str, *, ident: int, ttl: int = 64, tos: int = 0, df: bool = True, size: int = 64,
         icmp_type: int = 8, seq: int = 1) -> bytes:
    """An IPv4 ICMP echo request (or reply: icmp_type 0, which nobody answers)
    of total length `size`, with a deterministic payload."""
    payload = bytes((i * 7 + 3) & 0xFF for i in range(size - 28))
    return raw(IP(src=src, dst=dst, ttl=ttl, tos=tos, flags="DF" if df else 0, id=0x4242)
               / ICMP(type=icmp_type, id=ident, seq=seq) / Raw(payload))


def icmp_error(src: str, dst: str, icmp_type: int, code: int, quoted: bytes, mtu: int = 0) -> bytes:
    """An ICMP error from a router, quoting (the start of) a packet; `mtu` is
    the next-hop MTU of a frag-needed."""
    body = struct.pack("!BBHHH", icmp_type, code, 0, 0, mtu) + quoted
    body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
    return raw(IP(src=src, dst=dst, proto=1, ttl=64, id=0x5151) / Raw(body))


def icmp_id(ip: bytes) -> int | None:
    """The ICMP identifier of an IPv4 packet carrying ICMP, else None."""
    ihl = (ip[0] & 0x0F) * 4
    if len(ip) < ihl + 8 or ip[9] != 1:
        return None
    return struct.unpack("!H", ip[ihl + 4:ihl + 6])[0]


def tunnelled(src_node: str, dst_node: str, ident: int):
    """Predicate: an IPIP frame src_node -> dst_node whose inner ICMP has `ident`."""
    def pred(frame: bytes) -> bool:
        o = parse_ipip(frame)
        return o is not None and (o.src, o.dst) == (src_node, dst_node) and icmp_id(o.inner) == ident
    return pred


def plain(ident: int, dst: str | None = None):
    """Predicate: a plain (not IPIP) IPv4 frame whose ICMP has `ident`."""
    def pred(frame: bytes) -> bool:
        ip = ipv4(frame)
        return (ip is not None and ip[9] == 1 and icmp_id(ip) == ident
                and (dst is None or socket.inet_ntoa(ip[16:20]) == dst))
    return pred


# ---------------------------------------------------------------- 1. ping


def test_ping_both_ways_through_ipipfast_and_the_kernels_tunl0(lab: Lab) -> None:
    with lab.tap_sniffer() as sn:
        r = traffic.ping(lab.tb, lab.pod, VM_POD, count=5, interval=0.05)
        assert r["received"] == 5 and r["corrupt"] == 0, (r, lab.counters())
        rc, out = lab.vm.sh(f"ping -c 3 -i 0.2 -W 2 -I {VM_POD} {IPF_POD}", timeout=20)
        assert rc == 0 and "3 packets received" in out, out
        sn.settle(0.2)
    ipip = [o for o in map(parse_ipip, (f for _, f in sn.frames)) if o is not None]

    def count(src_node: str, inner_src: str, inner_dst: str, icmp_type: int) -> int:
        return sum(1 for o in ipip if (o.src, o.dst) == (src_node, VM_NODE if src_node == IPF_NODE else IPF_NODE)
                   and socket.inet_ntoa(o.inner[12:16]) == inner_src
                   and socket.inet_ntoa(o.inner[16:20]) == inner_dst
                   and o.inner[9] == 1 and o.inner[(o.inner[0] & 15) * 4] == icmp_type)

    # pod -> VM: requests encapsulated by ipipfast, replies by the kernel; and the other way round.
    assert count(IPF_NODE, IPF_POD, VM_POD, 8) == 5, describe([f for _, f in sn.frames])
    assert count(VM_NODE, VM_POD, IPF_POD, 0) == 5, describe([f for _, f in sn.frames])
    assert count(VM_NODE, VM_POD, IPF_POD, 8) == 3, describe([f for _, f in sn.frames])
    assert count(IPF_NODE, IPF_POD, VM_POD, 0) == 3, describe([f for _, f in sn.frames])
    assert all(o.proto == 4 and o.checksum_ok for o in ipip)
    # Nothing with a pod address ever crossed the segment in the clear.
    pods = ("198.19.",)
    clear = [f for _, f in sn.frames if (ip := ipv4(f)) is not None and ip[9] != 4
             and (socket.inet_ntoa(ip[12:16]).startswith(pods) or socket.inet_ntoa(ip[16:20]).startswith(pods))]
    assert not clear, describe(clear)


def test_blackhole_keeps_vm_pods_off_plain_routing(lab: Lab) -> None:
    """n0 routes the VM's pod CIDR into the TUN, over a blackhole (not the underlay)."""
    routes = [(r["type"], r.get_attr("RTA_PRIORITY")) for r in lab.tb.ipr(lab.node).get_routes()
              if r.get_attr("RTA_DST") == "198.19.1.0" and r["dst_len"] == 24]
    assert sorted(routes, key=lambda t: t[1] or 0) == [(1, None), (6, 4000)]  # unicast into the TUN, blackhole


# ---------------------------------------------------------------- 2. TCP


def test_tcp_pod_to_vm_pod(lab: Lab) -> None:
    vm, port, nbytes = lab.vm, 5001, 2 << 20
    data = b"".join(bytes(c) for c in traffic.pattern(nbytes, seed=7))
    size, digest = vm.receive_tcp(lab.pod.name, VM_POD, port, data)
    assert (size, digest) == (nbytes, hashlib.md5(data).hexdigest()), lab.counters()


def test_tcp_vm_pod_to_pod(lab: Lab) -> None:
    port, nbytes = 7001, 2 << 20
    sink = traffic.serve(lab.tb, lab.pod, "tcp-sink", "--port", port, "--once")
    try:
        rc, out = lab.vm.sh(f"head -c {nbytes} /dev/urandom > /tmp/tx && sha256sum /tmp/tx && "
                            f"nc {IPF_POD} {port} < /tmp/tx; r=$?; rm -f /tmp/tx; exit $r", timeout=60)
        assert rc == 0, out
        got = traffic.collect(sink, timeout=30)
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.communicate()
    assert got["peer"] == VM_POD
    assert (got["bytes"], got["sha256"]) == (nbytes, out.split()[0]), lab.counters()


# ---------------------------------------------------------------- 3. ECN


@pytest.mark.parametrize("ecn", [NOT_ECT, ECT1, ECT0, CE], ids=lambda e: ECN_NAMES[e])
def test_ecn_pod_to_vm_and_back(lab: Lab, ecn: int) -> None:
    """The pod's ECN field crosses ipipfast's encap and the kernel's decap
    unchanged (the VM counts the inner packet under its codepoint), with the
    outer written per RFC 6040 (CE -> ECT(0)); the VM's echo reply carries the
    same TOS back through the kernel's encap and ipipfast's decap."""
    ident = unique_id()
    tos = 0xB8 | ecn  # DSCP EF plus the ECN codepoint
    before = vm_ipext(lab.vm)
    with lab.tap_sniffer() as sn, lab.pod_sniffer() as ps:
        send_ip(lab.pod.name, echo(IPF_POD, VM_POD, ident=ident, tos=tos))
        req = sn.wait_for(tunnelled(IPF_NODE, VM_NODE, ident))
        rep = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, ident))
        at_pod = ps.wait_for(lambda f: plain(ident, IPF_POD)(f) and ipv4(f)[20] == 0)
    after = vm_ipext(lab.vm)
    assert req and rep and at_pod, describe([f for _, f in sn.frames])
    o_req, o_rep = parse_ipip(req[0]), parse_ipip(rep[0])
    # ipipfast's encap: outer DSCP 0 (tos 0), ECN from the inner; inner untouched.
    assert (o_req.tos, o_req.inner_tos) == (ecn_encap(0, tos), tos)
    # The kernel decapsulated it to the same codepoint: IpExt counts the outer and the inner.
    delta = {ECN_NAMES[k]: after[v] - before[v] for k, v in IPEXT_ECN.items()}
    counted = Counter([o_req.ecn, ecn])
    assert delta == {ECN_NAMES[k]: counted[k] for k in IPEXT_ECN}, delta
    # The kernel's echo reply reflects the TOS it received, encapsulated per RFC 6040 ...
    assert (o_rep.inner_tos, o_rep.tos) == (tos, ecn_encap(0, tos))
    # ... and ipipfast hands it to the pod unchanged.
    assert ipv4(at_pod[0])[1] == tos


@pytest.mark.parametrize("ecn", [NOT_ECT, ECT1, ECT0, CE], ids=lambda e: ECN_NAMES[e])
def test_ecn_through_kernel_encap_and_ipipfast_decap(lab: Lab, ecn: int) -> None:
    """A packet routed into the VM's tunl0 keeps its ECN field through the
    kernel's encap (outer per RFC 6040) and ipipfast's decap, to the pod."""
    ident = unique_id()
    with lab.tap_sniffer() as sn, lab.pod_sniffer() as ps:
        send_ip(lab.sw, echo(VM_OTHER, IPF_POD, ident=ident, tos=ecn, icmp_type=0))
        wire = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, ident))
        at_pod = ps.wait_for(plain(ident, IPF_POD))
    assert wire and at_pod, describe([f for _, f in sn.frames])
    o = parse_ipip(wire[0])
    assert (o.tos, o.inner_tos) == (ecn_encap(0, ecn), ecn)
    assert ipv4(at_pod[0])[1] == ecn


DECAP_MATRIX = [(o, i) for o in (NOT_ECT, ECT0, ECT1, CE) for i in (NOT_ECT, ECT0, ECT1, CE)]


@pytest.mark.parametrize("outer,inner", DECAP_MATRIX,
                         ids=[f"outer {ECN_NAMES[o]}, inner {ECN_NAMES[i]}" for o, i in DECAP_MATRIX])
def test_ecn_decap_table_matches_the_kernel(lab: Lab, outer: int, inner: int) -> None:
    """RFC 6040 decapsulation, every combination: a router on the path may
    have marked the outer (CE), which the kernel never writes itself.  The
    same crafted IPIP packet goes to the VM (which decapsulates and forwards the
    inner back into tunl0, so the wire shows what it decapsulated to) and to
    ipipfast (the pod shows it)."""
    want = ecn_decap(outer, inner)
    id_k, id_f = unique_id(), unique_id()
    to_vm = raw(IP(src=IPF_NODE, dst=VM_NODE, proto=4, tos=outer, ttl=64, id=0x6001)
                / Raw(echo(VM_OTHER, IPF_POD, ident=id_k, tos=inner, icmp_type=0)))
    to_ipf = raw(IP(src=VM_NODE, dst=IPF_NODE, proto=4, tos=outer, ttl=64, id=0x6002)
                 / Raw(echo(VM_OTHER, IPF_POD, ident=id_f, tos=inner, icmp_type=0)))
    dropped = want is None
    if dropped:
        k_before, f_before = vm_dev_stats(lab.vm, "tunl0"), lab.counters()
    with lab.tap_sniffer() as sn, lab.pod_sniffer() as ps:
        send_ip(lab.sw, to_vm)
        send_frame(lab.sw, lab.uplink, from_vm(lab, to_ipf))  # a frame from the VM's MAC, as its own would be
        timeout = 1.0 if dropped else 5.0
        kernel = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, id_k), timeout=timeout)
        ours = ps.wait_for(plain(id_f, IPF_POD), timeout=timeout)
    kernel_ecn = parse_ipip(kernel[0]).inner_tos & 3 if kernel else None
    ours_ecn = ipv4(ours[0])[1] & 3 if ours else None
    assert kernel_ecn == want, f"kernel decapsulated to {kernel_ecn}, RFC 6040 says {want}"
    assert ours_ecn == kernel_ecn, f"ipipfast decapsulated to {ours_ecn}, the kernel to {kernel_ecn}"
    if dropped:  # both count the drop
        k_delta = {k: v - k_before[k] for k, v in vm_dev_stats(lab.vm, "tunl0").items() if v != k_before[k]}
        assert k_delta.get("rx_frame_errors") == 1 and k_delta.get("rx_errors") == 1, k_delta
        assert lab.daemon.wait_counters(f_before, {"rx_drop_ecn": 1})["rx_drop_ecn"] == 1


# ---------------------------------------------------------------- 4. path MTU and ICMP


BIG = 1400          # inner packet
PATH_MTU = 1300     # what the router on the path says
QUOTE = 548         # bytes a Linux router quotes (576 - 28)


def _is_frag_needed_about(ident: int):
    return lambda p: p[20:22] == b"\x03\x04" and icmp_id(p[28:]) == ident


@dataclass
class PmtuTrip:
    about_first: bytes | None    # ICMP the sender got about the packet the router refused
    about_second: bytes | None   # ... about the next one
    second: list[bytes]          # outer frames of the next one


def _frag_needed_round_trip(lab: Lab, sender_ns: str, src: str, dst: str, node: str, peer: str) -> PmtuTrip:
    """Send a DF packet of BIG bytes through `node`'s tunnel; a router on the
    path refuses the outer packet with frag-needed(PATH_MTU) to `node`
    (quoting it as Linux routers do); then send another."""
    icmp = icmp_socket(sender_ns)
    try:
        with lab.tap_sniffer() as sn:
            first_id, second_id = unique_id(), unique_id()
            send_ip(sender_ns, echo(src, dst, ident=first_id, size=BIG, icmp_type=0))
            first = sn.wait_for(tunnelled(node, peer, first_id))
            assert first, describe([f for _, f in sn.frames])
            send_ip(lab.sw, icmp_error(GATEWAY, node, 3, 4, ipv4(first[0])[:QUOTE], mtu=PATH_MTU))
            about_first = recv_icmp(icmp, _is_frag_needed_about(first_id), 1.0)
            send_ip(sender_ns, echo(src, dst, ident=second_id, size=BIG, icmp_type=0))
            about_second = recv_icmp(icmp, _is_frag_needed_about(second_id), 2.0)
            second = sn.wait_for(tunnelled(node, peer, second_id), timeout=0.3)
    finally:
        icmp.close()
    return PmtuTrip(about_first, about_second, second)


def _wait_path_mtu(lab: Lab, node: str) -> None:
    """Until `node` (the VM's kernel, or ipipfast) has learnt PATH_MTU toward its peer."""
    if node == VM_NODE:
        wait_until(lambda: f"mtu {PATH_MTU}" in lab.vm.run(f"ip route get {IPF_NODE}"), what="the VM's path MTU")
    else:
        assert lab.daemon is not None
        wait_until(lambda: lab.daemon.status()["path_mtu"] == {VM_NODE: PATH_MTU}, what="ipipfast's path MTU")


def _check_frag_needed(got: bytes | None, src: str, dst: str, node: str) -> None:
    """A frag-needed from `node` telling src the MTU that fits in the tunnel."""
    assert got is not None, "no ICMP frag-needed came back to the sender"
    mtu = struct.unpack("!H", got[26:28])[0]
    quoted = got[28:]
    assert mtu == PATH_MTU - 20, f"next-hop MTU {mtu}, expected {PATH_MTU - 20}"
    assert socket.inet_ntoa(got[12:16]) == node
    assert socket.inet_ntoa(quoted[12:16]) == src and socket.inet_ntoa(quoted[16:20]) == dst


@pytest.mark.parametrize("pmtudisc", [False, True], ids=["nopmtudisc", "pmtudisc"])
def test_kernel_frag_needed_round_trip(lab: Lab, pmtudisc: bool) -> None:
    """The kernel keeps the outer path MTU a router reports (ipip_err ->
    ipv4_update_pmtu, a route exception that expires after mtu_expires, 600 s)
    and answers the next DF inner packet that no longer fits with
    frag-needed(PMTU - 20).  Since Linux 5.11 ("net: fix pmtu check in
    nopmtudisc mode") this holds for nopmtudisc too: ip_tunnel_xmit ORs the
    inner DF into df before tnl_update_pmtu().  The packet the router refused
    is not reported to its sender: ipip_err only learns the MTU."""
    lab.vm_tunnel(pmtudisc=pmtudisc)
    lab.vm_dirty()  # it learns a PMTU: the finally flushes it
    try:
        trip = _frag_needed_round_trip(lab, lab.sw, GATEWAY, IPF_POD, VM_NODE, IPF_NODE)
        assert trip.about_first is None
        _check_frag_needed(trip.about_second, GATEWAY, IPF_POD, VM_NODE)
        assert not trip.second, "the packet that cannot fit the path was sent anyway"
        assert f"mtu {PATH_MTU}" in lab.vm.run(f"ip route get {IPF_NODE}")
        # The VM's own pod learns it too: its next big ping leaves in inner fragments that fit.
        rc, out = lab.vm.sh(f"ping -c 2 -i 0.2 -W 2 -s {BIG - 28} -I {VM_POD} {IPF_POD}", timeout=15)
        assert rc == 0, out
    finally:
        lab.vm_tunnel()


@pytest.mark.parametrize("pmtudisc", [False, True], ids=["nopmtudisc", "pmtudisc"])
def test_ipipfast_frag_needed_round_trip(lab: Lab, pmtudisc: bool) -> None:
    """As the kernel: a per-peer path MTU from the router's frag-needed, and
    frag-needed(PMTU - 20) for the next DF inner packet that no longer fits,
    in both modes.  Intended difference: ipipfast also relays the router's
    error about the refused packet to its sender at once (RFC 2003 4.1)."""
    lab.start_daemon(**({"pmtudisc": True} if pmtudisc else {}))
    try:
        trip = _frag_needed_round_trip(lab, lab.pod.name, IPF_POD, VM_POD, IPF_NODE, VM_NODE)
        _check_frag_needed(trip.about_first, IPF_POD, VM_POD, IPF_NODE)
        _check_frag_needed(trip.about_second, IPF_POD, VM_POD, IPF_NODE)
        assert not trip.second, "the packet that cannot fit the path was sent anyway"
        assert lab.daemon.status()["path_mtu"] == {VM_NODE: PATH_MTU}
    finally:
        lab.stop_daemon()  # forget the learnt PMTU
        lab.tb.sysctl(lab.node, "net.ipv4.route.flush", "1")


def test_frag_needed_for_packets_over_the_tunnel_mtu(lab: Lab) -> None:
    """Both tunnels have the same MTU (1480 on a 1500 underlay): a 1500-byte DF
    packet routed into either is answered with frag-needed mtu 1480 by the node."""
    for node, dst in ((VM_NODE, IPF_POD), (IPF_NODE, VM_POD)):
        ident = unique_id()
        icmp = icmp_socket(lab.sw)
        try:
            send_ip(lab.sw, echo(GATEWAY, dst, ident=ident, size=1500, icmp_type=0))
            got = recv_icmp(icmp, _is_frag_needed_about(ident), 2.0)
        finally:
            icmp.close()
        assert got is not None, f"no frag-needed from {node}"
        assert (socket.inet_ntoa(got[12:16]), struct.unpack("!H", got[26:28])[0]) == (node, 1480)


def test_outer_fragments_from_the_kernel_are_reassembled(lab: Lab) -> None:
    """With nopmtudisc and a non-DF inner packet larger than the path MTU the
    kernel fragments the outer packet (DF is copied from the inner): the
    receiver must reassemble before decapsulating."""
    ident = unique_id()
    before = lab.counters()
    lab.vm_dirty()  # the VM learns a PMTU here: flushed before the next test
    with lab.tap_sniffer() as sn, lab.pod_sniffer() as ps:
        first = unique_id()
        send_ip(lab.sw, echo(VM_OTHER, IPF_POD, ident=first, size=BIG, df=False, icmp_type=0))
        got = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, first))
        assert got
        send_ip(lab.sw, icmp_error(GATEWAY, VM_NODE, 3, 4, ipv4(got[0])[:QUOTE], mtu=PATH_MTU))
        _wait_path_mtu(lab, VM_NODE)
        send_ip(lab.sw, echo(VM_OTHER, IPF_POD, ident=ident, size=BIG, df=False, icmp_type=0))
        frags = sn.wait_for(lambda f: (o := parse_ipip(f)) is not None and o.src == VM_NODE
                            and (o.mf or o.frag_offset > 0), count=2)
        at_pod = ps.wait_for(plain(ident, IPF_POD), timeout=2.0)
    assert len(frags) == 2, f"the kernel did not fragment the outer packet: {describe(frags)}"
    first_frag, last_frag = (parse_ipip(f) for f in frags)
    assert (first_frag.mf, first_frag.total_length, last_frag.mf) == (True, PATH_MTU, False)
    delta = {k: v - before[k] for k, v in lab.counters().items() if v != before[k]}
    assert at_pod, f"the reassembled packet never reached the pod: {delta}"
    sent = echo(VM_OTHER, IPF_POD, ident=ident, size=BIG, df=False, icmp_type=0)
    assert ipv4(at_pod[0])[20:BIG] == sent[20:], "payload changed"  # the header changed: two hops


def _snmp_ip(vm: kernelvm.KernelVM) -> dict[str, int]:
    lines = [line.split() for line in vm_run(vm, "cat /proc/net/snmp").splitlines() if line.startswith("Ip:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


@pytest.mark.parametrize("pmtudisc", [False, True], ids=["nopmtudisc", "pmtudisc"])
def test_df_clear_inner_over_the_learnt_path_mtu(lab: Lab, pmtudisc: bool) -> None:
    """A DF-clear inner packet that no longer fits the learnt path MTU (nobody
    may be told: no DF).  nopmtudisc - the kernel fragments the outer packet to
    the PMTU (ip_finish_output -> ip_fragment, DF clear); ipipfast sends it
    whole with DF clear and leaves fragmenting to the path (intended, encap.h
    ipf_encap_classify).  pmtudisc - the outer must carry DF: the kernel drops
    it before the wire (ip_fragment: DF set -> IPSTATS FragFails, frag-needed to
    itself; forwarded inners are not fragmented against the PMTU unless
    ip_forward_use_pmtu); ipipfast sends it with DF, for the bottleneck router
    to drop.  Either way it is lost."""
    lab.vm_tunnel(pmtudisc=pmtudisc)
    lab.vm_dirty()  # it learns a PMTU: the finally flushes it
    lab.start_daemon(**({"pmtudisc": True} if pmtudisc else {}))
    try:
        seen: dict[str, list[Outer]] = {}
        for side, ns, src, dst, node, peer in (("kernel", lab.sw, VM_OTHER, IPF_POD, VM_NODE, IPF_NODE),
                                               ("ipipfast", lab.pod.name, IPF_POD, VM_POD, IPF_NODE, VM_NODE)):
            with lab.tap_sniffer() as sn:
                first = unique_id()
                send_ip(ns, echo(src, dst, ident=first, size=BIG, df=False, icmp_type=0))
                got = sn.wait_for(tunnelled(node, peer, first))
                assert got, describe([f for _, f in sn.frames])
                send_ip(lab.sw, icmp_error(GATEWAY, node, 3, 4, ipv4(got[0])[:QUOTE], mtu=PATH_MTU))
                _wait_path_mtu(lab, node)
                before = _snmp_ip(lab.vm)
                second = unique_id()
                send_ip(ns, echo(src, dst, ident=second, size=BIG, df=False, icmp_type=0))
                sn.settle(0.5)
                outers = [o for _, f in sn.frames if (o := parse_ipip(f)) is not None and o.src == node]
                # the second packet: its first fragment (or whole) carries our ICMP id, plus any later fragments
                seen[side] = [o for o in outers if o.frag_offset or icmp_id(o.inner) == second]
                if side == "kernel" and pmtudisc:
                    assert _snmp_ip(lab.vm)["FragFails"] - before["FragFails"] == 1
        shape = {side: [(o.total_length, o.df, o.mf) for o in outers] for side, outers in seen.items()}
        if pmtudisc:
            assert shape == {"kernel": [], "ipipfast": [(BIG + 20, True, False)]}, shape
        else:
            assert shape == {"kernel": [(PATH_MTU, False, True), (BIG + 20 - PATH_MTU + 20, False, False)],
                             "ipipfast": [(BIG + 20, False, False)]}, shape
    finally:
        lab.stop_daemon()
        lab.tb.sysctl(lab.node, "net.ipv4.route.flush", "1")
        lab.vm_tunnel()


def from_vm(lab: Lab, packet: bytes, dst_mac: str | None = None) -> bytes:
    """packet in an Ethernet frame from the VM's NIC to n0 (or to dst_mac)."""
    return raw(Ether(src=lab.vm.mac, dst=dst_mac or lab.node_mac, type=0x0800) / Raw(packet))


def ipip(src: str, dst: str, inner: bytes) -> bytes:
    return raw(IP(src=src, dst=dst, proto=4, id=0x7100) / Raw(inner))


def _tunl0_takes_what_ipipfast_drops(lab: Lab, to_vm: Callable[[bytes], bytes], to_ipf: Callable[[bytes], None],
                                     reason: str) -> None:
    """An echo reply to the pod behind each node, wrapped by to_vm and sent
    to the VM from the switch namespace, and sent to ipipfast by to_ipf:
    tunl0 decapsulates its own and forwards the echo back through the
    tunnel; ipipfast drops its own (rx_drop_<reason>), the pod sees nothing."""
    id_k, id_f = unique_id(), unique_id()
    counter = f"rx_drop_{reason}"
    before = lab.counters()
    with lab.tap_sniffer() as sn, lab.pod_sniffer() as ps:
        send_ip(lab.sw, to_vm(echo(VM_OTHER, IPF_POD, ident=id_k, icmp_type=0)))
        to_ipf(echo(VM_OTHER, IPF_POD, ident=id_f, icmp_type=0))
        kernel = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, id_k))
        ours = ps.wait_for(plain(id_f, IPF_POD), timeout=1.0)
    assert kernel, "tunl0 did not decapsulate (and forward) the packet"
    assert not ours
    assert lab.daemon.wait_counters(before, {counter: 1})[counter] == 1


def test_ipip_from_an_unknown_node(lab: Lab) -> None:
    """Intended difference: tunl0 (remote any) decapsulates IPIP from anyone;
    ipipfast only from the nodes its routes name (rx_drop_unknown_peer)."""
    stranger = "198.18.0.99"
    _tunl0_takes_what_ipipfast_drops(lab, lambda p: ipip(stranger, VM_NODE, p),
                                     lambda p: send_ip(lab.sw, ipip(stranger, IPF_NODE, p)), "unknown_peer")


def test_a_peers_address_from_another_mac(lab: Lab) -> None:
    """Intended difference: tunl0 decapsulates IPIP from a peer's address
    whatever MAC brings it; ipipfast only from the MAC of the peer's next hop
    (here the VM's own: both are on the bridge), rx_drop_source_mac. Both
    frames come from the switch namespace's MAC."""
    _tunl0_takes_what_ipipfast_drops(lab, lambda p: ipip(IPF_NODE, VM_NODE, p),
                                     lambda p: send_ip(lab.sw, ipip(VM_NODE, IPF_NODE, p)), "source_mac")


def test_ipip_in_ipip(lab: Lab) -> None:
    """Intended difference: tunl0 takes IPIP in IPIP apart twice (the inner
    IPIP to its own address is delivered to ipip_rcv again) and forwards what
    it finds; ipipfast drops it, rx_drop_inner_ipip. Ours comes from the
    VM's MAC, as the VM's own frames do."""
    _tunl0_takes_what_ipipfast_drops(
        lab, lambda p: ipip(IPF_NODE, VM_NODE, ipip(IPF_NODE, VM_NODE, p)),
        lambda p: send_frame(lab.sw, lab.uplink, from_vm(lab, ipip(VM_NODE, IPF_NODE, ipip(VM_NODE, IPF_NODE, p)))),
        "inner_ipip")


def test_inner_packets_to_node_addresses(lab: Lab) -> None:
    """Intended difference: tunl0 delivers an inner packet to its node's own
    underlay address to the node's stack (the VM answers the echo, through
    the tunnel), and forwards one to another node's address onto the
    underlay, as if the node sent it; ipipfast drops both,
    rx_drop_inner_to_local and rx_drop_inner_to_peer (its only peer, the VM,
    is the other node here), and n0 neither answers nor forwards."""
    to_node_k, to_peer_k, to_node_f, to_peer_f = (unique_id() for _ in range(4))
    before = lab.counters()
    with lab.tap_sniffer() as sn, lab.uplink_sniffer() as up:
        send_ip(lab.sw, ipip(IPF_NODE, VM_NODE, echo(IPF_POD, VM_NODE, ident=to_node_k)))
        send_ip(lab.sw, ipip(IPF_NODE, VM_NODE, echo(IPF_POD, IPF_NODE, ident=to_peer_k, icmp_type=0)))
        send_frame(lab.sw, lab.uplink, from_vm(lab, ipip(VM_NODE, IPF_NODE, echo(VM_POD, IPF_NODE, ident=to_node_f))))
        send_frame(lab.sw, lab.uplink, from_vm(lab, ipip(VM_NODE, IPF_NODE,
                                                         echo(VM_POD, VM_NODE, ident=to_peer_f, icmp_type=0))))
        answered = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, to_node_k))
        forwarded = sn.wait_for(plain(to_peer_k, IPF_NODE))
        ours = up.wait_for(lambda f: tunnelled(IPF_NODE, VM_NODE, to_node_f)(f) or plain(to_peer_f, VM_NODE)(f),
                           timeout=1.0)
    assert answered and IP(parse_ipip(answered[0]).inner)[ICMP].type == 0, "the VM did not answer the echo to it"
    assert forwarded, "the VM did not forward the packet to the other node's address"
    assert not ours, describe(ours)
    d = lab.daemon.wait_counters(before, {"rx_drop_inner_to_local": 1, "rx_drop_inner_to_peer": 1})
    assert (d["rx_drop_inner_to_local"], d["rx_drop_inner_to_peer"]) == (1, 1), d


def test_frames_to_another_mac(lab: Lab) -> None:
    """A frame to the node's address under another host's MAC: the kernel
    drops it in ip_rcv (PACKET_OTHERHOST; the VM's NIC promiscuous, so that
    it reaches the kernel at all), as ipipfast does, rx_drop_other_host.
    Under the broadcast MAC the kernel takes it (RFC 1122's SHOULD discard
    is off by default: drop_unicast_in_l2_multicast 0); ipipfast drops it
    too, an intended difference: no peer sends IPIP to a broadcast."""
    other, bcast = "02:00:5e:00:53:07", "ff:ff:ff:ff:ff:ff"
    ids = {mac: (unique_id(), unique_id()) for mac in (other, bcast)}
    vm_run(lab.vm, "ip link set eth0 promisc on")
    before = lab.counters()
    try:
        with lab.tap_sniffer() as sn, lab.pod_sniffer() as ps:
            for mac, (id_k, id_f) in ids.items():
                send_frame(lab.sw, lab.tap, raw(Ether(src=lab.node_mac, dst=mac, type=0x0800) / Raw(
                    ipip(IPF_NODE, VM_NODE, echo(VM_OTHER, IPF_POD, ident=id_k, icmp_type=0)))))
                send_frame(lab.sw, lab.uplink, from_vm(lab, ipip(VM_NODE, IPF_NODE, echo(
                    VM_OTHER, IPF_POD, ident=id_f, icmp_type=0)), dst_mac=mac))
            kernel = {mac: sn.wait_for(tunnelled(VM_NODE, IPF_NODE, id_k), timeout=1.0)
                      for mac, (id_k, _) in ids.items()}
            ours = [f for _, id_f in ids.values() for f in ps.all(plain(id_f, IPF_POD))]
    finally:
        vm_run(lab.vm, "ip link set eth0 promisc off")
    assert not kernel[other], "the kernel took a frame to another host's MAC"
    assert kernel[bcast], "the kernel did not take IPIP to its address under the broadcast MAC"
    assert not ours
    assert lab.daemon.wait_counters(before, {"rx_drop_other_host": 2})["rx_drop_other_host"] == 2


def _outer_error(lab: Lab, sender_ns: str, src: str, dst: str, node: str, peer: str,
                 icmp_type: int, code: int) -> bytes | None:
    """A router answers `node`'s outer packet with an ICMP error; returns the
    ICMP error the inner sender got (or None)."""
    icmp = icmp_socket(sender_ns)
    try:
        with lab.tap_sniffer() as sn:
            ident = unique_id()
            send_ip(sender_ns, echo(src, dst, ident=ident, icmp_type=0))
            sent = sn.wait_for(tunnelled(node, peer, ident))
            assert sent, describe([f for _, f in sn.frames])
            send_ip(lab.sw, icmp_error(GATEWAY, node, icmp_type, code, ipv4(sent[0])[:QUOTE]))
            return recv_icmp(icmp, lambda p: p[20] in (3, 11) and icmp_id(p[28:]) == ident, 1.5)
    finally:
        icmp.close()


OUTER_ERRORS = [(3, 1), (3, 0), (11, 0)]
OUTER_ERROR_IDS = ["host unreachable", "net unreachable", "ttl exceeded"]


@pytest.mark.parametrize("icmp_type,code", OUTER_ERRORS, ids=OUTER_ERROR_IDS)
def test_kernel_tunl0_drops_icmp_errors_about_its_outer_packets(lab: Lab, icmp_type: int, code: int) -> None:
    """tunl0 (remote any) ignores them: ipip_err returns -ENOENT when
    t->parms.iph.daddr == 0.  The behaviour ipipfast improves on."""
    got = _outer_error(lab, lab.sw, GATEWAY, IPF_POD, VM_NODE, IPF_NODE, icmp_type, code)
    assert got is None


@pytest.mark.parametrize("icmp_type,code", OUTER_ERRORS, ids=OUTER_ERROR_IDS)
def test_ipipfast_relays_icmp_errors_about_its_outer_packets(lab: Lab, icmp_type: int, code: int) -> None:
    """Intended difference (RFC 2003 4.1): the error reaches the inner sender,
    from this node, quoting its own packet, with the same type and code."""
    before = lab.counters()
    got = _outer_error(lab, lab.pod.name, IPF_POD, VM_POD, IPF_NODE, VM_NODE, icmp_type, code)
    assert got is not None, "the pod got no ICMP error"
    quoted = got[28:]
    assert (got[20], got[21]) == (icmp_type, code)
    assert socket.inet_ntoa(got[12:16]) == IPF_NODE
    assert socket.inet_ntoa(quoted[12:16]) == IPF_POD and socket.inet_ntoa(quoted[16:20]) == VM_POD
    assert lab.daemon.wait_counters(before, {"icmp_relayed": 1})["icmp_relayed"] == 1


# ---------------------------------------------------------------- 5. wire comparison


@dataclass(frozen=True)
class Inner:
    name: str
    ttl: int = 64
    tos: int = 0
    df: bool = True
    size: int = 64


INNERS = [
    Inner("ttl64"),
    Inner("ttl2", ttl=2),
    Inner("tos 0xb8", tos=0xB8),
    Inner("ECT(0)", tos=ECT0),
    Inner("ECT(1)", tos=ECT1),
    Inner("CE", tos=CE),
    Inner("0xb8+CE", tos=0xB8 | CE),
    Inner("DF clear", df=False),
    Inner("1400 DF", size=1400),
    Inner("1400 no DF", size=1400, df=False),
]


@dataclass(frozen=True)
class Options:
    name: str
    ttl: int | None      # None: inherit
    tos: int | None      # None: inherit
    pmtudisc: bool

    def kernel(self) -> dict:
        return {"ttl": self.ttl or 0, "tos": "inherit" if self.tos is None else f"{self.tos:#x}",
                "pmtudisc": self.pmtudisc}

    def ipipfast(self) -> dict:
        out: dict = {}
        if self.ttl is not None:
            out["ttl"] = self.ttl
        if self.tos != 0:
            out["tos"] = "inherit" if self.tos is None else self.tos
        if self.pmtudisc:
            out["pmtudisc"] = True
        return out

    def expected(self, inner: Inner) -> dict:
        """The outer header both must write (ip_tunnel_xmit + iptunnel_xmit)."""
        base_tos = inner.tos if self.tos is None else self.tos
        return {"tos": ecn_encap(base_tos, inner.tos), "df": self.pmtudisc or inner.df,
                "ttl": self.ttl or inner.ttl - 1, "total_length": inner.size + 20}


OPTIONS = [
    Options("tunl0 defaults: ttl inherit, tos 0, nopmtudisc", None, 0, False),
    Options("ttl 33, tos 0x28, pmtudisc", 33, 0x28, True),
    Options("ttl inherit, tos inherit, nopmtudisc", None, None, False),
]

FIELDS = ("version", "ihl", "tos", "df", "mf", "frag_offset", "ttl", "proto", "total_length", "checksum_ok")


def _both_encapsulate(lab: Lab, inner: Inner) -> tuple[Outer, Outer]:
    """The same inner packet through ipipfast (sent by the pod, forwarded by
    n0 into the TUN) and through the kernel (sent from the segment to the VM,
    forwarded into tunl0).  Both nodes decrement the TTL once on the way in."""
    id_f, id_k = unique_id(), unique_id()
    with lab.tap_sniffer() as sn:
        send_ip(lab.pod.name, echo(IPF_POD, VM_POD, ident=id_f, ttl=inner.ttl, tos=inner.tos, df=inner.df,
                                   size=inner.size, icmp_type=0))
        send_ip(lab.sw, echo(VM_OTHER, IPF_POD, ident=id_k, ttl=inner.ttl, tos=inner.tos, df=inner.df,
                             size=inner.size, icmp_type=0))
        ours = sn.wait_for(tunnelled(IPF_NODE, VM_NODE, id_f))
        kernel = sn.wait_for(tunnelled(VM_NODE, IPF_NODE, id_k))
    assert ours and kernel, f"{inner.name}: {describe([f for _, f in sn.frames])}"
    return parse_ipip(ours[0]), parse_ipip(kernel[0])


@pytest.mark.parametrize("opts", OPTIONS, ids=[o.name for o in OPTIONS])
def test_wire_outer_headers_match_the_kernel(lab: Lab, opts: Options) -> None:
    lab.vm_tunnel(**opts.kernel())
    lab.start_daemon(**opts.ipipfast())
    try:
        rows, mismatches = [], []
        for inner in INNERS:
            ours, kernel = _both_encapsulate(lab, inner)
            want = opts.expected(inner)
            for side, o in (("ipipfast", ours), ("kernel", kernel)):
                got = {f: getattr(o, f) for f in FIELDS}
                fixed = {"version": 4, "ihl": 5, "mf": False, "frag_offset": 0, "proto": 4, "checksum_ok": True}
                for f, v in {**fixed, **want}.items():
                    if got[f] != v:
                        mismatches.append(f"{inner.name}: {side} {f} = {got[f]!r}, expected {v!r}")
                # The encapsulator leaves the inner alone (beyond the forwarding hop).
                if (o.inner_tos, o.inner_ttl, o.inner_len) != (inner.tos, inner.ttl - 1, inner.size) or \
                        inet_checksum(o.inner[:20]) != 0:
                    mismatches.append(f"{inner.name}: {side} changed the inner header")
            for f in FIELDS:
                if getattr(ours, f) != getattr(kernel, f):
                    mismatches.append(f"{inner.name}: {f} ipipfast {getattr(ours, f)!r} != kernel {getattr(kernel, f)!r}")
            rows.append(f"{inner.name:12} tos {ours.tos:#04x}/{kernel.tos:#04x} df {ours.df:d}/{kernel.df:d} "
                        f"ttl {ours.ttl}/{kernel.ttl} len {ours.total_length}/{kernel.total_length} "
                        f"id {ours.ident}/{kernel.ident}")
        print(f"\n[{opts.name}] ipipfast/kernel\n" + "\n".join(rows))
        assert not mismatches, "\n".join(mismatches)
    finally:
        lab.vm_tunnel()


def test_wire_ip_id(lab: Lab) -> None:
    """IDs differ by design.  The kernel: __ip_select_ident in iptunnel_xmit,
    for DF packets too; a counter per hash bucket of (saddr, daddr, proto) with
    a secret key, advanced by one per packet plus a random amount after idle
    jiffies.  ipipfast: one 16-bit counter per datapath (all peers), advanced
    by one per encapsulated packet, from 0 at start."""
    n = 8
    ids_f, ids_k = [unique_id() for _ in range(n)], [unique_id() for _ in range(n)]
    with lab.tap_sniffer() as sn:
        for a, b in zip(ids_f, ids_k):
            send_ip(lab.pod.name, echo(IPF_POD, VM_POD, ident=a, icmp_type=0))
            send_ip(lab.sw, echo(VM_OTHER, IPF_POD, ident=b, icmp_type=0))
        ours = [sn.wait_for(tunnelled(IPF_NODE, VM_NODE, i)) for i in ids_f]
        kernel = [sn.wait_for(tunnelled(VM_NODE, IPF_NODE, i)) for i in ids_k]
    assert all(ours) and all(kernel), describe([f for _, f in sn.frames])
    f_ids = [parse_ipip(f[0]).ident for f in ours]
    k_ids = [parse_ipip(f[0]).ident for f in kernel]
    print(f"\nouter IDs: ipipfast {f_ids}, kernel {k_ids}")
    assert [(b - a) % 65536 for a, b in pairwise(f_ids)] == [1] * (n - 1)
    k_steps = [(b - a) % 65536 for a, b in pairwise(k_ids)]
    assert all(1 <= s < 32768 for s in k_steps), k_steps  # increasing, never repeated
    assert all(parse_ipip(f[0]).df for f in kernel) and any(k_ids)  # DF packets get IDs too


def test_wire_ip_id_unique_per_peer_across_workers(lab: Lab) -> None:
    from scapy.layers.inet import UDP

    lab.start_daemon(workers=2)
    try:
        n = 32
        with lab.tap_sniffer() as sn:
            for sport in range(40000, 40000 + n):  # flows spread over both TUN queues
                send_ip(lab.pod.name, raw(IP(src=IPF_POD, dst=VM_POD, id=7) / UDP(sport=sport, dport=9)
                                          / Raw(b"id" * 16)))
            frames = sn.wait_for(lambda f: (o := parse_ipip(f)) is not None and o.src == IPF_NODE
                                 and o.inner[9] == 17 and not o.df, count=n, timeout=3.0)
        assert len(frames) == n, describe(frames)
        ids = [parse_ipip(f).ident for f in frames]
        repeated = sorted(i for i, k in Counter(ids).items() if k > 1)
        assert not repeated, f"outer IDs repeated toward {VM_NODE}: {repeated} (all: {ids})"
    finally:
        lab.start_daemon()
