"""Running as a service: systemd's notify protocol (sd_notify(3): READY,
RELOADING, STOPPING, STATUS and WATCHDOG datagrams to $NOTIFY_SOCKET), and
a ready file for supervisors without systemd. The protocol is a few lines;
no library is needed for it."""
from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def notify(*states: str) -> bool:
    """Sends "KEY=value" lines to the service manager; False when there is
    none (no $NOTIFY_SOCKET) or it did not take them."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(states).encode(), address)
        return True
    except OSError as e:
        log.debug("sd_notify %s: %s", states, e)
        return False


def watchdog_interval() -> float | None:
    """Seconds between keep-alives the manager asks for (half its
    WatchdogSec), or None when it asks for none or asks another process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Service:
    """The daemon's side of the service manager: ready once, reloading and
    ready again, stopping, and keep-alives only while `healthy()` says the
    packet loops run."""

    def __init__(self, healthy: Callable[[], bool], ready_file: str | None = None) -> None:
        self.healthy = healthy
        self.ready_file = Path(ready_file) if ready_file else None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def ready(self, status: str) -> None:
        if self.ready_file:
            tmp = self.ready_file.with_name(self.ready_file.name + ".tmp")
            tmp.write_text(f"{os.getpid()}\n")
            tmp.replace(self.ready_file)
        notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")
        interval = watchdog_interval()
        if interval and self._watchdog is None:
            self._watchdog = threading.Thread(target=self._keep_alive, args=(interval,),
                                              name="ipipfast-watchdog", daemon=True)
            self._watchdog.start()

    def reloading(self) -> None:
        notify("RELOADING=1")

    def reloaded(self, status: str) -> None:
        notify("READY=1", f"STATUS={status}")

    def stopping(self) -> None:
        self._stop.set()
        notify("STOPPING=1")
        if self.ready_file:
            self.ready_file.unlink(missing_ok=True)
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None

    def _keep_alive(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self.healthy():
                notify("WATCHDOG=1")
            else:  # the manager's timeout then restarts us, as it should
                log.error("a packet loop is not running: no watchdog keep-alive")
