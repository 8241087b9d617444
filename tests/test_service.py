"""ipipfast as a service: systemd's notify protocol (a real AF_UNIX datagram
socket on the receiving side, as systemd binds it), the ready file, JSON
logs, the unit file as systemd-analyze sees it, and the daemon running with
exactly the unit's capabilities as an unprivileged user."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from ipipfast import service
from ipipfast.logs import JsonFormatter, Limited
from ipipfast_lab import traffic
from ipipfast_lab.daemons import TunnelProcess
from ipipfast_lab.testbed import Testbed

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "ipipfast.service"
root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces, TUN and AF_PACKET")


def _receiver(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    return s


def _messages(sock: socket.socket, until: str, timeout: float = 15) -> list[str]:
    """Datagrams until one holds the line `until`."""
    got: list[str] = []
    sock.settimeout(timeout)
    while True:
        got.append(sock.recv(4096).decode())
        if until in got[-1].splitlines():
            return got


def test_notify_speaks_the_protocol(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert service.notify("READY=1") is False  # no manager: nothing to tell
    with _receiver(tmp_path / "notify") as s:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert service.notify("READY=1", "STATUS=up") is True
        assert s.recv(100) == b"READY=1\nSTATUS=up"
    name = f"ipipfast-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)  # the abstract namespace, as systemd's "@" addresses
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert service.notify("WATCHDOG=1") and s.recv(100) == b"WATCHDOG=1"
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    assert service.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # another process's watchdog
    assert service.watchdog_interval() is None


def test_limited_events_say_what_they_held_back(caplog: pytest.LogCaptureFixture) -> None:
    events = Limited(logging.getLogger("t"), interval=0.2)
    with caplog.at_level(logging.INFO, logger="t"):
        logged = [events.log(logging.INFO, "unknown", "IPIP from %s", "198.18.9.9") for _ in range(100)]
        assert logged.count(True) == 1 and logged[0]
        assert events.log(logging.INFO, "other", "another kind")  # kinds are limited apart
        time.sleep(0.25)
        assert events.log(logging.INFO, "unknown", "IPIP from %s", "198.18.9.9")
    assert caplog.messages[-1] == "IPIP from 198.18.9.9 (99 more like it suppressed since the last one logged)"


def test_json_log_lines() -> None:
    record = logging.LogRecord("ipipfast.daemon", logging.WARNING, __file__, 1, "peer %s", ("198.18.0.11",), None)
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("warning", "ipipfast.daemon", "peer 198.18.0.11")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}", line["time"])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian systemd)")
def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    exe = shutil.which("ipipfast")
    assert exe, "the ipipfast command is not installed"
    unit = tmp_path / "ipipfast.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ipipfast", exe))  # where pip put it here
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def _unit_capabilities() -> list[str]:
    [line] = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("CapabilityBoundingSet=")]
    return [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]


@root
@pytest.mark.netns
def test_under_a_service_manager(tmp_path: Path) -> None:
    """READY=1 once it forwards, keep-alives while its loops run, RELOADING
    and READY again on SIGHUP, STOPPING=1 and the ready file gone at exit;
    every log line a JSON object."""
    with Testbed(nodes=2) as tb, _receiver(tmp_path / "notify") as notify:
        n0, n1 = tb.nodes
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}
        ready = tmp_path / "ready"
        other = TunnelProcess(tb, n1, tb.node_config(n1))
        t = TunnelProcess(tb, n0, tb.node_config(n0), env=env, args=["--ready-file", str(ready)])
        try:
            got = _messages(notify, "READY=1")
            assert ready.read_text().strip() == str(t.proc.pid)
            status = [ln for m in got for ln in m.splitlines() if ln.startswith("STATUS=")]
            assert status == ["STATUS=Always: 1 routes encapsulated, 0 direct"], got
            other.wait_ready()
            assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=3, interval=0.01)["received"] == 3
            assert _messages(notify, "WATCHDOG=1", timeout=2)
            t.proc.send_signal(signal.SIGHUP)
            assert _messages(notify, "RELOADING=1")
            assert _messages(notify, "READY=1")
            t.proc.send_signal(signal.SIGTERM)
            assert _messages(notify, "STOPPING=1")
            assert t.proc.wait(10) == 0 and not ready.exists()
        finally:
            t.stop()
            other.stop()


@root
@pytest.mark.netns
def test_the_units_capabilities_are_enough() -> None:
    """The daemon with only the unit's capabilities (setpriv's bounding set;
    no-new-privs) comes up, loads its tc drops and forwards, JSON logs
    throughout. The uid stays 0: here /dev/net/tun is 0600 and the
    interpreter lives under /root (0700); the unit's DynamicUser relies on
    the 0666 /dev/net/tun that distributions' udev rules make."""
    caps = ",".join("+" + c for c in _unit_capabilities())
    setpriv = ["setpriv", f"--inh-caps=-all,{caps}", f"--bounding-set=-all,{caps}", "--no-new-privs"]
    with Testbed(nodes=2) as tb:
        n0, n1 = tb.nodes
        t = TunnelProcess(tb, n0, tb.node_config(n0), wrapper=setpriv, log_format="json")
        other = TunnelProcess(tb, n1, tb.node_config(n1))
        try:
            t.wait_ready()
            other.wait_ready()
            effective = int(Path(f"/proc/{t.proc.pid}/status").read_text().split("CapEff:")[1].split()[0], 16)
            assert effective == sum(1 << n for n in (12, 13, 39))  # CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF
            assert traffic.ping(tb, n0.pods[0], n1.pods[0].ip, count=3, interval=0.01)["received"] == 3
            assert traffic.ping(tb, n1.pods[0], n0.pods[0].ip, count=3, interval=0.01)["received"] == 3
        finally:
            t.stop()
            other.stop()
        lines = [json.loads(ln) for ln in t.log().splitlines()]
        assert not [ln for ln in lines if ln["level"] in ("warning", "error")], lines
        assert any(ln["message"].startswith("ready: ") for ln in lines)
