"""TUN devices: open or attach one by name, with the offloads the datapath
handles (GSO super-packets it segments, partial checksums it completes)."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFNAMSIZ = 16
VNET_HDR_LEN = 10  # struct virtio_net_hdr: no mergeable buffers

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# TSO6/USO6: IPv6 is not carried, but refusing it would make the kernel
# segment IPv6 in software for nothing; such packets are counted not_ipv4.
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
UDP_OFFLOADS = TUN_F_USO4 | TUN_F_USO6  # since Linux 6.2


@dataclass
class Tun:
    """The open queues of a TUN device; uso: the kernel took the UDP
    offloads too, so UDP GSO packets pass both ways; created: this call
    made the device (it was not there, persistent, from an earlier run)."""
    fds: list[int]
    uso: bool = False
    created: bool = False


def open_tun(name: str, offload: bool = False, queues: int = 1, persist: bool = False) -> Tun:
    """`queues` fds for the TUN device `name` (IFF_TUN|IFF_NO_PI), created if
    absent; with more than one, IFF_MULTI_QUEUE, and the kernel spreads
    flows over them (each flow stays on one queue).

    With offload, every read and write carries a virtio_net_hdr, and the
    kernel hands over TCP (and UDP, where it can) super-packets of up to
    64 KB with checksums left partial, instead of segmenting them itself.

    With persist (TUNSETPERSIST), the device outlives its fds, as tunl0
    outlives any daemon: the routes BIRD or felix wrote into it stay, and a
    restarted daemon attaches to it by name. Without, it disappears with its
    last fd, and so do the kernel routes through it."""
    if not 0 < len(name.encode()) < IFNAMSIZ:
        raise ValueError(f"bad interface name {name!r}")
    flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if offload else 0) | (IFF_MULTI_QUEUE if queues > 1 else 0)
    tun = Tun([], uso=offload, created=not _exists(name))
    try:
        for _ in range(queues):
            fd, uso = _open_queue(name, flags, offload)
            tun.fds.append(fd)
            tun.uso = tun.uso and uso
        if persist:
            fcntl.ioctl(tun.fds[0], TUNSETPERSIST, 1)
    except OSError as e:
        for fd in tun.fds:
            os.close(fd)
        if not tun.created and e.errno in (errno.EINVAL, errno.EBUSY):
            raise OSError(e.errno, f"cannot attach to the existing interface {name!r}: it is not a TUN, or "
                          f"a TUN with other settings (queues: this run asks for {queues}, "
                          f"{'multi-queue' if queues > 1 else 'single-queue'}), or another process holds it; "
                          f"`ipipfast down --config ...` removes ipipfast's device") from None
        raise
    return tun


def _exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
        return True
    except OSError:
        return False


def _open_queue(name: str, flags: int, offload: bool) -> tuple[int, bool]:
    """An fd for one queue, and whether the UDP offloads were taken."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    uso = False
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
        if offload:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS | UDP_OFFLOADS)
                uso = True
            except OSError:
                fcntl.ioctl(fd, TUNSETOFFLOAD, OFFLOADS)
    except OSError:
        os.close(fd)
        raise
    return fd, uso
