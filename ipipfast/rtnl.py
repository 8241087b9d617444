"""rtnetlink route, link and neighbour messages, encoded and decoded with
struct, and the sockets that carry them: batched route writes with one ACK
per message, route and neighbour dumps, and a subscription to route and
link changes.

pyroute2 (0.9.7) needs about 575 us to encode one route message (57 s for
100,000 in an IPBatch); these take a few, so the bulk of a table travels in
~64 kB sendmsg()s. pyroute2 keeps everything of low volume (links,
neighbours solicited, tc).
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10        # ACKs of failed messages without the request echoed back
NETLINK_EXT_ACK = 11        # errors carry the kernel's message ("Nexthop device is not up")
NETLINK_GET_STRICT_CHK = 12  # dumps honour the filter in the request (table main only)
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLM_F_ACK_TLVS = 0x200       # on an NLMSG_ERROR: extended-ACK attributes follow
NLMSGERR_ATTR_MSG = 1

RTMGRP_LINK = 0x1
RTMGRP_IPV4_ROUTE = 0x40

RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC = 1, 4, 5, 6, 7
RTA_MULTIPATH, RTA_TABLE, RTA_VIA = 9, 15, 18
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
NDA_DST, NDA_LLADDR = 1, 2
NUD_VALID = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT NOARP
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
RTNH_F_ONLINK = 0x4
RTM_F_CLONED = 0x200
IFF_UP = 0x1

_HDR = struct.Struct("=IHHII")      # nlmsghdr: len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RTNH = struct.Struct("=HBBi")       # rtnexthop: len, flags, hops, ifindex
_ERR = struct.Struct("=i")
_BE32 = struct.Struct("!I")
# Whole messages in one pack: header, rtmsg, then 8-byte attributes (length,
# type, value; addresses through htonl, so that "=I" lays them out in
# network order).
_ROUTE_GW = struct.Struct("=IHHII BBBBBBBBI HHI HHI HHI")            # dst, oif, gateway
_ROUTE_GW_SRC = struct.Struct("=IHHII BBBBBBBBI HHI HHI HHI HHI")    # ... prefsrc
_ROUTE_DEL = struct.Struct("=IHHII BBBBBBBBI HHI")                   # dst (a delete, or a lookup)
_RTMSG_END = _HDR.size + _RTMSG.size
BATCH_BYTES = 64 * 1024
# Lookups per sendmsg(): the kernel queues each answer as a skb of about
# 4 kB (NLMSG_GOODSIZE), and drops answers that overflow the receive buffer.
LOOKUP_BATCH = 64
DUMP_ATTEMPTS = 5  # as felix: a dump the kernel marks interrupted is retried (by the caller)
_DONTWAIT = socket.MSG_DONTWAIT
_htonl = socket.htonl


class RouteMsg(NamedTuple):
    """A route as the kernel reports it (IPv4; addresses as host-order ints)."""
    new: bool            # RTM_NEWROUTE, else RTM_DELROUTE
    dst: int
    dst_len: int
    tos: int
    table: int
    protocol: int
    type: int
    flags: int           # rtm_flags (RTNH_F_ONLINK, RTM_F_CLONED)
    oif: int             # 0 when multipath
    gateway: int         # 0: none
    priority: int        # the metric
    nexthops: tuple[tuple[int, int], ...]  # multipath: (ifindex, gateway) each; else ()
    foreign_gateway: bool  # RTA_VIA: a gateway of another family (RFC 5549)


class LinkMsg(NamedTuple):
    new: bool
    index: int
    flags: int
    mtu: int
    name: str
    mac: bytes = b""     # IFLA_ADDRESS: 6 bytes on Ethernet, none on a TUN


class NeighMsg(NamedTuple):
    """An IPv4 neighbour entry (RTM_NEWNEIGH, or RTM_DELNEIGH)."""
    new: bool
    ip: int              # host-order
    ifindex: int
    mac: bytes | None    # None unless the entry holds a usable one (NUD_VALID)


class RouteOp(NamedTuple):
    """One route write: add (exclusive), replace, or delete ours."""
    op: str              # "add" | "replace" | "delete"
    dst: int
    dst_len: int
    oif: int = 0
    gateway: int = 0
    onlink: bool = False
    prefsrc: int = 0


class NetlinkError(OSError):
    pass


def encode_route(op: RouteOp, seq: int, protocol: int, ack: bool = False) -> bytes:
    """The RTM_NEWROUTE/RTM_DELROUTE message for op."""
    if op.op == "delete":
        # Matches ours only (protocol), wherever it points (no oif, scope wildcard).
        return _ROUTE_DEL.pack(_ROUTE_DEL.size, RTM_DELROUTE, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, 0,
                               socket.AF_INET, op.dst_len, 0, 0, RT_TABLE_MAIN, protocol, RT_SCOPE_NOWHERE, 0, 0,
                               8, RTA_DST, _htonl(op.dst))
    flags = NLM_F_REQUEST | (NLM_F_ACK if ack else 0) | NLM_F_CREATE
    flags |= NLM_F_REPLACE if op.op == "replace" else NLM_F_EXCL
    onlink = RTNH_F_ONLINK if op.onlink else 0
    if op.prefsrc:
        return _ROUTE_GW_SRC.pack(_ROUTE_GW_SRC.size, RTM_NEWROUTE, flags, seq, 0, socket.AF_INET, op.dst_len, 0, 0,
                                  RT_TABLE_MAIN, protocol, RT_SCOPE_UNIVERSE, RTN_UNICAST, onlink,
                                  8, RTA_DST, _htonl(op.dst), 8, RTA_OIF, op.oif, 8, RTA_GATEWAY, _htonl(op.gateway),
                                  8, RTA_PREFSRC, _htonl(op.prefsrc))
    return _ROUTE_GW.pack(_ROUTE_GW.size, RTM_NEWROUTE, flags, seq, 0, socket.AF_INET, op.dst_len, 0, 0,
                          RT_TABLE_MAIN, protocol, RT_SCOPE_UNIVERSE, RTN_UNICAST, onlink,
                          8, RTA_DST, _htonl(op.dst), 8, RTA_OIF, op.oif, 8, RTA_GATEWAY, _htonl(op.gateway))


def _attrs(buf: memoryview | bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, offset of the value, length of the value) of each attribute."""
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & 0x3FFF, start + 4, length - 4  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        start += (length + 3) & ~3


def _be32(buf: memoryview | bytes, off: int, length: int) -> int:
    return _BE32.unpack_from(buf, off)[0] if length >= 4 else 0


def _decode_route(buf: memoryview | bytes, off: int, end: int, new: bool) -> RouteMsg | None:
    family, dst_len, _, tos, table, proto, _, rtype, rflags = _RTMSG.unpack_from(buf, off + _HDR.size)
    if family != socket.AF_INET:
        return None
    dst = oif = gateway = priority = 0
    nexthops: tuple[tuple[int, int], ...] = ()
    via = False
    pos = off + _RTMSG_END
    while pos + 4 <= end:  # the attributes, inline: a dump decodes 100k of these
        length, kind = _RTA.unpack_from(buf, pos)
        if length < 4:
            break
        if length == 8:
            value = _U32.unpack_from(buf, pos + 4)[0]
            if kind == RTA_DST:
                dst = _BE32.unpack_from(buf, pos + 4)[0]
            elif kind == RTA_OIF:
                oif = value
            elif kind == RTA_GATEWAY:
                gateway = _BE32.unpack_from(buf, pos + 4)[0]
            elif kind == RTA_PRIORITY:
                priority = value
            elif kind == RTA_TABLE:
                table = value
        elif kind == RTA_VIA:
            via = True
        elif kind == RTA_MULTIPATH:
            nexthops, via = _nexthops(buf, pos + 4, pos + length, via)
        pos += (length + 3) & ~3
    return RouteMsg(new, dst, dst_len, tos, table, proto, rtype, rflags, oif, gateway, priority, nexthops, via)


def _nexthops(buf: memoryview | bytes, pos: int, stop: int, via: bool) -> tuple[tuple[tuple[int, int], ...], bool]:
    hops = []
    while pos + _RTNH.size <= stop:
        hlen, _, _, ifindex = _RTNH.unpack_from(buf, pos)
        if hlen < _RTNH.size:
            break
        gateway = 0
        for kind, voff, vlen in _attrs(buf, pos + _RTNH.size, pos + hlen):
            if kind == RTA_GATEWAY:
                gateway = _be32(buf, voff, vlen)
            elif kind == RTA_VIA:
                via = True
        hops.append((ifindex, gateway))
        pos += (hlen + 3) & ~3
    return tuple(hops), via


def _decode_link(buf: memoryview | bytes, off: int, end: int, new: bool) -> LinkMsg:
    _, _, index, flags, _ = _IFINFO.unpack_from(buf, off + _HDR.size)
    mtu, name, mac = 0, "", b""
    for kind, voff, vlen in _attrs(buf, off + _HDR.size + _IFINFO.size, end):
        if kind == IFLA_MTU:
            mtu = _U32.unpack_from(buf, voff)[0]
        elif kind == IFLA_IFNAME:
            name = bytes(buf[voff:voff + vlen]).split(b"\0", 1)[0].decode(errors="replace")
        elif kind == IFLA_ADDRESS:
            mac = bytes(buf[voff:voff + vlen])
    return LinkMsg(new, index, flags, mtu, name, mac)


def _decode_neigh(buf: memoryview | bytes, off: int, end: int, new: bool) -> NeighMsg | None:
    family, ifindex, state, _, _ = _NDMSG.unpack_from(buf, off + _HDR.size)
    if family != socket.AF_INET:
        return None
    ip, mac = None, None
    for kind, voff, vlen in _attrs(buf, off + _HDR.size + _NDMSG.size, end):
        if kind == NDA_DST and vlen == 4:
            ip = _BE32.unpack_from(buf, voff)[0]
        elif kind == NDA_LLADDR and vlen:
            mac = bytes(buf[voff:voff + vlen])
    if ip is None:
        return None
    return NeighMsg(new, ip, ifindex, mac if new and state & NUD_VALID else None)


def decode(buf: memoryview | bytes, end: int | None = None) -> Iterator[RouteMsg | LinkMsg | NeighMsg]:
    """The IPv4 route, link and IPv4 neighbour messages in buf (other types
    are skipped)."""
    off, end = 0, len(buf) if end is None else end
    while off + _HDR.size <= end:
        length, kind, _, _, _ = _HDR.unpack_from(buf, off)
        if length < _HDR.size or off + length > end:
            return
        if kind in (RTM_NEWROUTE, RTM_DELROUTE):
            msg = _decode_route(buf, off, off + length, kind == RTM_NEWROUTE)
            if msg is not None:
                yield msg
        elif kind in (RTM_NEWLINK, RTM_DELLINK):
            yield _decode_link(buf, off, off + length, kind == RTM_NEWLINK)
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            neigh = _decode_neigh(buf, off, off + length, kind == RTM_NEWNEIGH)
            if neigh is not None:
                yield neigh
        off += (length + 3) & ~3


def link(name: str) -> LinkMsg | None:
    """The link named name (its index, flags, MTU and MAC), or None: one
    RTM_GETLINK by name. pyroute2's link_lookup and get kept about 3 kB a
    call for the socket's life; the daemon asks for the underlay every second."""
    encoded = name.encode() + b"\0"
    attr = _RTA.pack(_RTA.size + len(encoded), IFLA_IFNAME) + encoded
    attr += b"\0" * (-len(attr) % 4)
    with _socket(1 << 16) as s:
        s.sendall(_HDR.pack(_HDR.size + _IFINFO.size + len(attr), RTM_GETLINK, NLM_F_REQUEST, 1, 0)
                  + _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + attr)
        buf = s.recv(1 << 16)
    length, kind, _, _, _ = _HDR.unpack_from(buf, 0)
    if kind == NLMSG_ERROR:
        code = -_ERR.unpack_from(buf, _HDR.size)[0]
        if code == errno.ENODEV:
            return None
        raise NetlinkError(code, f"link {name}: {os.strerror(code)}")
    return _decode_link(buf, 0, length, True)


def neighbours(ifindex: int) -> dict[int, bytes]:
    """The usable MAC of every IPv4 neighbour on ifindex, from one dump of
    the neighbour table: every next hop's at once."""
    with _socket(1 << 20) as s:
        s.sendall(_HDR.pack(_HDR.size + _NDMSG.size, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
                  + _NDMSG.pack(socket.AF_INET, ifindex, 0, 0, 0))
        found: dict[int, bytes] = {}
        buf = bytearray(1 << 16)
        while True:
            n = s.recv_into(buf)
            off = 0
            while off + _HDR.size <= n:
                length, kind, _, _, _ = _HDR.unpack_from(buf, off)
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    code = -_ERR.unpack_from(buf, off + _HDR.size)[0]
                    raise NetlinkError(code, f"neighbour dump: {os.strerror(code)}")
                if length < _HDR.size:
                    break
                if kind == RTM_NEWNEIGH:
                    neigh = _decode_neigh(buf, off, off + length, True)
                    if neigh is not None and neigh.mac and neigh.ifindex == ifindex:
                        found[neigh.ip] = neigh.mac
                off += (length + 3) & ~3


def _ext_ack_message(buf: memoryview | bytes, off: int, end: int, flags: int) -> str:
    if not flags & NLM_F_ACK_TLVS:
        return ""
    # nlmsgerr: error, then the request's header (alone, with NETLINK_CAP_ACK), then TLVs.
    for kind, voff, vlen in _attrs(buf, off + _HDR.size + 4 + _HDR.size, end):
        if kind == NLMSGERR_ATTR_MSG:
            return bytes(buf[voff:voff + vlen]).split(b"\0", 1)[0].decode(errors="replace")
    return ""


def _socket(rcvbuf: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)  # root may exceed rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    return sock


class RouteSocket:
    """Route writes and dumps (IPv4, table main) on one netlink socket; not
    thread-safe: one thread (the daemon's main thread) uses it."""

    def __init__(self, protocol: int) -> None:
        self.protocol = protocol  # the rtm_protocol our routes carry
        self.sock = _socket(1 << 20)
        self.sock.bind((0, 0))
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK, NETLINK_GET_STRICT_CHK):
            self.sock.setsockopt(SOL_NETLINK, opt, 1)
        self.port: int = self.sock.getsockname()[0]  # our nlmsg_pid, which notifications we cause carry
        self.seq = 0
        self.writes = 0    # route messages sent
        self.batches = 0   # sendmsg() calls carrying them
        self._buf = bytearray(1 << 16)

    def close(self) -> None:
        self.sock.close()

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF or 1
        return self.seq

    def write(self, ops: Iterable[RouteOp]) -> list[tuple[RouteOp, int, str]]:
        """Sends ops in batches of up to BATCH_BYTES; returns those the
        kernel refused as (op, errno, the kernel's message).

        Only a batch's last message asks for an ACK: the kernel answers a
        failed message anyway, and handles a sendmsg()'s messages in order,
        so that ACK means the whole batch is done. (An ACK for each would
        be one recvmsg() each: 0.7 s per 100k routes here.)"""
        failed: list[tuple[RouteOp, int, str]] = []
        batch: list[bytes] = []
        pending: dict[int, RouteOp] = {}
        size = 0
        for op in ops:
            seq = self._next_seq()
            msg = encode_route(op, seq, self.protocol)
            if size + len(msg) > BATCH_BYTES:
                self._send(batch, pending, seq - 1, failed)
                batch, pending, size = [], {}, 0
            batch.append(msg)
            pending[seq] = op
            size += len(msg)
        if batch:
            self._send(batch, pending, self.seq, failed)
        return failed

    def _send(self, batch: list[bytes], pending: dict[int, RouteOp], last: int,
              failed: list[tuple[RouteOp, int, str]]) -> None:
        batch[-1] = encode_route(pending[last], last, self.protocol, ack=True)
        self.sock.sendall(b"".join(batch))
        self.writes += len(batch)
        self.batches += 1
        for view, off, length, kind, flags, seq in self._replies():
            if kind == NLMSG_ERROR and seq in pending:
                code = -_ERR.unpack_from(view, off + _HDR.size)[0]
                op = pending.pop(seq)
                if code:
                    failed.append((op, code, _ext_ack_message(view, off, off + length, flags)))
                if seq == last:
                    return

    def _replies(self) -> Iterator[tuple[memoryview, int, int, int, int, int]]:
        """(buffer, offset, length, type, flags, seq) of each message the
        socket receives, for as long as the caller reads on."""
        while True:
            n = self.sock.recv_into(self._buf)
            view = memoryview(self._buf)
            off = 0
            while off + _HDR.size <= n:
                length, kind, flags, seq, _ = _HDR.unpack_from(view, off)
                if length < _HDR.size:
                    break
                yield view, off, length, kind, flags, seq
                off += (length + 3) & ~3

    def lookup(self, addresses: Iterable[int]) -> dict[int, RouteMsg | int]:
        """The route the kernel takes to each address, as `ip route get`
        answers (RTM_GETROUTE: its oif and gateway), or the errno it
        answered instead (ENETUNREACH: no route; EINVAL: a blackhole)."""
        out: dict[int, RouteMsg | int] = {}
        todo = list(dict.fromkeys(addresses))
        for start in range(0, len(todo), LOOKUP_BATCH):
            pending: dict[int, int] = {}
            for addr in todo[start:start + LOOKUP_BATCH]:
                pending[self._next_seq()] = addr
            self.sock.sendall(b"".join(
                _ROUTE_DEL.pack(_ROUTE_DEL.size, RTM_GETROUTE, NLM_F_REQUEST, seq, 0, socket.AF_INET, 32, 0, 0,
                                0, 0, 0, 0, 0, 8, RTA_DST, _htonl(addr)) for seq, addr in pending.items()))
            for view, off, length, kind, _, seq in self._replies():
                addr = pending.pop(seq, None)
                if addr is None:
                    continue
                if kind == NLMSG_ERROR:
                    out[addr] = -_ERR.unpack_from(view, off + _HDR.size)[0]
                elif kind == RTM_NEWROUTE:
                    out[addr] = _decode_route(view, off, off + length, True) or errno.EAFNOSUPPORT
                if not pending:
                    break
        return out

    def dump(self, consume: Callable[[RouteMsg], None]) -> bool:
        """Hands every IPv4 route of table main to consume, as they are
        decoded (a list of 100k would take ~20 MB); True when the kernel
        marked the dump interrupted by a change (felix retries then)."""
        seq = self._next_seq()
        req = _HDR.pack(_HDR.size + _RTMSG.size + 8, RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
        req += _RTMSG.pack(socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, 0, 0, 0, 0) + _RTA.pack(8, RTA_TABLE)
        req += _U32.pack(RT_TABLE_MAIN)
        self.sock.sendall(req)
        interrupted = False
        for view, off, length, kind, flags, mseq in self._replies():
            if mseq != seq:
                continue
            if flags & NLM_F_DUMP_INTR:
                interrupted = True
            if kind == NLMSG_DONE:
                return interrupted
            if kind == NLMSG_ERROR:
                code = -_ERR.unpack_from(view, off + _HDR.size)[0]
                raise NetlinkError(code, f"route dump: {os.strerror(code)}")
            if kind == RTM_NEWROUTE:
                msg = _decode_route(view, off, off + length, True)
                if msg is not None:
                    consume(msg)
        raise AssertionError("unreachable")


def _drop_from_filter(port: int) -> bytes:
    """Classic BPF for a subscription: drop the notifications a request from
    netlink port `port` caused (they carry its nlmsg_pid); keep the rest.
    Each notification is one message, so its first header says it all."""
    pid = int.from_bytes(port.to_bytes(4, sys.byteorder), "big")  # the host-order field, as BPF loads it
    ldw, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
    prog = [(ldw, 0, 0, 12), (jeq, 0, 1, pid), (ret, 0, 0, 0), (ret, 0, 0, 0xFFFFFFFF)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


class Subscription:
    """Route (IPv4) and link notifications. recv() raises ENOBUFS once the
    kernel had to drop some: then only a full dump tells the truth."""

    def __init__(self, ignore_port: int, rcvbuf: int = 8 << 20) -> None:
        """ignore_port: the netlink port of our route writer, whose changes we know."""
        self.sock = _socket(rcvbuf)
        program = _drop_from_filter(ignore_port)
        self._filter = ctypes.create_string_buffer(program, len(program))
        prog = struct.pack("HP", len(program) // 8, ctypes.addressof(self._filter))  # struct sock_fprog, native
        self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, prog)
        self.sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_ROUTE))
        self._buf = bytearray(1 << 16)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def receive(self) -> list[RouteMsg | LinkMsg]:
        """Everything queued now, without blocking (empty when nothing is).
        Raises ENOBUFS when the kernel dropped notifications: what was read
        with it came before the loss, so it is dropped too (see drain)."""
        out: list[RouteMsg | LinkMsg] = []
        while True:
            try:
                n = self.sock.recv_into(self._buf, 0, _DONTWAIT)
            except BlockingIOError:
                return out
            out.extend(decode(memoryview(self._buf), n))

    def drain(self) -> None:
        """Discards everything queued. After an ENOBUFS the queue still holds
        notifications from before the loss, which must not be replayed over a
        newer dump: drain, then dump, then take what arrives after."""
        while True:
            try:
                self.sock.recv_into(self._buf, 0, _DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
