"""Which interface is the node's underlay and which subnet its address is
in: as the config says, or found from the interface that holds node.ip. A
DaemonSet gives every node one config and the node's address alone (the
downward API's status.hostIP, through `run --node-ip`): the interface and
the prefix length, which CrossSubnet needs, differ per node."""
from __future__ import annotations

import logging
from dataclasses import replace
from ipaddress import IPv4Interface

from .config import NodeConfig
from .routes import Mode

log = logging.getLogger(__name__)


class UnderlayError(LookupError):
    """No interface, or more than one, is the node's underlay; the message says what to give."""


def find_underlay(node: NodeConfig, holders: list[tuple[str, int]], mode: Mode) -> NodeConfig:
    """node with its interface and prefix length filled in from holders,
    the (interface, prefix length) of each address equal to node.ip."""
    ip = node.ip.ip
    interface = node.interface
    if interface is None:
        names = sorted({name for name, _ in holders})
        if not names:
            raise UnderlayError(f"no interface holds node.ip {ip}: give the node's own address, or node.interface")
        if len(names) > 1:
            raise UnderlayError(f"node.ip {ip} is on {', '.join(names)}: say which is the underlay with "
                                "node.interface")
        interface = names[0]
    if node.prefixlen_given:
        return replace(node, interface=interface)
    prefixes = [plen for name, plen in holders if name == interface]
    if not prefixes:
        if mode is Mode.CROSS_SUBNET:
            log.warning("node.ip %s has no prefix length and is not an address of %s, so it is /32 and "
                        "CrossSubnet encapsulates to every peer: give the underlay subnet (e.g. %s/24)",
                        ip, interface, ip)
        return replace(node, interface=interface)
    return replace(node, ip=IPv4Interface(f"{ip}/{prefixes[0]}"), interface=interface, prefixlen_given=True)
