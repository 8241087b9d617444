"""Prometheus text exposition (format 0.0.4) of the datapath counters, and its HTTP server.

Counter keys map to metric families:
  rx_packets, tx_packets        -> ipipfast_packets_total{direction}
  rx_bytes, tx_bytes            -> ipipfast_bytes_total{direction}
  rx_drop_<r>, tx_drop_<r>      -> ipipfast_dropped_packets_total{direction, reason="<r>"}
  drop_<r>                      -> the same, direction from DROP_DIRECTIONS ("unknown" if absent)
  anything else, e.g. icmp_sent -> ipipfast_icmp_sent_total
Keys that land on the same series are summed, so the output never repeats one.
"""

from __future__ import annotations

import logging
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "ipipfast"
_DROPPED = f"{PREFIX}_dropped_packets_total"

# Direction of unprefixed drop_<reason> keys: tx = encapsulating (TUN -> underlay),
# rx = decapsulating (underlay -> TUN). A datapath that counts a reason on both
# paths should use rx_drop_<reason> / tx_drop_<reason> instead.
DROP_DIRECTIONS: Mapping[str, str] = MappingProxyType(
    {
        "no_route": "tx",
        "too_big": "tx",
        "unknown_peer": "rx",
        "bad_header": "rx",
        "bad_checksum": "rx",
        "fragment": "rx",
        "truncated": "rx",
        "ecn": "rx",  # RFC 6040: an outer CE over a not-ECT inner packet is dropped
        "inner_bad": "rx",
    }
)

_HELP = {
    f"{PREFIX}_packets_total": "Packets through the tunnel (tx: encapsulated, rx: decapsulated).",
    f"{PREFIX}_bytes_total": "Bytes through the tunnel (tx: encapsulated, rx: decapsulated).",
    _DROPPED: "Packets dropped by the datapath, by direction and reason.",
}
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_NOT_NAME_CHAR = re.compile(r"[^a-zA-Z0-9_]")

_Labels = tuple[tuple[str, str], ...]


def _series(key: str, drop_directions: Mapping[str, str]) -> tuple[str, _Labels]:
    """The metric name and labels a counter key belongs to."""
    direction, _, rest = key.partition("_")
    if direction in ("rx", "tx"):
        if rest in ("packets", "bytes"):
            return f"{PREFIX}_{rest}_total", (("direction", direction),)
        if rest.startswith("drop_") and len(rest) > 5:
            return _DROPPED, (("direction", direction), ("reason", rest[5:]))
    if key.startswith("drop_") and len(key) > 5:
        reason = key[5:]
        return _DROPPED, (("direction", drop_directions.get(reason, "unknown")), ("reason", reason))
    name = f"{PREFIX}_{_NOT_NAME_CHAR.sub('_', key)}"
    return (name if name.endswith("_total") else f"{name}_total"), ()


def check_labels(labels: Mapping[str, str]) -> None:
    """Refuse constant labels Prometheus would reject or that clash with ours."""
    for name in labels:
        if not _LABEL_NAME.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"invalid Prometheus label name {name!r}")
        if name in ("direction", "reason"):
            raise ValueError(f"label {name!r} is set per series by ipipfast")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(value: str) -> str:
    return _escape_help(value).replace('"', '\\"')


def render(
    counters: Mapping[str, int],
    labels: Mapping[str, str] | None = None,
    drop_directions: Mapping[str, str] = DROP_DIRECTIONS,
) -> str:
    """The counters as Prometheus text; `labels` (e.g. node, tunnel) go on every series."""
    constant = tuple((labels or {}).items())
    check_labels(dict(constant))
    families: dict[str, dict[_Labels, int]] = {}
    helps: dict[str, str] = {}
    for key, value in counters.items():
        name, own = _series(key, drop_directions)
        helps.setdefault(name, _HELP.get(name, f"Datapath counter {_escape_help(key)}."))
        series = families.setdefault(name, {})
        series[own] = series.get(own, 0) + int(value)
    out: list[str] = []
    for name in sorted(families):
        out += [f"# HELP {name} {helps[name]}", f"# TYPE {name} counter"]
        for own, value in sorted(families[name].items()):
            pairs = ",".join(f'{k}="{_escape_value(str(v))}"' for k, v in constant + own)
            out.append(f"{name}{{{pairs}}} {value}" if pairs else f"{name} {value}")
    return "".join(line + "\n" for line in out)


class _Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], render_now: Callable[[], str]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.render_now = render_now
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # Skip HTTPServer's getfqdn(host): a reverse DNS lookup nothing here uses.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404)
            return
        try:
            body = self.server.render_now().encode()
        except Exception:  # a failing scrape must not kill the server thread
            log.exception("rendering metrics failed")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)  # scrapes are too frequent for stderr


class MetricsServer:
    """Serves render(get_counters()) at /metrics from a daemon thread; 404 elsewhere."""

    def __init__(
        self, labels: Mapping[str, str] | None = None, drop_directions: Mapping[str, str] = DROP_DIRECTIONS
    ) -> None:
        self._labels = dict(labels or {})
        check_labels(self._labels)  # fail at startup, not at the first scrape
        self._drop_directions = drop_directions
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int, get_counters: Callable[[], Mapping[str, int]]) -> tuple[str, int]:
        """Bind and serve; returns the bound (host, port), so port 0 picks a free one."""
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        self._server = _Server((host, port), lambda: render(get_counters(), self._labels, self._drop_directions))
        self._thread = threading.Thread(target=self._server.serve_forever, name="ipipfast-metrics", daemon=True)
        self._thread.start()
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("metrics server not started")
        return self._server.server_name, self._server.server_port

    def stop(self) -> None:
        """Stop serving and close the socket; does nothing if not started."""
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
        self._server = self._thread = None
