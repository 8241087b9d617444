"""Kernel VXLAN between the node namespaces, built the way Calico's VXLAN mode
builds vxlan.calico: one VTEP per node with no remote, and per peer a
permanent neighbour entry for its VTEP, an FDB entry sending that MAC to the
peer's node address, and a route for its pod CIDR via its VTEP."""
from __future__ import annotations

from ipipfast_lab.testbed import ROUTE_METRIC, Node, Testbed

from . import ONLINK, Running

POD_MTU = 1450  # 50 bytes of VXLAN over IPv4
VNI = 4096      # Calico's
PORT = 4789
_NUD_PERMANENT = 0x80


def _vtep(node: Node) -> tuple[str, str]:
    """(address, MAC) of the node's VTEP."""
    return f"198.18.1.{10 + node.index}", f"02:42:c6:12:01:{node.index:02x}"


def start(tb: Testbed) -> Running:
    for node in tb.nodes:
        ipr = tb.ipr(node)
        underlay = ipr.link_lookup(ifname=node.interface)[0]
        ip, mac = _vtep(node)
        name = f"{tb.prefix}x{node.index}"
        ipr.link("add", ifname=name, kind="vxlan", vxlan_id=VNI, vxlan_local=node.ip, vxlan_port=PORT,
                 vxlan_link=underlay, address=mac, mtu=POD_MTU)
        index = ipr.link_lookup(ifname=name)[0]
        ipr.addr("add", index=index, address=ip, prefixlen=32)
        ipr.link("set", index=index, state="up")
        for other in tb.nodes:
            if other is not node:
                peer_ip, peer_mac = _vtep(other)
                ipr.neigh("add", dst=peer_ip, lladdr=peer_mac, ifindex=index, state=_NUD_PERMANENT)
                ipr.fdb("add", ifindex=index, lladdr=peer_mac, dst=other.ip)
                ipr.route("add", dst=other.pod_cidr, gateway=peer_ip, oif=index, flags=ONLINK,
                          priority=ROUTE_METRIC)
    return Running()  # no process; the links go with the namespaces
