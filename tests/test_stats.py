import http.client
import re
from collections.abc import Iterator, Mapping

import pytest

from ipipfast.stats import CONTENT_TYPE, MetricsServer, render

Series = tuple[str, frozenset[tuple[str, str]]]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"(?P<name>{_NAME})(?:\{{(?P<labels>.*)\}})? (?P<value>-?[0-9]+)")
_META = re.compile(rf"# (?P<kind>HELP|TYPE) (?P<name>{_NAME}) (?P<text>.*)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _labels(text: str) -> frozenset[tuple[str, str]]:
    pairs, pos = [], 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        assert m, f"bad labels {text!r} at {pos}"
        pairs.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
    assert len({k for k, _ in pairs}) == len(pairs), f"repeated label in {text!r}"
    return frozenset(pairs)


def parse_exposition(text: str) -> dict[Series, int]:
    """Parse Prometheus text format 0.0.4 strictly enough to catch what a scraper rejects."""
    assert text == "" or text.endswith("\n")
    samples: dict[Series, int] = {}
    meta: dict[str, dict[str, str]] = {}
    done: set[str] = set()  # families whose sample block has ended
    current = None
    for line in text.splitlines():
        if m := _META.fullmatch(line):
            name = m["name"]
            assert name not in done and m["kind"] not in meta.get(name, {}), f"repeated {line!r}"
            meta.setdefault(name, {})[m["kind"]] = m["text"]
            if m["kind"] == "TYPE":
                assert "HELP" in meta[name], "HELP before TYPE"
                assert m["text"] == "counter"
        else:
            m = _SAMPLE.fullmatch(line)
            assert m, f"bad line {line!r}"
            name = m["name"]
            assert name.endswith("_total") and "TYPE" in meta.get(name, {}), f"no TYPE before {name}"
            series = (name, _labels(m["labels"] or ""))
            assert series not in samples, f"repeated series {series}"
            samples[series] = int(m["value"])
        if name != current:
            assert name not in done, f"family {name} is not contiguous"
            if current is not None:
                done.add(current)
            current = name
    return samples


def S(name: str, **labels: str) -> Series:
    return name, frozenset(labels.items())


RENDER_CASES = [
    ("empty", {}, {}),
    (
        "packets-and-bytes",
        {"tx_packets": 10, "rx_packets": 7, "tx_bytes": 1500, "rx_bytes": 900},
        {
            S("ipipfast_packets_total", direction="tx"): 10,
            S("ipipfast_packets_total", direction="rx"): 7,
            S("ipipfast_bytes_total", direction="tx"): 1500,
            S("ipipfast_bytes_total", direction="rx"): 900,
        },
    ),
    (
        "prefixed-drops",
        {"rx_drop_bad_checksum": 3, "tx_drop_no_route": 2, "tx_drop_brand_new": 1},
        {
            S("ipipfast_dropped_packets_total", direction="rx", reason="bad_checksum"): 3,
            S("ipipfast_dropped_packets_total", direction="tx", reason="no_route"): 2,
            S("ipipfast_dropped_packets_total", direction="tx", reason="brand_new"): 1,
        },
    ),
    (
        "bare-drops-use-direction-map",
        {"drop_no_route": 4, "drop_too_big": 5, "drop_unknown_peer": 6, "drop_ecn": 0, "drop_mystery": 1},
        {
            S("ipipfast_dropped_packets_total", direction="tx", reason="no_route"): 4,
            S("ipipfast_dropped_packets_total", direction="tx", reason="too_big"): 5,
            S("ipipfast_dropped_packets_total", direction="rx", reason="unknown_peer"): 6,
            S("ipipfast_dropped_packets_total", direction="rx", reason="ecn"): 0,
            S("ipipfast_dropped_packets_total", direction="unknown", reason="mystery"): 1,
        },
    ),
    (
        "same-series-is-summed",
        {"drop_bad_header": 2, "rx_drop_bad_header": 3},
        {S("ipipfast_dropped_packets_total", direction="rx", reason="bad_header"): 5},
    ),
    (
        "other-keys",
        {"icmp_sent": 9, "rx_weird": 1, "reloads_total": 2, "odd-key.x": 3, "drop_": 4},
        {
            S("ipipfast_icmp_sent_total"): 9,
            S("ipipfast_rx_weird_total"): 1,
            S("ipipfast_reloads_total"): 2,
            S("ipipfast_odd_key_x_total"): 3,
            S("ipipfast_drop__total"): 4,
        },
    ),
    ("huge-counter", {"tx_bytes": 2**64 - 1}, {S("ipipfast_bytes_total", direction="tx"): 2**64 - 1}),
]


@pytest.mark.parametrize("counters, expected", [c[1:] for c in RENDER_CASES], ids=[c[0] for c in RENDER_CASES])
def test_render(counters: Mapping[str, int], expected: dict[Series, int]) -> None:
    assert parse_exposition(render(counters)) == expected


def test_render_has_help_and_type_per_family() -> None:
    lines = render({"tx_packets": 1, "rx_packets": 2, "icmp_sent": 3}).splitlines()
    assert lines == [
        "# HELP ipipfast_icmp_sent_total Datapath counter icmp_sent.",
        "# TYPE ipipfast_icmp_sent_total counter",
        "ipipfast_icmp_sent_total 3",
        "# HELP ipipfast_packets_total Packets through the tunnel (tx: encapsulated, rx: decapsulated).",
        "# TYPE ipipfast_packets_total counter",
        'ipipfast_packets_total{direction="rx"} 2',
        'ipipfast_packets_total{direction="tx"} 1',
    ]


def test_constant_labels_on_every_series_and_escaped() -> None:
    labels = {"node": 'we"ird\\name\nx', "tunnel": "ipipfast0"}
    samples = parse_exposition(render({"tx_packets": 1, "drop_fragment": 2, "icmp_sent": 3}, labels))
    assert set(samples) == {
        S("ipipfast_packets_total", direction="tx", **labels),
        S("ipipfast_dropped_packets_total", direction="rx", reason="fragment", **labels),
        S("ipipfast_icmp_sent_total", **labels),
    }


def test_direction_map_can_be_overridden() -> None:
    text = render({"drop_truncated": 1}, drop_directions={"truncated": "tx"})
    assert parse_exposition(text) == {S("ipipfast_dropped_packets_total", direction="tx", reason="truncated"): 1}


@pytest.mark.parametrize(
    "labels",
    [{"1node": "a"}, {"no-de": "a"}, {"__name__": "a"}, {"direction": "a"}, {"reason": "a"}],
    ids=["leading-digit", "dash", "reserved-prefix", "direction", "reason"],
)
def test_bad_constant_labels_are_refused(labels: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        render({"tx_packets": 1}, labels)
    with pytest.raises(ValueError):
        MetricsServer(labels)


@pytest.fixture(scope="module")  # stop() waits out serve_forever's 0.5 s poll: share one server
def server() -> Iterator[tuple[MetricsServer, dict[str, int]]]:
    counters: dict[str, int] = {}
    srv = MetricsServer(labels={"node": "n1"})
    srv.start("127.0.0.1", 0, lambda: counters)
    yield srv, counters
    srv.stop()


def get(srv: MetricsServer, path: str) -> tuple[int, str, str]:
    host, port = srv.address
    conn = http.client.HTTPConnection(host, port, timeout=5)  # direct: no proxy from the environment
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read().decode()
    finally:
        conn.close()


def test_server_serves_metrics(server: tuple[MetricsServer, dict[str, int]]) -> None:
    srv, counters = server
    counters["tx_packets"] = 1
    assert srv.address[0] == "127.0.0.1" and srv.address[1] > 0
    status, ctype, body = get(srv, "/metrics")
    assert (status, ctype) == (200, CONTENT_TYPE)
    assert parse_exposition(body) == {S("ipipfast_packets_total", direction="tx", node="n1"): 1}
    counters["tx_packets"] = 5  # each scrape reads the counters afresh
    assert parse_exposition(get(srv, "/metrics?x=1")[2]) == {S("ipipfast_packets_total", direction="tx", node="n1"): 5}


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/x", "/favicon.ico"], ids=["root", "short", "sub", "other"])
def test_server_404_elsewhere(server: tuple[MetricsServer, dict[str, int]], path: str) -> None:
    assert get(server[0], path)[0] == 404


def test_server_500_when_counters_fail() -> None:
    def broken() -> Mapping[str, int]:
        raise RuntimeError("datapath gone")

    srv = MetricsServer()
    srv.start("127.0.0.1", 0, broken)
    try:
        assert get(srv, "/metrics")[0] == 500
        assert get(srv, "/metrics")[0] == 500  # the server survives
    finally:
        srv.stop()


def test_server_lifecycle() -> None:
    srv = MetricsServer()
    with pytest.raises(RuntimeError):
        srv.address
    srv.stop()  # not started: nothing to do
    host, port = srv.start("127.0.0.1", 0, dict)
    with pytest.raises(RuntimeError):
        srv.start("127.0.0.1", 0, dict)
    srv.stop()
    srv.stop()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection(host, port, timeout=5).connect()
    srv.start("127.0.0.1", 0, dict)  # restartable
    assert get(srv, "/metrics")[:2] == (200, CONTENT_TYPE)
    srv.stop()
