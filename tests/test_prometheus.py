"""A real Prometheus server in the testbed scrapes a node's daemon across the
underlay and answers, through its HTTP API, the rate of tunnelled packets
while a pod pings another node's pod."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from ipipfast_lab.daemons import TunnelProcess
from ipipfast_lab.prometheus import PrometheusServer
from ipipfast_lab.testbed import Testbed

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET"),
    pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs prometheus (Debian package prometheus)"),
]
STATS_PORT = 9464


def test_prometheus_answers_the_rate_of_tunnelled_packets() -> None:
    with Testbed(nodes=2, pods_per_node=1) as tb:
        n0, n1 = tb.nodes
        a, b = n0.pods[0], n1.pods[0]
        tunnels = [TunnelProcess(tb, n, {**tb.node_config(n), "stats": {"listen": f"{n.ip}:{STATS_PORT}"}})
                   for n in tb.nodes]
        try:
            for t in tunnels:
                t.wait_ready()
            t0 = tunnels[0]
            target = f"{n0.ip}:{STATS_PORT}"
            # On the other node, as a monitoring host would be: the scrapes cross the underlay.
            with PrometheusServer(tb, n1, f"{n1.ip}:9090", [target]) as prom:
                up = prom.wait_value('up{job="ipipfast"}', lambda v: v == 1)
                assert up["metric"]["instance"] == target
                before = t0.counters()["tx_packets"]
                flood = tb.popen(a, [sys.executable, "-m", "ipipfast_lab.traffic", "ping", "--dst", b.ip,
                                     "--count", "3000", "--interval", "0.005"], stdout=subprocess.DEVNULL)
                try:
                    rate = prom.wait_value('rate(ipipfast_packets_total{direction="tx"}[2s])', lambda v: v > 0)
                    scraped = prom.query('ipipfast_packets_total{direction="tx"}')
                    after = t0.counters()["tx_packets"]
                finally:
                    flood.kill()
                    flood.wait()
        finally:
            for t in tunnels:
                t.stop()
    assert rate["metric"] == {"direction": "tx", "instance": target, "job": "ipipfast"}
    # What Prometheus holds is what the daemon counted: between our two readings.
    assert len(scraped) == 1 and before <= float(scraped[0]["value"][1]) <= after, (before, scraped, after)
