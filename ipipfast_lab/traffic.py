"""Traffic tools run inside namespaces, plus the root-side API that launches them.

    python -m ipipfast_lab.traffic ping --dst IP [--count N --interval S --size B --timeout T --df --ttl N]
    python -m ipipfast_lab.traffic tcp-sink --port P [--once]
    python -m ipipfast_lab.traffic tcp-send --dst IP --port P --bytes N [--seed S]
    python -m ipipfast_lab.traffic udp-echo --port P
    python -m ipipfast_lab.traffic udp-send --dst IP --port P [--count N --size B --timeout T]

Each tool prints its result as one JSON line. Servers (tcp-sink, udp-echo) first
print {"event": "listening", ...} once bound, so callers never race them.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .testbed import Node, NsRef, Pod, Testbed

CHUNK = 256 * 1024
_POOL_SIZE = 4 << 20
_IP_MTU_DISCOVER, _IP_PMTUDISC_DONT, _IP_PMTUDISC_DO = 10, 0, 2  # not exported by Python 3.11
_ICMP_ECHO_REPLY, _ICMP_ECHO = 0, 8
_ICMP_ERRORS = (3, 11, 12)  # unreachable, time exceeded, parameter problem
_SO_RCVBUFFORCE = 33  # not exported by Python 3.11
_CAPTURE_BUFFER = 64 << 20


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def summary(samples: list[float]) -> dict[str, float] | None:
    """min/p50/p99/p99.9 (p999)/max/avg of latency samples (µs), None when there are none."""
    if not samples:
        return None
    s = sorted(samples)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))]

    stats = {"min": s[0], "p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "max": s[-1], "avg": sum(s) / len(s)}
    return {k: round(v, 1) for k, v in stats.items()}


def pattern(nbytes: int, seed: int = 1) -> Iterator[memoryview]:
    """A deterministic pseudo-random byte stream, as chunks of a seeded pool read
    at shifting offsets (cheap enough not to limit multi-Gbit/s senders)."""
    pool = memoryview(random.Random(seed).randbytes(_POOL_SIZE))
    k = 0
    while nbytes > 0:
        off = (k * 7919) % (_POOL_SIZE - CHUNK)
        n = min(CHUNK, nbytes)
        yield pool[off:off + n]
        nbytes -= n
        k += 1


def _rate(nbytes: int, seconds: float) -> float:
    return round(nbytes * 8 / seconds / 1e9, 3) if seconds > 0 else 0.0


# -- ping --------------------------------------------------------------------

def inet_checksum(data: bytes) -> int:
    """RFC 1071, in plain Python (the tests' oracle for checksums too)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def cmd_ping(a: argparse.Namespace) -> None:
    ident = os.getpid() & 0xFFFF
    payload = bytes(next(pattern(a.size))) if a.size else b""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_DO if a.df else _IP_PMTUDISC_DONT)
    if a.ttl:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, a.ttl)
    sent_at: dict[int, float] = {}
    replied_at: list[float] = []  # CLOCK_MONOTONIC, which every namespace shares
    rtts: list[float] = []
    got: set[int] = set()
    corrupt = duplicates = 0
    icmp_errors: Counter[str] = Counter()
    send_errors: Counter[str] = Counter()
    seq = 0
    count = a.count

    def stop_sending(*_: object) -> None:  # terminate(): what was sent gets its replies, then the report
        nonlocal count
        count = min(count, seq)
    signal.signal(signal.SIGTERM, stop_sending)
    next_send = time.monotonic()
    deadline = float("inf")
    while True:
        now = time.monotonic()
        if seq < count and now >= next_send:
            head = struct.pack("!BBHHH", _ICMP_ECHO, 0, 0, ident, seq)
            packet = head[:2] + struct.pack("!H", inet_checksum(head + payload)) + head[4:] + payload
            try:
                sock.sendto(packet, (a.dst, 0))
                sent_at[seq] = now
            except OSError as e:  # e.g. EMSGSIZE with --df
                send_errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
            seq += 1
            next_send += a.interval
        if seq >= count and deadline == float("inf"):
            deadline = now + a.timeout
        if (seq >= count and len(got) == len(sent_at)) or now >= deadline:
            break
        wait = (next_send if seq < count else deadline) - now
        if not select.select([sock], [], [], max(0.0, wait))[0]:
            continue
        data = sock.recv(65535)
        t = time.monotonic()
        icmp = data[(data[0] & 0xF) * 4:]
        kind, code = icmp[0], icmp[1]
        if kind == _ICMP_ECHO_REPLY and socket.inet_ntoa(data[12:16]) == a.dst:
            rid, rseq = struct.unpack("!HH", icmp[4:8])
            if rid != ident or rseq not in sent_at:
                continue
            if rseq in got:
                duplicates += 1
                continue
            got.add(rseq)
            replied_at.append(t)
            rtts.append((t - sent_at[rseq]) * 1e6)
            corrupt += icmp[8:] != payload or inet_checksum(icmp) != 0
        elif kind in _ICMP_ERRORS:
            # Ours if the quoted original is one of our echo requests.
            inner = icmp[8:]
            quoted = inner[(inner[0] & 0xF) * 4:] if inner else b""
            if len(quoted) >= 6 and quoted[0] == _ICMP_ECHO and struct.unpack("!H", quoted[4:6])[0] == ident:
                icmp_errors[f"{kind}/{code}"] += 1
    emit({"dst": a.dst, "size": a.size, "sent": len(sent_at), "received": len(got), "corrupt": corrupt,
          "duplicates": duplicates, "icmp_errors": dict(icmp_errors), "send_errors": dict(send_errors),
          "rtt_us": summary(rtts),
          **({"replied_at": replied_at, "lost_at": [t for s, t in sent_at.items() if s not in got]} if a.times else {})})


# -- TCP ---------------------------------------------------------------------

def cmd_tcp_sink(a: argparse.Namespace) -> None:
    srv = socket.create_server(("0.0.0.0", a.port))
    emit({"event": "listening", "port": a.port})
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        conn, peer = srv.accept()
        digest, n, t0 = hashlib.sha256(), 0, 0.0
        with conn:
            while k := conn.recv_into(buf):
                if not n:
                    t0 = time.monotonic()
                digest.update(view[:k])
                n += k
            seconds = time.monotonic() - t0 if n else 0.0
        emit({"peer": peer[0], "bytes": n, "sha256": digest.hexdigest(),
              "seconds": round(seconds, 6), "gbit_s": _rate(n, seconds)})
        if a.once:
            return


def cmd_tcp_send(a: argparse.Namespace) -> None:
    with socket.create_connection((a.dst, a.port), timeout=a.timeout) as sock:
        t0 = time.monotonic()
        for chunk in pattern(a.bytes, a.seed):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        if sock.recv(1):  # the sink closes only once it has read everything
            raise RuntimeError("tcp-sink sent data back")
        seconds = time.monotonic() - t0
    digest = hashlib.sha256()
    for chunk in pattern(a.bytes, a.seed):  # hashed after the clock stopped
        digest.update(chunk)
    emit({"dst": a.dst, "bytes": a.bytes, "sha256": digest.hexdigest(),
          "seconds": round(seconds, 6), "gbit_s": _rate(a.bytes, seconds)})


# -- UDP ---------------------------------------------------------------------

def cmd_udp_echo(a: argparse.Namespace) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", a.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # report the count on terminate()
    emit({"event": "listening", "port": a.port})
    echoed = 0
    try:
        while True:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)
            echoed += 1
    finally:
        emit({"echoed": echoed})


def cmd_udp_send(a: argparse.Namespace) -> None:
    if a.size < 8:
        raise SystemExit("--size must be at least 8 (sequence number)")
    body = b"".join(pattern(a.size - 8))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((a.dst, a.port))
    rtts: list[float] = []
    sent_at: list[float] = []  # CLOCK_MONOTONIC, as perf record -k monotonic stamps its events
    corrupt = 0
    errors: Counter[str] = Counter()
    for seq in range(a.count):
        msg = struct.pack("!Q", seq) + body
        t0 = time.monotonic()
        deadline = t0 + a.timeout
        try:
            sock.send(msg)
            while (left := deadline - time.monotonic()) > 0 and select.select([sock], [], [], left)[0]:
                data = sock.recv(65535)
                if data[:8] == msg[:8]:  # replies to earlier, timed-out datagrams are skipped
                    rtts.append((time.monotonic() - t0) * 1e6)
                    sent_at.append(t0)
                    corrupt += data != msg
                    break
        except OSError as e:  # e.g. ECONNREFUSED after an ICMP port unreachable
            errors[errno.errorcode.get(e.errno, str(e.errno))] += 1
    emit({"dst": a.dst, "size": a.size, "sent": a.count, "received": len(rtts), "corrupt": corrupt,
          "errors": dict(errors), "rtt_us": summary(rtts),
          **({"sent_at": sent_at, "rtts_us": rtts} if a.times else {})})


# -- capture -------------------------------------------------------------------

def cmd_capture(a: argparse.Namespace) -> None:
    """Every frame on an interface, both directions, to a pcap file (read it
    with scapy's rdpcap), until terminated or --seconds pass. Terminated, it
    writes out what its socket still holds first: every frame the interface
    had passed by then."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))  # ETH_P_ALL
    # Room for a whole burst (a test's few MB at line rate), which arrives
    # faster than this loop writes it out: with the default 208 kB buffer a
    # 2 MB transfer left as few as 100 of its 1,450 frames, on a slow host.
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _CAPTURE_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _CAPTURE_BUFFER)
    sock.bind((a.iface, 0))
    # SIGTERM wakes the select() through this pipe, between two frames.
    wake, woken = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(woken)
    signal.signal(signal.SIGTERM, lambda *_: None)
    frames = 0
    with open(a.out, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))  # pcap header, Ethernet
        emit({"event": "listening", "iface": a.iface})

        def write(data: bytes) -> None:
            nonlocal frames
            now = time.time()
            f.write(struct.pack("<IIII", int(now), int(now % 1 * 1e6), len(data), len(data)) + data)
            frames += 1
        deadline = time.monotonic() + a.seconds
        while (left := deadline - time.monotonic()) > 0:
            ready = select.select([sock, wake], [], [], left)[0]
            if wake in ready:
                break
            if ready:
                write(sock.recv(65535))
        sock.setblocking(False)
        while True:
            try:
                write(sock.recv(65535))
            except BlockingIOError:
                break
        f.flush()
        emit({"frames": frames, "out": a.out})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ipipfast_lab.traffic", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping", help="ICMP echo over a raw socket")
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--interval", type=float, default=0.05)
    p.add_argument("--size", type=int, default=56, help="ICMP payload bytes")
    p.add_argument("--timeout", type=float, default=1.0, help="wait after the last request")
    p.add_argument("--df", action="store_true", help="set Don't Fragment")
    p.add_argument("--ttl", type=int, default=0, help="IP TTL (default: the system's)")
    p.add_argument("--times", action="store_true", help="also report when each reply came and when each echo left that got none (CLOCK_MONOTONIC)")
    p.set_defaults(fn=cmd_ping)
    p = sub.add_parser("tcp-sink", help="receive TCP streams, report bytes and sha256")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--once", action="store_true", help="exit after one connection")
    p.set_defaults(fn=cmd_tcp_sink)
    p = sub.add_parser("tcp-send", help="send N deterministic pseudo-random bytes")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=30.0, help="connect/stall timeout")
    p.set_defaults(fn=cmd_tcp_send)
    p = sub.add_parser("udp-echo", help="echo UDP datagrams until terminated")
    p.add_argument("--port", type=int, required=True)
    p.set_defaults(fn=cmd_udp_echo)
    p = sub.add_parser("udp-send", help="send datagrams one at a time, check the echoes")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=512, help="UDP payload bytes")
    p.add_argument("--timeout", type=float, default=1.0, help="wait per datagram")
    p.add_argument("--times", action="store_true", help="also report when each datagram left and its RTT")
    p.set_defaults(fn=cmd_udp_send)
    p = sub.add_parser("capture", help="write every frame on an interface to a pcap file")
    p.add_argument("--iface", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seconds", type=float, default=60.0)
    p.set_defaults(fn=cmd_capture)
    a = ap.parse_args(argv)
    a.fn(a)


# -- API for the root namespace (tests, demo, benchmarks) ----------------------

def _argv(args: tuple[object, ...]) -> list[str]:
    return [sys.executable, "-m", "ipipfast_lab.traffic", *map(str, args)]


def _result(out: bytes | str, err: bytes | str, returncode: int | None, what: str) -> dict[str, Any]:
    out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    lines = out.strip().splitlines()
    if returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed (exit {returncode}): {err.strip() or out.strip()}")
    return json.loads(lines[-1])


def tool(tb: Testbed, ns: NsRef, *args: object, timeout: float = 60) -> dict[str, Any]:
    """Run one tool to completion inside `ns` and return its JSON result."""
    proc = tb.run(ns, _argv(args), timeout=timeout, check=False)
    return _result(proc.stdout, proc.stderr, proc.returncode, f"{args[0]} in {getattr(ns, 'name', ns)}")


def serve(tb: Testbed, ns: NsRef, *args: object, timeout: float = 10) -> subprocess.Popen:
    """Start a server tool inside `ns` and return once it is listening."""
    proc = tb.popen(ns, _argv(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # Byte by byte from the raw fd: a buffered read could swallow later lines
    # that communicate() must still see.
    line, deadline = b"", time.monotonic() + timeout
    while not line.endswith(b"\n") and select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
        if not (byte := os.read(proc.stdout.fileno(), 1)):
            break
        line += byte
    if b'"listening"' not in line:
        proc.kill()
        _, err = proc.communicate()
        raise RuntimeError(f"{args[0]} did not start in {getattr(ns, 'name', ns)}: {err.decode(errors='replace').strip()}")
    return proc


def collect(proc: subprocess.Popen, timeout: float = 10) -> dict[str, Any]:
    """Wait for a server tool started by serve() and return its last JSON line."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return _result(out, err, proc.returncode, str(proc.args[3]))


def ping(tb: Testbed, src: NsRef, dst_ip: str, count: int = 5, interval: float = 0.05,
         size: int = 56, timeout: float = 1.0, df: bool = False, ttl: int = 0) -> dict[str, Any]:
    """ICMP echo from `src`: {sent, received, corrupt, duplicates, icmp_errors, send_errors, rtt_us}."""
    args = ["ping", "--dst", dst_ip, "--count", count, "--interval", interval, "--size", size, "--timeout", timeout]
    return tool(tb, src, *args, *(["--df"] if df else []), *(["--ttl", ttl] if ttl else []),
                timeout=count * interval + timeout + 30)


def ping_stream(tb: Testbed, src: NsRef, dst_ip: str, interval: float = 0.001,
                timeout: float = 1.0) -> subprocess.Popen:
    """ICMP echo from `src` every `interval` until terminate(); collect() then
    gives the ping result with replied_at and lost_at (CLOCK_MONOTONIC)."""
    return tb.popen(src, _argv(("ping", "--dst", dst_ip, "--count", 1 << 40, "--interval", interval,
                                "--timeout", timeout, "--times")), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def tcp_transfer(tb: Testbed, src: NsRef, dst: Pod | Node, nbytes: int, port: int = 7001,
                 seed: int = 1, timeout: float = 120) -> dict[str, Any]:
    """Stream `nbytes` from `src` to `dst`: {sent, received, match, gbit_s}."""
    sink = serve(tb, dst, "tcp-sink", "--port", port, "--once")
    try:
        sent = tool(tb, src, "tcp-send", "--dst", dst.ip, "--port", port, "--bytes", nbytes,
                    "--seed", seed, timeout=timeout)
        received = collect(sink)
    finally:
        if sink.poll() is None:  # the sender failed: do not leave the sink listening
            sink.kill()
            sink.communicate()
    match = sent["sha256"] == received["sha256"] and sent["bytes"] == received["bytes"]
    return {"sent": sent, "received": received, "match": match, "gbit_s": sent["gbit_s"]}


def udp_roundtrip(tb: Testbed, src: NsRef, dst: Pod | Node, count: int = 10, size: int = 512,
                  port: int = 7002, timeout: float = 1.0) -> dict[str, Any]:
    """Datagrams from `src` echoed by `dst`: the udp-send result plus `echoed`."""
    echo = serve(tb, dst, "udp-echo", "--port", port)
    try:
        result = tool(tb, src, "udp-send", "--dst", dst.ip, "--port", port, "--count", count,
                      "--size", size, "--timeout", timeout, timeout=count * timeout + 30)
    finally:
        echo.terminate()
    result["echoed"] = collect(echo)["echoed"]
    return result


if __name__ == "__main__":
    main()
