"""A naive IPIP tunnel in pure Python, the baseline ipipfast must beat by 15x:
one packet per syscall each way, no batching, no offloads.

    python -m bench.baselines.naive --tun NAME --local IP --route CIDR=PEER [--route ...]

Encap: read the TUN, prepend an outer IPv4 header built with struct, send it on
an IPPROTO_RAW socket. Decap: receive on an IPPROTO_IPIP raw socket, strip the
outer header, write the TUN. The TUN's MTU and routes are set by start().
"""
from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
import threading
from ipaddress import IPv4Network

from ipipfast_lab.testbed import Testbed
from ipipfast.tun import open_tun

from . import Running, await_link, route_into

POD_MTU = 1480
_DF = 0x4000


def encap(tun: int, tx: socket.socket, local: bytes, routes: list[tuple[int, int, bytes]]) -> None:
    while True:
        pkt = os.read(tun, 65535)
        if len(pkt) < 20 or pkt[0] >> 4 != 4:
            continue
        dst = int.from_bytes(pkt[16:20], "big")
        peer = next((p for net, mask, p in routes if dst & mask == net), None)
        if peer is None:
            continue
        df = struct.unpack_from("!H", pkt, 6)[0] & _DF
        # id 0 and checksum 0: the kernel fills in both on IP_HDRINCL sockets.
        outer = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(pkt), 0, df, pkt[8],
                            socket.IPPROTO_IPIP, 0, local, peer)
        try:
            tx.sendto(outer + pkt, (socket.inet_ntoa(peer), 0))
        except OSError:  # e.g. ENOBUFS under a flood: drop, as a device would
            pass


def decap(rx: socket.socket, tun: int, peers: set[str]) -> None:
    while True:
        data, (src, _) = rx.recvfrom(65535)
        ihl = (data[0] & 0xF) * 4
        if src in peers and len(data) > ihl:
            try:
                os.write(tun, data[ihl:])
            except OSError:  # not an IPv4 packet the TUN accepts: drop
                pass


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.baselines.naive", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tun", required=True)
    ap.add_argument("--local", required=True, help="this node's underlay address")
    ap.add_argument("--route", action="append", required=True, metavar="CIDR=PEER")
    a = ap.parse_args(argv)
    routes = []
    for spec in a.route:
        cidr, peer = spec.split("=")
        net = IPv4Network(cidr)
        routes.append((int(net.network_address), int(net.netmask), socket.inet_aton(peer)))
    [tun] = open_tun(a.tun).fds  # one queue, no offloads: naive
    tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # implies IP_HDRINCL
    rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_IPIP)
    threading.Thread(target=decap, args=(rx, tun, {socket.inet_ntoa(p) for *_, p in routes}), daemon=True).start()
    encap(tun, tx, socket.inet_aton(a.local), routes)  # until SIGTERM


def start(tb: Testbed) -> Running:
    procs = []
    for node in tb.nodes:
        name = f"{tb.prefix}n{node.index}"
        routes = [f"--route={o.pod_cidr}={o.ip}" for o in tb.nodes if o is not node]
        proc = tb.popen(node, [sys.executable, "-m", "bench.baselines.naive", "--tun", name,
                               "--local", node.ip, *routes])
        procs.append(proc)
        route_into(tb, node, await_link(tb, node, name, proc), POD_MTU)
    return Running(pids=[p.pid for p in procs])


if __name__ == "__main__":
    main()
