"""kernel.py against a real node namespace: what the daemon asks netlink every
second must not cost memory."""
from __future__ import annotations

import json
import os
import sys

import pytest

from ipipfast_lab.testbed import Testbed

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")]

# A fresh interpreter in the node's namespace, as the daemon is: in a fork of
# pytest, first touches of inherited pages would count as growth.
PERIODIC_GETS = """
import json, sys, threading
from ipaddress import IPv4Address
from ipipfast.kernel import Kernel

def rss_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

peer, interface, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
kernel = Kernel()  # opened by the main thread and asked by another, as the daemon's loops do
index = kernel.link(interface).index
out = {"ifindex": index}

def loop():
    for _ in range(calls // 2):  # the allocator and pyroute2 reach their working size
        kernel.neighbour_macs(index)
        kernel.solicit(peer, index)
        kernel.tx_dropped(interface)
        kernel.link(interface)
    before = rss_kb()
    for _ in range(calls):
        mac = kernel.neighbour_macs(index).get(IPv4Address(peer))
        kernel.solicit(peer, index)
        kernel.tx_dropped(interface)
        link = kernel.link(interface)
    out.update(grown_kb=rss_kb() - before, resolved=mac is not None, link_index=link.index)
    kernel.close_thread()

t = threading.Thread(target=loop)
t.start()
t.join()
kernel.close()
print(json.dumps(out))
"""
CALLS = 2000
# What the neighbour loop asks every second, and every table change too (the
# underlay's own MAC). pyroute2 0.9 kept an unread ACK of about 1.5 kB per
# single get (the next-hop get, now rtnl's lookups), about 0.5 kB per call on
# a socket that another thread opened, and about 3 kB per link_lookup + get
# (the link get, now rtnl's): 2000 rounds grew the heap by 4-8 MB.
GROWTH_KB = 1024


def test_the_daemons_periodic_gets_hold_no_memory():
    with Testbed(nodes=2, pods_per_node=1) as tb:
        node, peer = tb.nodes
        out = tb.run(node, [sys.executable, "-c", PERIODIC_GETS, str(peer.ip), node.interface, str(CALLS)],
                     timeout=120).stdout
    r = json.loads(out)
    assert r["resolved"]  # the solicitations made the kernel resolve the peer
    assert r["link_index"] == r["ifindex"]
    assert r["grown_kb"] < GROWTH_KB, \
        f"{CALLS} rounds of neighbour dumps, solicitations, TUN-drop reads and link gets grew RSS by {r['grown_kb']} kB"


NEIGHBOUR_EVENTS = """
import json, subprocess, sys
from ipipfast.kernel import LinkAddress, Neighbour, NeighbourEvents
interface, ip = sys.argv[1], sys.argv[2]
seen, links = [], []
with NeighbourEvents() as events:
    def read():
        got = events.read(timeout=5) or [None]
        seen.extend(n for n in got if not isinstance(n, LinkAddress))
        links.extend(e for e in got if isinstance(e, LinkAddress))
    for mac in ("02:00:5e:00:00:01", "02:00:5e:00:00:02"):
        subprocess.run(["ip", "neigh", "replace", ip, "lladdr", mac, "dev", interface, "nud", "stale"], check=True)
        while not any(n.mac == bytes.fromhex(mac.replace(":", "")) for n in seen if n):
            read()
    subprocess.run(["ip", "neigh", "replace", ip, "dev", interface, "nud", "failed"], check=True)
    while seen[-1] is None or seen[-1].mac is not None:
        read()
    subprocess.run(["ip", "link", "set", interface, "address", "02:00:5e:00:00:03"], check=True)
    while not links:
        read()
print(json.dumps({"neighbours": [n and [str(n.ip), n.ifindex, n.mac.hex(":") if n.mac else None] for n in seen],
                  "links": [[e.ifindex, e.mac.hex(":")] for e in links]}))
"""


def test_neighbour_events_announce_each_change():
    """What the daemon follows between its periodic checks: a neighbour's new
    MAC as the kernel announces it, an entry that failed, without one, and
    the node's own link taking a new MAC."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        node = tb.nodes[0]
        index = tb.ipr(node).link_lookup(ifname=node.interface)[0]
        out = json.loads(tb.run(node, [sys.executable, "-c", NEIGHBOUR_EVENTS, node.interface, "198.18.0.99"],
                                timeout=60).stdout)
    seen = [tuple(n) for n in out["neighbours"] if n and n[0] == "198.18.0.99"]
    assert ("198.18.0.99", index, "02:00:5e:00:00:01") in seen
    assert ("198.18.0.99", index, "02:00:5e:00:00:02") in seen
    assert seen[-1] == ("198.18.0.99", index, None)
    assert None not in out["neighbours"]  # every read in time: none timed out
    assert [index, "02:00:5e:00:00:03"] in out["links"]


NEIGHBOUR_DUMP = """
import json, subprocess, sys
from ipipfast.kernel import Kernel
interface, index = sys.argv[1], int(sys.argv[2])
def neigh(*args):
    subprocess.run(["ip", "neigh", "replace", *args, "dev", interface], check=True)
neigh("198.18.0.97", "lladdr", "02:00:5e:00:00:07", "nud", "reachable")
neigh("198.18.0.98", "lladdr", "02:00:5e:00:00:08", "nud", "stale")
neigh("198.18.0.99", "nud", "failed")
for i in range(300):  # a table that takes more than one datagram
    neigh(f"198.18.1.{i % 250}" if i < 250 else f"198.18.2.{i - 250}", "lladdr", f"02:00:5e:00:{i >> 8:02x}:{i & 255:02x}",
          "nud", "permanent")
macs = Kernel.neighbour_macs(index)
print(json.dumps({"macs": {str(ip): mac.hex(":") for ip, mac in macs.items()}, "other": Kernel.neighbour_macs(index + 1000)}))
"""


def test_the_neighbour_dump_finds_every_usable_mac_of_the_interface():
    """The next hops' MACs, as `ip neigh` set them: usable entries of any
    state with a MAC (reachable, stale, permanent), a failed one without,
    on the asked interface only, in a table longer than one netlink datagram."""
    with Testbed(nodes=2, pods_per_node=1) as tb:
        node = tb.nodes[0]
        index = tb.ipr(node).link_lookup(ifname=node.interface)[0]
        out = json.loads(tb.run(node, [sys.executable, "-c", NEIGHBOUR_DUMP, node.interface, str(index)],
                                timeout=120).stdout)
        shown = tb.run(node, ["ip", "-4", "neigh", "show", "dev", node.interface]).stdout
    oracle = {f.split()[0]: f.split()[2] for f in shown.splitlines() if " lladdr " in f and "FAILED" not in f}
    assert out["macs"]["198.18.0.97"] == "02:00:5e:00:00:07"
    assert out["macs"]["198.18.0.98"] == "02:00:5e:00:00:08"
    assert "198.18.0.99" not in out["macs"]
    assert out["macs"] == oracle and len(oracle) >= 302
    assert out["other"] == {}
