"""`ipipfast demo`, run as a user runs it: what it prints against the
testbed's addressing (node i of subnet X at 198.18.X.(10 + its rank there),
pods 198.19.i.2) and what Calico's modes do with a router that knows no pod
routes."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")]

NODES = {"n0": "198.18.1.10", "n1": "198.18.1.11", "n2": "198.18.2.10"}
POD = {name: f"198.19.{i}.2" for i, name in enumerate(NODES)}


def demo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipipfast", "demo", *args], capture_output=True, text=True,
                          timeout=120)


def sections(out: str) -> dict[str, list[str]]:
    """The lines under each `mode <name> (...)` heading."""
    found: dict[str, list[str]] = {}
    lines: list[str] = []
    for line in out.splitlines():
        if m := re.match(r"mode (\w+) \(", line):
            found[m.group(1)] = lines = []
        elif line.startswith("  "):
            lines.append(line.strip())
    return found


def pair_line(lines: list[str], a: str, b: str) -> str:
    return next(line for line in lines if line.startswith(f"{a} -> {b} "))


def encapsulated(a: str, b: str, to: str) -> str:
    return (f"{a} -> {b}  arrived  IPIP, outer {NODES[a]} -> {NODES[b]} protocol 4 "
            f"(inner {POD[a]} -> {POD[b]}), to {to}")


def direct(a: str, b: str) -> str:
    return f"{a} -> {b}  arrived  plain IP {POD[a]} -> {POD[b]} to {b}'s MAC"


def test_crosssubnet_scenario() -> None:
    r = demo("--scenario", "crosssubnet")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ip route get 198.19.2.2 there says \"Network is unreachable\"" in r.stdout
    modes = sections(r.stdout)
    assert list(modes) == ["Never", "Always", "CrossSubnet"]
    router = "the router's MAC (198.18.1.1)"
    never, always, cross = modes["Never"], modes["Always"], modes["CrossSubnet"]
    assert pair_line(never, "n0", "n1") == direct("n0", "n1")
    for a in ("n0", "n1"):
        assert pair_line(never, a, "n2") == (f"{a} -> n2  LOST     plain IP {POD[a]} -> {POD['n2']} to {router}, "
                                             f"which has no route to 198.19.2.0/24; nothing reached n2")
    assert pair_line(always, "n0", "n1") == encapsulated("n0", "n1", "n1's MAC")
    assert pair_line(cross, "n0", "n1") == direct("n0", "n1")
    for lines in (always, cross):
        for a in ("n0", "n1"):
            assert pair_line(lines, a, "n2") == encapsulated(a, "n2", router)
    # n0's routes of ours, as the kernel has them: via the router, the node, or into the TUN
    routes = {name: next(line for line in lines if line.startswith("n0's routes: ")) for name, lines in modes.items()}
    assert re.fullmatch(r"n0's routes: 198\.19\.1\.0/24 via 198\.18\.1\.11 dev \w+u0; "
                        r"198\.19\.2\.0/24 via 198\.18\.1\.1 dev \w+u0 onlink", routes["Never"])
    assert re.fullmatch(r"n0's routes: 198\.19\.1\.0/24 via 198\.18\.1\.11 dev \w+u0; "
                        r"198\.19\.2\.0/24 via 198\.18\.2\.10 dev \w+t0 onlink", routes["CrossSubnet"])
    assert r.stdout.rstrip().endswith("every pair went as Calico's modes have it\ntorn down")


def test_default_scenario() -> None:
    r = demo("--megabytes", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "the traffic crossed the tunnel both ways" in r.stdout
    assert re.search(r"tcp 198\.19\.0\.2 -> 198\.19\.1\.2: 1 MB at [\d.]+ Gbit/s, sha256 matches", r.stdout)
