"""contrib/ipipfast-daemonset.yaml, which no cluster here can run: its
objects against Kubernetes' schemas (strict: an unknown field fails), what
it gives the daemon against the systemd unit, its config against our
parser, and its container's command, capabilities, read-only /proc/sys and
readiness probe played on a testbed node."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ipipfast.config import parse_config
from ipipfast_lab import traffic
from ipipfast_lab.daemons import NodeProcess, TunnelProcess, wait_until
from ipipfast_lab.testbed import Testbed
from test_service import _unit_capabilities

MANIFEST = Path(__file__).resolve().parent.parent / "contrib" / "ipipfast-daemonset.yaml"
BIRD = 12  # the protocol BIRD writes its routes into tunl0 with


def _objects() -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in yaml.safe_load_all(MANIFEST.read_text())}


def _container() -> dict[str, Any]:
    [container] = _objects()["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_objects_are_valid_kubernetes() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objects = _objects()
    assert sorted(objects) == ["ConfigMap", "DaemonSet"]
    for o in objects.values():
        try:
            kv.validate(o, kv.latest_version(), strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{o['kind']}: {e.message} at {'.'.join(map(str, e.absolute_path))}")


def test_the_pod_is_the_units_daemon_on_the_host_network() -> None:
    pod = _objects()["DaemonSet"]["spec"]["template"]["spec"]
    c = _container()
    assert pod["hostNetwork"] is True
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": [n.upper() for n in _unit_capabilities()]}
    assert (sc["privileged"], sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"]) == (False, False, True)
    env = {e["name"]: e for e in c["env"]}
    assert c["command"][-2:] == ["--node-ip", "$(NODE_IP)"]
    assert env["NODE_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["run"] == volumes["run"]["hostPath"]["path"] == "/run/ipipfast"  # `ipipfast show` on the node
    assert volumes["config"]["configMap"]["name"] == _objects()["ConfigMap"]["metadata"]["name"]
    config_path = c["command"][c["command"].index("--config") + 1]
    assert Path(config_path).parent == Path(mounts["config"]) and Path(config_path).name in _objects()["ConfigMap"]["data"]


def test_the_configmap_is_a_config_for_any_node() -> None:
    [text] = _objects()["ConfigMap"]["data"].values()
    config = parse_config(text, "node.yaml", node_ip="198.18.0.10")
    assert (config.tunnel.name, len(config.routes), config.kernel.learn) == ("tunl0", 0, True)
    assert config.node.interface is None and not config.node.prefixlen_given


def _command(config: Path, node_ip: str) -> list[str]:
    """The container's command as the kubelet runs it, here: $(NODE_IP)
    expanded, the config at `config`, ipipfast from this interpreter."""
    c = _container()
    argv = [node_ip if a == "$(NODE_IP)" else a for a in c["command"]]
    argv[argv.index("--config") + 1] = str(config)
    assert argv[0] == "ipipfast"
    return [sys.executable, "-m", "ipipfast", *argv[1:]]


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")
def test_the_container_runs_on_a_node(tmp_path: Path) -> None:
    """The container's command on a testbed node, with only its capabilities
    and /proc/sys read-only as a container has it; ready when its probe
    says so; forwarding by the routes BIRD writes into tunl0."""
    [text] = _objects()["ConfigMap"]["data"].values()
    (tmp_path / "node.yaml").write_text(text)
    caps = ",".join("+" + c.lower() for c in _container()["securityContext"]["capabilities"]["add"])
    container = ["sh", "-c", 'mount --bind -o ro /proc/sys /proc/sys && exec "$@"', "sh",
                 "setpriv", f"--inh-caps=-all,{caps}", f"--bounding-set=-all,{caps}", "--no-new-privs"]
    probe = _container()["readinessProbe"]["exec"]["command"]
    assert probe[0] == "ipipfast"
    with Testbed(nodes=2) as tb:
        n0, n1 = tb.nodes
        other = TunnelProcess(tb, n1, tb.node_config(n1))
        pod = NodeProcess(tb, n0, [*container, *_command(tmp_path / "node.yaml", n0.ip)], tmp_path / "pod.log")
        try:
            def ready() -> bool:
                if pod.proc.poll() is not None:
                    raise RuntimeError(f"the container exited {pod.proc.returncode}:\n{pod.log()}")
                return tb.python(n0, "-m", "ipipfast", *probe[1:], check=False).returncode == 0
            wait_until(ready, timeout=20, what="the readiness probe")
            other.wait_ready()
            tunl0 = tb.ipr(n0).link_lookup(ifname="tunl0")[0]
            tb.ipr(n0).route("add", dst=n1.pod_cidr, gateway=n1.ip, oif=tunl0, proto=BIRD, flags=4)  # onlink
            def learned() -> bool:
                shown = tb.python(n0, "-m", "ipipfast", "show", "routes", "--json").stdout
                return [(r["cidr"], r["detail"]) for r in json.loads(shown)["routes"]] == [(n1.pod_cidr, "proto bird")]
            wait_until(learned, what="the BIRD route in the table")
            assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=3, interval=0.01)["received"] == 3
            assert traffic.ping(tb, n1.pods[0], n0.pods[0].ip, count=3, interval=0.01)["received"] == 3
        finally:
            pod.stop()
            other.stop()
        log = pod.log()
        assert pod.proc.returncode == 0, log
        warnings = [ln for ln in log.splitlines() if '"level": "warning"' in ln or '"level": "error"' in ln]
        assert len(warnings) == 1 and "IPv6 stays on tunl0" in warnings[0], log
