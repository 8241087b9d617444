"""TUN devices: open or attach one by name (offloads and queues grow here)."""
from __future__ import annotations

import fcntl
import os
import struct

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFNAMSIZ = 16


def open_tun(name: str) -> int:
    """An fd for the TUN device `name` (IFF_TUN|IFF_NO_PI), created if absent.

    The device is not persistent: it disappears with its last fd, and so do
    the kernel routes through it, so a crashed daemon leaves nothing behind
    (the testbed's blackhole routes then catch the traffic)."""
    if not 0 < len(name.encode()) < IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd
