"""A real etcd on the testbed's control-plane host, and etcd sources on its
nodes, as real processes.

EtcdServer runs Debian's `etcd` (3.4) in the `{prefix}-cp` namespace, on
198.18.0.2 only, with its data in a private temporary directory; stop() and
start() keep that data, close() removes it. etcdctl() runs `etcdctl` there
(for leases written by hand, compaction, the oracle's reads). With tls=True
it serves https only to clients with a certificate of its own throwaway CA
(made by openssl in that directory), as a production etcd does.

SourceProcess runs `python -m ipipfast_lab.etcd source` in a node's
namespace: an EtcdSource alone (no tunnel), which writes its routes, status
and counters as JSON to a file whenever they change, for tests to wait on.
node_config() is a daemon's config on etcd alone, for TunnelProcess.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ipipfast.config import load_config
from ipipfast.etcd import EtcdSource

from .daemons import NodeProcess, stop_process, wait_until
from .testbed import CONTROL_PLANE_IP, Node, Testbed

CLIENT_PORT, PEER_PORT = 2379, 2380
DEFAULT_PREFIX = "/coreos.com/network"
SNAPSHOT_INTERVAL = 0.05  # seconds between the source process's looks at its state


class EtcdServer:
    """One etcd member on the control-plane host; a context manager (start, close)."""

    def __init__(self, tb: Testbed, tls: bool = False) -> None:
        if tb.control_plane is None:
            raise ValueError("EtcdServer needs Testbed(control_plane=True)")
        self.tb, self.host = tb, tb.control_plane
        self.endpoint = f"{'https' if tls else 'http'}://{CONTROL_PLANE_IP}:{CLIENT_PORT}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-etcd-"))
        self.log_path = self.dir / "etcd.log"
        self.proc: subprocess.Popen | None = None
        # The client's files, as the config's etcd.tls takes them; None without TLS.
        self.client_tls: dict[str, str] | None = None
        self._server_flags: list[str] = []
        self._client_flags: list[str] = []
        if tls:
            try:
                self._make_pki(self.dir / "pki")
            except BaseException:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise

    def _make_pki(self, pki: Path) -> None:
        pki.mkdir()

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=pki, check=True, capture_output=True)

        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=lab-ca")
        # The server's certificate is a client's too: etcd's JSON gateway calls etcd's gRPC
        # with it, and client-cert-auth refuses it without clientAuth ("incompatible key usage").
        for name, ext in (("server", f"subjectAltName=IP:{CONTROL_PLANE_IP}\n"
                                     "extendedKeyUsage=serverAuth,clientAuth"),
                          ("client", "extendedKeyUsage=clientAuth")):
            (pki / f"{name}.ext").write_text(ext + "\n")
            openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=lab-{name}")
            openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                    "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
        self.client_tls = {"ca": str(pki / "ca.pem"), "cert": str(pki / "client.pem"), "key": str(pki / "client.key")}
        self._server_flags = ["--cert-file", str(pki / "server.pem"), "--key-file", str(pki / "server.key"),
                              "--trusted-ca-file", str(pki / "ca.pem"), "--client-cert-auth"]
        self._client_flags = [f"--cacert={pki / 'ca.pem'}", f"--cert={pki / 'client.pem'}",
                              f"--key={pki / 'client.key'}"]

    def __enter__(self) -> EtcdServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 30) -> None:
        """Starts etcd (on the data it has, if any) and waits until it serves."""
        peer = f"http://{CONTROL_PLANE_IP}:{PEER_PORT}"
        argv = ["etcd", "--name", "cp", "--data-dir", str(self.dir / "data"),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"cp={peer}", "--logger", "zap", *self._server_flags]
        with open(self.log_path, "ab") as log:
            self.proc = self.tb.popen(self.host, argv, stdout=log, stderr=subprocess.STDOUT)
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"etcd exited {proc.returncode}:\n{self.log()}")
            return self.etcdctl("endpoint", "health", check=False).returncode == 0
        try:
            wait_until(healthy, timeout, "etcd healthy")
        except TimeoutError as e:
            raise TimeoutError(f"{e}:\n{self.log()}") from None

    def stop(self) -> None:
        """Stops etcd (SIGTERM, then SIGKILL); its data stays for start()."""
        if self.proc is not None:
            stop_process(self.proc)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client_config(self, prefix: str = DEFAULT_PREFIX, ttl: int = 30, endpoints: Sequence[str] = ()) -> dict[str, Any]:
        """A config's etcd section for this server (endpoints: the server's alone by default)."""
        return {"endpoints": list(endpoints or [self.endpoint]), "prefix": prefix, "ttl": ttl, "tls": self.client_tls}

    def etcdctl(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """`etcdctl --endpoints=<ours> <args>` on the control-plane host."""
        return self.tb.run(self.host, ["etcdctl", f"--endpoints={self.endpoint}", "--command-timeout=5s",
                                       *self._client_flags, *args], check=check, timeout=timeout)

    def get(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Key -> {"value" (text), "lease", "mod_revision", ...} under `prefix`, read by etcdctl."""
        out = json.loads(self.etcdctl("get", "--prefix", prefix, "-w", "json").stdout)
        return {_unb64(kv["key"]): {**kv, "key": _unb64(kv["key"]), "value": _unb64(kv.get("value", "")),
                                    "lease": int(kv.get("lease", 0))} for kv in out.get("kvs", [])}

    def revision(self) -> int:
        return int(json.loads(self.etcdctl("get", "/", "-w", "json").stdout)["header"]["revision"])

    def lease_grant(self, ttl: int) -> int:
        out = self.etcdctl("lease", "grant", str(ttl)).stdout  # "lease 694d7a3b5e0d2a0b granted with TTL(30s)"
        return int(out.split()[1], 16)

    def lease(self, lease: int) -> tuple[int, int, list[str]]:
        """(granted TTL, remaining TTL, its keys) as etcdctl reports them; the
        remaining TTL is -1 for a lease etcd does not have."""
        out = json.loads(self.etcdctl("lease", "timetolive", f"{lease:x}", "--keys", "-w", "json").stdout)
        return int(out.get("granted-ttl", 0)), int(out.get("ttl", -1)), [_unb64(k) for k in out.get("keys") or ()]


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def node_config(tb: Testbed, node: Node, server: EtcdServer, prefix: str = DEFAULT_PREFIX, ttl: int = 30,
                pod_cidrs: Sequence[str] | None = None, **tunnel: Any) -> dict[str, Any]:
    """A daemon's config on etcd alone (`routes: []`): the node registers its
    pod CIDR (or pod_cidrs) and routes by the others' leases."""
    config = tb.node_config(node, **tunnel)
    config["routes"] = []
    config["node"]["pod_cidrs"] = [node.pod_cidr] if pod_cidrs is None else list(pod_cidrs)
    config["etcd"] = server.client_config(prefix, ttl)
    return config


class SourceProcess(NodeProcess):
    """An EtcdSource alone in a node's namespace, writing its snapshot to a file."""

    def __init__(self, tb: Testbed, node: Node, server: EtcdServer, pod_cidrs: Sequence[str] = (),
                 prefix: str = DEFAULT_PREFIX, ttl: int = 30, endpoints: Sequence[str] = ()) -> None:
        """endpoints: the config's etcd.endpoints (default: the server's alone)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"{tb.prefix}-n{node.index}-etcd-"))
        self.snapshot_path = self.dir / "snapshot.json"
        config = {
            "node": {"ip": f"{node.ip}/{node.prefixlen}", "interface": node.interface, "pod_cidrs": list(pod_cidrs)},
            "etcd": server.client_config(prefix, ttl, endpoints),
        }
        config_path = self.dir / "node.yaml"
        config_path.write_text(yaml.safe_dump(config))
        super().__init__(tb, node, [sys.executable, "-m", "ipipfast_lab.etcd", "source", "--config",
                                    str(config_path), "--snapshot", str(self.snapshot_path)], self.dir / "source.log")

    def snapshot(self) -> dict[str, Any]:
        """{"routes": {cidr: {"via", "key", "mod_revision"}}, "status": ..., "counters": ...,
        "changes": on_change() calls}; empty until the first write."""
        try:
            return json.loads(self.snapshot_path.read_text())
        except FileNotFoundError:
            return {}

    def wait_for(self, what: str, holds: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        """The first snapshot for which holds(snapshot) is true."""
        def reached() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"source on {self.node.name} exited {self.proc.returncode}:\n{self.log()}")
            snap = self.snapshot()
            return snap if snap and holds(snap) else None
        try:
            return wait_until(reached, timeout, f"{what} on {self.node.name}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last snapshot {json.dumps(self.snapshot(), indent=1)}\n{self.log()}") from None

    def stop(self, timeout: float = 15, sig: int = signal.SIGTERM) -> int:
        """SIGTERM, or SIGKILL as when a node dies; log() keeps the log, the directory goes."""
        returncode = super().stop(timeout, sig)
        shutil.rmtree(self.dir, ignore_errors=True)
        return returncode


# ---- the source process ----------------------------------------------------------------


def _snapshot(source: EtcdSource, changes: int) -> dict[str, Any]:
    return {
        "routes": {str(r.route.cidr): {"via": str(r.route.via), "key": r.key, "mod_revision": r.mod_revision}
                   for r in sorted(source.routes(), key=lambda r: r.route)},
        "status": source.status(),
        "counters": source.counters(),
        "changes": changes,
    }


def run_source(config_path: str, snapshot_path: str) -> int:
    logging.basicConfig(level=logging.DEBUG, format="%(asctime)s %(threadName)s %(levelname)s %(message)s")
    logging.getLogger("urllib3").setLevel(logging.INFO)  # a line per request otherwise
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    source = EtcdSource.from_config(load_config(config_path), on_change=changed)
    source.start()
    out, tmp = Path(snapshot_path), Path(snapshot_path + ".tmp")
    last = ""
    try:
        while not stopping.wait(SNAPSHOT_INTERVAL):
            text = json.dumps(_snapshot(source, changes), sort_keys=True)
            if text != last:
                tmp.write_text(text)
                tmp.replace(out)
                last = text
    finally:
        source.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipipfast_lab.etcd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("source", help="run an etcd source alone, writing its snapshot as it changes")
    p.add_argument("--config", required=True, help="a node config with an etcd section")
    p.add_argument("--snapshot", required=True, help="where to write the JSON snapshot")
    args = parser.parse_args(argv)
    return run_source(args.config, args.snapshot)


if __name__ == "__main__":
    sys.exit(main())
