"""Simulated nodes in etcd, in flannel's form, for bench.etcd_scale: run
inside a testbed namespace (it talks to etcd over the testbed's underlay).

    python -m bench.etcd_load --endpoint URL --prefix P --state FILE load --nodes 1000 --cidrs 5000 --prefixlen 28
    python -m bench.etcd_load --endpoint URL --prefix P --state FILE churn --rate 100 --seconds 60 --out FILE

load: one lease per node (granted for an hour, so none expires during a
run and no keep-alive is needed), then every CIDR's key under its node's
lease, `<prefix>/subnets/<net>-<len>` = {"PublicIP", "BackendType": "ipip",
"BackendData": null}, in transactions of etcd's largest (128 puts). CIDR i
belongs to node i % nodes. Nodes are at 198.18.4.10 on (off the testbed's
underlay subnet, so that a daemon reaches them all through its gateway);
CIDRs are /prefixlen blocks from 198.18.16.0 up, clear of the testbed's pod
CIDRs (198.19.0.0/22). --extra CIDR=IP adds a real node's key under a lease
of its own. The layout goes to the state file for churn. The last line of
stdout: seconds taken, keys, the store's revision, and a timed read of the
whole prefix (the datastore's own share of a daemon's first list).

churn: route changes, one put each, paced at --rate for --seconds: change k
moves CIDR k % cidrs to the next node (its PublicIP, under that node's
lease), so every put changes a route. Each put's CLOCK_MONOTONIC ns just
before it is sent and just after its answer, and the revision etcd gave it,
go to --out as JSON; the last line of stdout sums them up.
"""
from __future__ import annotations

import argparse
import base64
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import etcd3gw

TXN_OPS = 128  # etcd's --max-txn-ops default
LEASE_TTL = 3600
NODES_FROM = 198 << 24 | 18 << 16 | 4 << 8 | 10  # 198.18.4.10
CIDRS_FROM = 198 << 24 | 18 << 16 | 16 << 8  # 198.18.16.0
CIDRS_END = 198 << 24 | 20 << 16  # 198.20.0.0
PODS = (198 << 24 | 19 << 16, 198 << 24 | 19 << 16 | 4 << 8)  # 198.19.0.0/22: the testbed's pod CIDRs


def dotted(a: int) -> str:
    return f"{a >> 24}.{a >> 16 & 255}.{a >> 8 & 255}.{a & 255}"


def node_ip(j: int) -> str:
    return dotted(NODES_FROM + j)


def cidrs(n: int, prefixlen: int) -> list[str]:
    """n /prefixlen blocks from 198.18.16.0 up, clear of the pod CIDRs."""
    size, out, a = 1 << (32 - prefixlen), [], CIDRS_FROM
    while len(out) < n:
        if a + size > CIDRS_END:
            raise ValueError(f"198.18.16.0-198.19.255.255 holds fewer than {n} /{prefixlen} blocks")
        if not PODS[0] <= a < PODS[1]:
            out.append(f"{dotted(a)}/{prefixlen}")
        a += size
    return out


def value(ip: str) -> str:
    return json.dumps({"PublicIP": ip, "BackendType": "ipip", "BackendData": None}, separators=(",", ":"))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


class Etcd:
    """The v3 JSON gateway's calls that the load needs, through etcd3gw."""

    def __init__(self, endpoint: str, prefix: str) -> None:
        url = urlsplit(endpoint)
        self.client = etcd3gw.Etcd3Client(host=url.hostname, port=url.port, protocol=url.scheme, api_path="/v3/",
                                          timeout=30)
        self.subnets = prefix + "/subnets/"

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.client.post(self.client.get_url(path), json=body)

    def key(self, cidr: str) -> str:
        return self.subnets + cidr.replace("/", "-")

    def grant(self) -> int:
        return int(self.call("/lease/grant", {"TTL": LEASE_TTL, "ID": 0})["ID"])

    def put(self, cidr: str, ip: str, lease: int) -> int:
        """The revision of the put."""
        body = {"key": _b64(self.key(cidr)), "value": _b64(value(ip)), "lease": lease}
        return int(self.call("/kv/put", body)["header"]["revision"])

    def put_all(self, items: list[tuple[str, str, int]]) -> None:
        for i in range(0, len(items), TXN_OPS):
            ops = [{"request_put": {"key": _b64(self.key(c)), "value": _b64(value(ip)), "lease": lease}}
                   for c, ip, lease in items[i:i + TXN_OPS]]
            self.call("/kv/txn", {"compare": [], "success": ops})

    def list_all(self) -> tuple[int, int]:
        """(keys, revision) of a paged read of the prefix, as the source lists it."""
        end = _b64(self.subnets[:-1] + "0")
        body: dict[str, Any] = {"key": _b64(self.subnets), "range_end": end, "limit": 1000}
        n = revision = 0
        while True:
            resp = self.call("/kv/range", body)
            revision = revision or int(resp["header"]["revision"])
            kvs = resp.get("kvs", [])
            n += len(kvs)
            if not resp.get("more") or not kvs:
                return n, revision
            after = base64.b64encode(base64.b64decode(kvs[-1]["key"]) + b"\0").decode()
            body = {**body, "key": after, "revision": revision}


def cmd_load(a: argparse.Namespace, etcd: Etcd) -> dict[str, Any]:
    t0 = time.monotonic()
    leases = [etcd.grant() for _ in range(a.nodes)]
    blocks = cidrs(a.cidrs, a.prefixlen)
    items = [(c, node_ip(i % a.nodes), leases[i % a.nodes]) for i, c in enumerate(blocks)]
    for extra in a.extra:
        cidr, ip = extra.split("=")
        items.append((cidr, ip, etcd.grant()))
    etcd.put_all(items)
    loaded = time.monotonic() - t0
    t1 = time.monotonic()
    keys, revision = etcd.list_all()
    listed = time.monotonic() - t1
    Path(a.state).write_text(json.dumps({"nodes": a.nodes, "cidrs": blocks, "leases": leases}))
    return {"seconds": round(loaded, 3), "keys": keys, "revision": revision, "list_s": round(listed, 4)}


def cmd_churn(a: argparse.Namespace, etcd: Etcd) -> dict[str, Any]:
    state = json.loads(Path(a.state).read_text())
    nodes, blocks, leases = state["nodes"], state["cidrs"], state["leases"]
    total = int(a.rate * a.seconds)
    puts: list[tuple[int, int, int]] = []  # (ns before, ns after, revision)
    start = time.monotonic()
    for k in range(total):
        wait = start + k / a.rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        i = (a.offset + k) % len(blocks)
        owner = (i % nodes + 1 + (a.offset + k) // len(blocks)) % nodes
        before = time.monotonic_ns()
        revision = etcd.put(blocks[i], node_ip(owner), leases[owner])
        puts.append((before, time.monotonic_ns(), revision))
    seconds = time.monotonic() - start
    Path(a.out).write_text(json.dumps(puts))
    rtt = sorted((after - before) / 1e6 for before, after, _ in puts)
    return {"puts": total, "seconds": round(seconds, 3), "rate": round(total / seconds, 1),
            "put_p50_ms": rtt[len(rtt) // 2] if rtt else None, "put_p99_ms": rtt[int(len(rtt) * 0.99)] if rtt else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.etcd_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--prefix", default="/coreos.com/network")
    p.add_argument("--state", required=True, help="the layout, written by load and read by churn")
    sub = p.add_subparsers(dest="command", required=True)
    load = sub.add_parser("load")
    load.add_argument("--nodes", type=int, default=1000)
    load.add_argument("--cidrs", type=int, default=5000)
    load.add_argument("--prefixlen", type=int, default=28)
    load.add_argument("--extra", action="append", default=[], help="CIDR=IP: a real node's key too")
    churn = sub.add_parser("churn")
    churn.add_argument("--rate", type=float, default=100)
    churn.add_argument("--seconds", type=float, default=60)
    churn.add_argument("--offset", type=int, default=0, help="the first change's number (to go on from a run)")
    churn.add_argument("--out", required=True)
    a = p.parse_args(argv)
    etcd = Etcd(a.endpoint, a.prefix)
    result = cmd_load(a, etcd) if a.command == "load" else cmd_churn(a, etcd)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
