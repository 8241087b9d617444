"""wireguard-go, the userspace WireGuard: a TUN tunnel like ipipfast, with
encryption on top. One wireguard-go per node (its TUN named after the run),
configured with `wg`, every other node a peer owning that node's pod CIDR."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from ipipfast_lab.testbed import Testbed

from . import Running, await_link, route_into

REQUIRES = {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"}
POD_MTU = 1440  # 60 bytes of WireGuard over IPv4: Calico's default
PORT = 51820


def _keypair() -> tuple[str, str]:
    # Pure computation, no traffic: fine outside the namespaces.
    private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout
    return private.strip(), public.strip()


def start(tb: Testbed) -> Running:
    keys = [_keypair() for _ in tb.nodes]
    # Foreground, and no banner advising the kernel module this kernel lacks.
    env = {**os.environ, "WG_PROCESS_FOREGROUND": "1"}
    procs = []
    for node in tb.nodes:
        name = f"{tb.prefix}w{node.index}"
        proc = tb.popen(node, ["wireguard-go", "-f", name], env=env, stdout=subprocess.DEVNULL)
        procs.append(proc)
        index = await_link(tb, node, name, proc)
        peers = [arg for o in tb.nodes if o is not node
                 for arg in ("peer", keys[o.index][1], "endpoint", f"{o.ip}:{PORT}", "allowed-ips", o.pod_cidr)]
        with tempfile.TemporaryDirectory(prefix=f"{tb.prefix}-wg-") as d:
            key = Path(d) / "private"
            key.touch(mode=0o600)
            key.write_text(keys[node.index][0])
            tb.run(node, ["wg", "set", name, "private-key", str(key), "listen-port", str(PORT), *peers])
        route_into(tb, node, index, POD_MTU)
    return Running(pids=[p.pid for p in procs])
