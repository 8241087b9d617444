"""The kernel's own IPIP: the ipip module where the running kernel has one (an
NBMA ipip device per node, routes via the peer onlink, as Calico uses tunl0),
else the same datapath from eBPF (ipip_bpf.c: lwt encap + tc ingress decap).

iproute2 is the loader for lwt and cls_bpf objects, so the eBPF path shells
out to `ip` and `tc`: acceptable in bench/, not in product code."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from ipipfast_lab.testbed import ROUTE_METRIC, Node, Testbed

from . import ONLINK, Running, build

POD_MTU = 1480
SOURCE = Path(__file__).with_name("ipip_bpf.c")
BPF_REQUIRES = {"clang": "clang", "/usr/include/bpf/bpf_helpers.h": "libbpf-dev"}
_CLANG = ["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{os.uname().machine}-linux-gnu", "-c"]


@functools.cache
def has_module() -> bool:
    """Loaded, built in, or loadable (a dry run: nothing is loaded here)."""
    return Path("/sys/module/ipip").exists() or bool(
        shutil.which("modprobe") and subprocess.run(["modprobe", "-n", "-q", "ipip"]).returncode == 0)


def impl() -> str:
    return "module" if has_module() else "ebpf"


def requires() -> dict[str, str]:
    return {} if has_module() else BPF_REQUIRES


def start(tb: Testbed) -> Running:
    for node in tb.nodes:
        (_module if has_module() else _ebpf)(tb, node)
    return Running()  # all in the kernel; it goes with the namespaces


def _module(tb: Testbed, node: Node) -> None:
    ipr = tb.ipr(node)
    name = f"{tb.prefix}i{node.index}"
    ipr.link("add", ifname=name, kind="ipip", ipip_local=node.ip)
    index = ipr.link_lookup(ifname=name)[0]
    ipr.link("set", index=index, mtu=POD_MTU, state="up")
    for other in tb.nodes:
        if other is not node:
            ipr.route("add", dst=other.pod_cidr, gateway=other.ip, oif=index, flags=ONLINK, priority=ROUTE_METRIC)


def _ebpf(tb: Testbed, node: Node) -> None:
    net = IPv4Network(f"{node.ip}/{node.prefixlen}", strict=False)
    tb.run(node, ["tc", "qdisc", "add", "dev", node.interface, "clsact"])
    for i, other in enumerate(o for o in tb.nodes if o is not node):
        defines = {"LOCAL_IP": node.ip, "PEER_IP": other.ip, "NODE_NET": net.network_address, "NODE_MASK": net.netmask}
        obj = build(_CLANG, SOURCE, [f"-D{k}={int(IPv4Address(v)):#x}" for k, v in defines.items()], ".o")
        if i == 0:  # one decap filter per node: it accepts IPIP from any node on the underlay
            tb.run(node, ["tc", "filter", "add", "dev", node.interface, "ingress", "bpf", "da",
                          "obj", str(obj), "sec", "tc"])
        tb.run(node, ["ip", "route", "add", other.pod_cidr, "metric", str(ROUTE_METRIC), "encap", "bpf", "xmit",
                      "obj", str(obj), "section", "lwt_xmit", "headroom", "20", "dev", node.interface])
