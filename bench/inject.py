"""The injector of bench.fuzz: random and mutated frames through an AF_PACKET
socket onto a node's underlay interface, in the namespace of the peer whose
frames they mutate, each counted as the receiving ring will see it.

    python -m bench.inject --iface IF --frames N --seed S --src-mac M --dst-mac M \\
        --src IP --dst IP --src-pod IP --dst-pod IP [--third IP]

Bases: valid IPIP frames from the peer (src) to the node (dst), inner ICMP
echo replies, UDP datagrams and TCP segments between their pods, of sizes
up to the MTU. Each frame is one of them with one to three mutations (bit
flips, bytes overwritten, truncation, garbage appended, every length field
and header length at its edges, outer and inner options, flags and fragment
offsets, fragments of the outer packet (whole sets, or one piece missing),
wrong header and L4 checksums, inner garbage, inner IPIP and inner packets
to node addresses, ECN, addresses, MACs, VLAN tags), the checksums repaired
after most of them so that deeper checks are reached; or random bytes, bare
or behind a valid outer header.

What it counts (one JSON line on stdout at the end): frames generated; those
the socket accepted (send() succeeded; a frame the device refuses or the
receiver's backlog drops fails with ENOBUFS, and too short or too long ones
with EINVAL or EMSGSIZE, by errno in refused); of the accepted, those the
receiving ring's socket filter admits (IPv4 protocol 4 to dst, read as the
kernel reads the frame: a VLAN tag taken off first), and those that the
kernel's defragmentation takes instead (PACKET_FANOUT_FLAG_DEFRAG: an IPv4
fragment goes to reassembly before the filter, and only a completed packet
comes out), which bound what reassembly can add. The frames carry the
datapath's mark (tc_drops.MARK), past the sending node's tc egress drop.
"""
from __future__ import annotations

import argparse
import errno
import itertools
import json
import random
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from ipipfast import tc_drops

ETH, MTU = 14, 1500
CHUNK = 20_000  # frames made before they are sent
VLAN_TYPES = (b"\x81\x00", b"\x88\xa8")


def checksum(data: bytes | bytearray) -> int:
    """RFC 1071 over data, to write into a header whose checksum is zero."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def fix_ip(b: bytearray, at: int) -> None:
    """Rewrites the header checksum of the IPv4 header at offset at, as far as the frame holds it."""
    ihl = (b[at] & 0x0F) * 4
    if ihl < 20 or at + ihl > len(b):
        return
    b[at + 10:at + 12] = b"\0\0"
    b[at + 10:at + 12] = checksum(b[at:at + ihl]).to_bytes(2, "big")


def inner_at(b: bytearray) -> int:
    return ETH + (b[ETH] & 0x0F) * 4


def headers(b: bytearray) -> bool:
    """Whether b still holds both IPv4 headers, as long as the outer says."""
    return len(b) >= ETH + 20 and len(b) >= inner_at(b) + 20


def view(frame: bytes) -> bytes | None:
    """The frame as the receiving node's taps see it: one VLAN tag taken off
    (skb_vlan_untag, which frees a tagged frame too short to hold one)."""
    if frame[12:14] in VLAN_TYPES:
        return frame[:12] + frame[16:] if len(frame) >= ETH + 6 else None
    return frame


def defragmented(f: bytes) -> bool:
    """Whether the kernel's defragmentation takes the frame (ip_check_defrag)."""
    if len(f) < ETH + 20 or f[12:14] != b"\x08\x00" or f[ETH] >> 4 != 4 or f[ETH] & 0x0F < 5:
        return False
    tot = int.from_bytes(f[ETH + 2:ETH + 4], "big")
    if len(f) - ETH < tot or tot < (f[ETH] & 0x0F) * 4:
        return False
    return bool(f[ETH + 6] & 0x3F or f[ETH + 7])


def admitted(f: bytes, dst: bytes) -> bool:
    """Whether the receive ring's socket filter takes the frame (sockets.pyx: open_rx)."""
    return len(f) >= 34 and f[12:14] == b"\x08\x00" and f[23] == 4 and f[30:34] == dst


ADMITTED, DEFRAGMENTED = 1, 2


def fate(frame: bytes, dst: bytes) -> int:
    """ADMITTED (the ring gets it), DEFRAGMENTED (reassembly gets it), or 0."""
    seen = view(frame) if len(frame) >= ETH else None
    if seen is None:
        return 0
    if defragmented(seen):
        return DEFRAGMENTED
    return ADMITTED if admitted(seen, dst) else 0


class Mutator:
    """Frames, from valid IPIP bases and a seeded generator."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.rng = random.Random(args.seed)
        self.macs = (args.src_mac, args.dst_mac)
        self.nodes = [socket.inet_aton(a) for a in (args.dst, args.src, *([args.third] if args.third else []))]
        self.ip_id = 0
        ether = Ether(src=args.src_mac, dst=args.dst_mac)
        outer = IP(src=args.src, dst=args.dst, proto=4, ttl=64)
        inners = []
        for size in (28, 64, 200, 576, 1000, 1480):
            pad = Raw(bytes(range(256)) * 6)
            inners += [IP(src=args.src_pod, dst=args.dst_pod, flags="DF") / ICMP(type=0, id=7, seq=size)
                       / Raw(raw(pad)[:size - 28]),
                       IP(src=args.src_pod, dst=args.dst_pod) / UDP(sport=5000 + size, dport=9)
                       / Raw(raw(pad)[:size - 28])]
            if size >= 52:
                inners.append(IP(src=args.src_pod, dst=args.dst_pod, flags="DF")
                              / TCP(sport=6000, dport=9, seq=size, flags="A", options=[("NOP", None)] * 4)
                              / Raw(raw(pad)[:size - 56]))
        self.bases = [raw(ether / outer / i) for i in inners]
        self.mutations: list[Callable[[bytearray], None]] = [
            self.bit_flips, self.overwrite, self.truncate, self.append, self.lengths, self.header_lengths,
            self.options, self.flags, self.bad_checksum, self.inner_garbage, self.inner_targets, self.ecn,
            self.addresses, self.macs_and_tags]
        self.bytewise = {self.bit_flips, self.overwrite, self.truncate, self.append}

    def frames(self, n: int) -> Iterator[tuple[str, bytes]]:
        """n frames, as (kind, frame)."""
        rng = self.rng
        made = 0
        while made < n:
            r = rng.random()
            if r < 0.05:
                out = [("random", rng.randbytes(rng.randrange(1, MTU + ETH + 1)))]
            elif r < 0.10:
                b = bytearray(rng.choice(self.bases))
                head = inner_at(b)
                b[head:] = rng.randbytes(rng.randrange(0, MTU + ETH - head + 1))
                self.set_len(b, ETH, len(b) - ETH)
                out = [("random inner", bytes(b))]
            elif r < 0.15:
                out = [("fragments", f) for f in self.fragments(bytearray(rng.choice(self.bases)))]
            else:
                b = bytearray(rng.choice(self.bases))
                kinds = rng.sample(self.mutations, rng.choice((1, 1, 1, 2, 3)))
                for mutate in kinds:
                    # After a truncation or a new header length, the mutations
                    # of header fields have nothing left to work on.
                    if mutate in self.bytewise or headers(b):
                        mutate(b)
                out = [("+".join(m.__name__ for m in kinds), bytes(b))]
            for kind_frame in out[:n - made]:
                yield kind_frame
                made += 1

    # -- helpers ------------------------------------------------------------

    def maybe_fix(self, b: bytearray, p: float = 0.8) -> None:
        """Repairs both header checksums, most of the time."""
        if self.rng.random() < p and headers(b):
            fix_ip(b, ETH)
            fix_ip(b, inner_at(b))

    def set_len(self, b: bytearray, at: int, value: int) -> None:
        if at + 4 <= len(b):
            b[at + 2:at + 4] = (value & 0xFFFF).to_bytes(2, "big")
            fix_ip(b, at)

    def edge(self, right: int) -> int:
        """A value at or around an edge of a length field whose right value is right."""
        return self.rng.choice((0, 1, 19, 20, 21, right - 1, right, right + 1, right + 20, 0xFFFF,
                                self.rng.randrange(0x10000))) & 0xFFFF

    def layer(self, b: bytearray) -> int:
        """The outer or the inner header's offset, at random."""
        return ETH if self.rng.random() < 0.5 else inner_at(b)

    # -- mutations ----------------------------------------------------------

    def bit_flips(self, b: bytearray) -> None:
        for _ in range(self.rng.randint(1, 8)):
            i = self.rng.randrange(len(b) * 8)
            b[i >> 3] ^= 1 << (i & 7)

    def overwrite(self, b: bytearray) -> None:
        for _ in range(self.rng.randint(1, 4)):
            b[self.rng.randrange(len(b))] = self.rng.randrange(256)
        if headers(b):
            self.maybe_fix(b, 0.5)

    def truncate(self, b: bytearray) -> None:
        if len(b) > 1:
            del b[self.rng.randrange(1, len(b)):]

    def append(self, b: bytearray) -> None:
        b += self.rng.randbytes(self.rng.randrange(1, max(2, MTU + ETH - len(b))))

    def lengths(self, b: bytearray) -> None:
        at = self.layer(b)
        b[at + 2:at + 4] = self.edge(int.from_bytes(b[at + 2:at + 4], "big")).to_bytes(2, "big")
        self.maybe_fix(b)

    def header_lengths(self, b: bytearray) -> None:
        at = self.layer(b)
        b[at] = 0x40 | self.rng.randrange(16)
        self.maybe_fix(b)

    def options(self, b: bytearray) -> None:
        at = self.layer(b)
        words = self.rng.randint(1, 10)
        kind = self.rng.random()
        if kind < 0.4:  # well formed: NOPs and an end
            opts = b"\x01" * (words * 4 - 1) + b"\x00"
        elif kind < 0.7:  # a record route, its pointer anywhere
            opts = bytes([7, words * 4 - 1, self.rng.randrange(256)]) + bytes(words * 4 - 3)
        else:
            opts = self.rng.randbytes(words * 4)
        ihl = (b[at] & 0x0F) * 4
        b[at + ihl:at + ihl] = opts
        b[at] = 0x40 | min(15, ihl // 4 + words)
        if at == ETH:
            self.set_len(b, ETH, len(b) - ETH)
        else:
            self.set_len(b, at, int.from_bytes(b[at + 2:at + 4], "big") + len(opts))
            self.set_len(b, ETH, len(b) - ETH)
        self.maybe_fix(b, 0.9)

    def flags(self, b: bytearray) -> None:
        at = self.layer(b)
        b[at + 6:at + 8] = self.rng.choice((0x2000, 0x4000, 0x6000, 0x8000, 1, 0x1FFF, 0x2001,
                                            self.rng.randrange(0x10000))).to_bytes(2, "big")
        self.maybe_fix(b)

    def bad_checksum(self, b: bytearray) -> None:
        r = self.rng.random()
        if r < 0.66:
            at = ETH if r < 0.33 else inner_at(b)
            if at + 12 <= len(b):
                b[at + 10:at + 12] = ((int.from_bytes(b[at + 10:at + 12], "big") + self.rng.randrange(1, 0x10000))
                                      & 0xFFFF).to_bytes(2, "big")
        else:  # the L4 checksum: ICMP at +2, UDP at +6, TCP at +16 of the transport header
            at = inner_at(b)
            l4 = at + (b[at] & 0x0F) * 4 + {1: 2, 17: 6, 6: 16}.get(b[at + 9], 2)
            if l4 + 2 <= len(b):
                b[l4] ^= 1 + self.rng.randrange(255)

    def inner_garbage(self, b: bytearray) -> None:
        at = inner_at(b)
        n = self.rng.randrange(1, len(b) - at + 1)
        b[at:at + n] = self.rng.randbytes(n)

    def inner_targets(self, b: bytearray) -> None:
        at = inner_at(b)
        r = self.rng.random()
        if r < 0.3:  # IPIP in IPIP
            b[at + 9] = 4
        elif r < 0.7:  # to a node's underlay address
            b[at + 16:at + 20] = self.rng.choice(self.nodes)
        else:  # from and to anywhere
            b[at + 12:at + 20] = self.rng.randbytes(8)
        fix_ip(b, at)

    def ecn(self, b: bytearray) -> None:
        for at in (ETH, inner_at(b)):
            b[at + 1] = (b[at + 1] & ~3) | self.rng.randrange(4)
        self.maybe_fix(b, 0.95)

    def addresses(self, b: bytearray) -> None:
        at = ETH + 12 if self.rng.random() < 0.7 else ETH + 16  # the source mostly: the destination fails the filter
        b[at:at + 4] = self.rng.choice([*self.nodes, self.rng.randbytes(4)])
        self.maybe_fix(b, 0.95)

    def macs_and_tags(self, b: bytearray) -> None:
        r = self.rng.random()
        if r < 0.25:  # to another host, a broadcast or a multicast
            b[0:6] = self.rng.choice((b"\x02\x00\x5e\x00\x53\x01", b"\xff" * 6, b"\x01\x00\x5e\x00\x00\x01"))
        elif r < 0.5:  # from another MAC than the peer's
            b[6:12] = self.rng.randbytes(6)
        else:  # a VLAN tag: 0 (priority), the node's none, or any
            vid = self.rng.choice((0, 5, self.rng.randrange(4096)))
            b[12:12] = b"\x81\x00" + ((self.rng.randrange(8) << 13) | vid).to_bytes(2, "big")

    def fragments(self, b: bytearray) -> list[bytes]:
        """The outer packet in 2-4 fragments with an ID of its own: all of
        them in order or shuffled, or one missing, or one duplicated."""
        self.ip_id = (self.ip_id + 1) & 0xFFFF
        head, payload = bytes(b[:ETH + 20]), bytes(b[ETH + 20:])
        k = self.rng.randint(2, 4)
        step = max(8, (len(payload) // k + 7) & ~7)
        frags = []
        for off in range(0, len(payload), step):
            f = bytearray(head) + payload[off:off + step]
            more = off + step < len(payload)
            f[ETH + 4:ETH + 6] = self.ip_id.to_bytes(2, "big")
            f[ETH + 6:ETH + 8] = ((0x2000 if more else 0) | off // 8).to_bytes(2, "big")
            self.set_len(f, ETH, len(f) - ETH)
            frags.append(bytes(f))
        r = self.rng.random()
        if r < 0.3:
            self.rng.shuffle(frags)
        elif r < 0.5 and len(frags) > 1:
            del frags[self.rng.randrange(len(frags))]
        elif r < 0.6:
            frags.append(self.rng.choice(frags))
        return frags


def inject(args: argparse.Namespace) -> dict:
    """Makes the frames a chunk at a time, then sends the chunk as fast as
    the socket takes it: the bursts come at the rate of send(), not of the
    generator."""
    dst = socket.inet_aton(args.dst)
    mutator = Mutator(args)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, tc_drops.MARK)
    sock.bind((args.iface, 0))
    accepted = admit = defrag = 0
    refused: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    start, sending = time.monotonic(), 0.0
    frames = mutator.frames(args.frames)
    while chunk := [(kind, frame, fate(frame, dst)) for kind, frame in itertools.islice(frames, CHUNK)]:
        began = time.monotonic()
        for kind, frame, ring in chunk:
            kinds[kind.split("+")[0]] += 1
            try:
                sock.send(frame)
            except OSError as e:
                refused[errno.errorcode.get(e.errno, str(e.errno))] += 1
                if e.errno == errno.ENOBUFS:
                    time.sleep(0.0002)  # the receiver's backlog is full: let it drain
                continue
            accepted += 1
            admit += ring == ADMITTED
            defrag += ring == DEFRAGMENTED
        sending += time.monotonic() - began
    return {"frames": args.frames, "accepted": accepted, "refused": dict(refused), "admitted": admit,
            "defragmented": defrag, "seconds": time.monotonic() - start, "sending_seconds": sending,
            "kinds": dict(kinds)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inject", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iface", required=True)
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    for name in ("src-mac", "dst-mac", "src", "dst", "src-pod", "dst-pod"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--third", help="another node's address, for inner packets to node addresses")
    print(json.dumps(inject(p.parse_args(argv))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
