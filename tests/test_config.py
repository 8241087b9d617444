from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
import yaml

from ipipfast.config import (
    Config,
    ConfigError,
    EtcdConfig,
    EtcdEndpoint,
    EtcdTLS,
    KernelConfig,
    NodeConfig,
    StatsConfig,
    TunnelConfig,
    config_from_dict,
    load_config,
    parse_config,
)
from ipipfast.routes import Mode, Route, RouteSet

NODE = "node:\n  ip: 198.18.0.10/24\n  interface: eth0\n"  # lines 1-3

FULL = """\
node:
  ip: 198.18.0.10/24
  interface: eth0
tunnel:
  name: ipipfast0
  mode: CrossSubnet
  mtu: 1480
  ttl: inherit
  tos: 0
  pmtudisc: false
  ignore_df: false
  workers: 2
  batch: 128
stats:
  listen: "127.0.0.1:9100"
routes:
  - {cidr: 198.19.1.0/24, via: 198.18.0.11}
  - cidr: 198.19.2.0/26
    via: 198.18.1.12
"""

DEFAULT_NODE = NodeConfig(ip=IPv4Interface("198.18.0.10/24"), interface="eth0")


def routes(*pairs: tuple[str, str]) -> RouteSet:
    return RouteSet.of(Route.parse(c, v) for c, v in pairs)


GOOD = [
    ("minimal", NODE, Config(node=DEFAULT_NODE)),
    (
        "full",
        FULL,
        Config(
            node=DEFAULT_NODE,
            tunnel=TunnelConfig(mode=Mode.CROSS_SUBNET, mtu=1480, workers=2, batch=128),
            stats=StatsConfig(listen=("127.0.0.1", 9100)),
            routes=routes(("198.19.1.0/24", "198.18.0.11"), ("198.19.2.0/26", "198.18.1.12")),
        ),
    ),
    ("bare-ip-is-/32-until-found", "node: {ip: 198.18.0.10, interface: eth0}\n",
     Config(node=NodeConfig(IPv4Interface("198.18.0.10/32"), "eth0", prefixlen_given=False))),
    ("interface-optional", "node: {ip: 198.18.0.10/24}\n", Config(node=NodeConfig(IPv4Interface("198.18.0.10/24")))),
    ("empty-sections", NODE + "tunnel:\nstats:\nroutes:\n", Config(node=DEFAULT_NODE)),
    ("fixed-ttl-forces-pmtudisc", NODE + "tunnel: {ttl: 64}\n",
     Config(node=DEFAULT_NODE, tunnel=TunnelConfig(ttl=64, pmtudisc=True))),
    ("fixed-ttl-pmtudisc-true", NODE + "tunnel: {ttl: 1, pmtudisc: true}\n",
     Config(node=DEFAULT_NODE, tunnel=TunnelConfig(ttl=1, pmtudisc=True))),
    ("tos-inherit-mtu-null", NODE + "tunnel: {tos: inherit, mtu: null}\n",
     Config(node=DEFAULT_NODE, tunnel=TunnelConfig(tos=None, mtu=None))),
    ("ignore-df", NODE + "tunnel: {ignore_df: true, tos: 255, mode: Never}\n",
     Config(node=DEFAULT_NODE, tunnel=TunnelConfig(ignore_df=True, tos=255, mode=Mode.NEVER))),
    ("source-mac-check-off", NODE + "tunnel: {check_source_mac: false}\n",
     Config(node=DEFAULT_NODE, tunnel=TunnelConfig(check_source_mac=False))),
    ("listen-ipv6", NODE + "stats: {listen: '[::1]:0'}\n", Config(node=DEFAULT_NODE, stats=StatsConfig(("::1", 0)))),
    ("listen-any", NODE + "stats: {listen: ':9100'}\n", Config(node=DEFAULT_NODE, stats=StatsConfig(("", 9100)))),
    ("listen-hostname", NODE + "stats: {listen: 'localhost:9100'}\n",
     Config(node=DEFAULT_NODE, stats=StatsConfig(("localhost", 9100)))),
    ("peer-series", NODE + "stats: {listen: ':0', peer_series: 0}\n",
     Config(node=DEFAULT_NODE, stats=StatsConfig(("", 0), peer_series=0))),
    ("peer-series-without-listen", NODE + "stats: {peer_series: 5}\n",
     Config(node=DEFAULT_NODE, stats=StatsConfig(peer_series=5))),
    ("alias", NODE + "routes:\n  - {cidr: 198.19.1.0/24, via: &p 198.18.0.11}\n  - {cidr: 198.19.9.0/24, via: *p}\n",
     Config(node=DEFAULT_NODE, routes=routes(("198.19.1.0/24", "198.18.0.11"), ("198.19.9.0/24", "198.18.0.11")))),
    ("host-route", NODE + "routes: [{cidr: 198.19.1.7, via: 198.18.0.11}]\n",
     Config(node=DEFAULT_NODE, routes=routes(("198.19.1.7/32", "198.18.0.11")))),
    ("etcd", NODE + "  pod_cidrs: [198.19.1.0/24, 198.19.9.0/26]\n"
     "etcd:\n  endpoints: [http://198.18.0.1:2379, 'http://[fd00::1]', http://etcd.example/]\n"
     "  prefix: /my/network\n  ttl: 60\n",
     Config(node=NodeConfig(IPv4Interface("198.18.0.10/24"), "eth0",
                            (IPv4Network("198.19.1.0/24"), IPv4Network("198.19.9.0/26"))),
            etcd=EtcdConfig((EtcdEndpoint("http", "198.18.0.1", 2379), EtcdEndpoint("http", "fd00::1", 2379),
                             EtcdEndpoint("http", "etcd.example", 2379)), "/my/network", 60))),
    ("etcd-defaults", NODE + "etcd: {endpoints: [http://198.18.0.1:2379]}\n",
     Config(node=DEFAULT_NODE, etcd=EtcdConfig((EtcdEndpoint("http", "198.18.0.1", 2379),),
                                               "/coreos.com/network", 30))),
    ("etcd-null", NODE + "  pod_cidrs:\netcd:\n", Config(node=DEFAULT_NODE)),
    ("routes-empty-list", NODE + "routes: []\n", Config(node=DEFAULT_NODE)),
    ("kernel", NODE + "kernel: {learn: false, resync: 0}\n",
     Config(node=DEFAULT_NODE, kernel=KernelConfig(learn=False, resync=0))),
    ("kernel-empty", NODE + "kernel:\n", Config(node=DEFAULT_NODE, kernel=KernelConfig(learn=True, resync=90))),
    # Forms the event reader hands to the node reader: quoted, tagged, netmask, anchored items.
    ("routes-unusual-forms", NODE + "routes:\n  - {'cidr': \"198.19.1.0/24\", via: !!str 198.18.0.11}\n"
     "  - &r {cidr: 198.19.2.0/255.255.255.0, via: 198.18.0.12}\n  - {via: 198.18.0.13, cidr: 10.0.0.0/08}\n",
     Config(node=DEFAULT_NODE, routes=routes(("198.19.1.0/24", "198.18.0.11"), ("198.19.2.0/24", "198.18.0.12"),
                                              ("10.0.0.0/8", "198.18.0.13")))),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_good_config(text: str, expected: Config) -> None:
    assert parse_config(text) == expected


BAD = [
    # (id, text, line, fragment of the reason)
    ("yaml-syntax", NODE + "tunnel:\n  mtu: [1480\n  ttl: 64\n", 6, "invalid YAML"),
    ("yaml-tab", "node:\n\tip: 198.18.0.10\n", 2, "invalid YAML"),
    ("yaml-control-char", NODE + "tunnel:\n  name: a\x07b\n", 5, "invalid YAML: character U+0007"),
    ("yaml-two-documents", NODE + "---\n" + NODE, 4, "invalid YAML"),
    ("top-not-mapping", "- node\n", 1, "the config: expected a mapping, got a list"),
    ("unknown-top-key", NODE + "tunel:\n  mtu: 1400\n", 4, "unknown key 'tunel' at the top level; did you mean 'tunnel'?"),
    ("unknown-key-no-match", NODE + "zzz: 1\n", 4, "expected one of: node, tunnel, kernel, stats, routes"),
    ("unknown-tunnel-key", NODE + "tunnel:\n  mode: Always\n  worker: 4\n", 6, "did you mean 'workers'?"),
    ("unknown-route-key", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    vai: 198.18.0.11\n", 6, "did you mean 'via'?"),
    ("non-string-key", NODE + "tunnel:\n  1: 2\n", 5, "keys must be strings, got int 1"),
    ("duplicate-key", NODE + "tunnel:\n  mtu: 1400\n  mtu: 1300\n", 6, "duplicate key 'mtu' in tunnel (first on line 5)"),
    ("missing-node", "# comment\n\ntunnel:\n  mode: Always\n", 3, "missing required key 'node' at the top level"),
    ("missing-ip", "tunnel: {}\nnode:\n  interface: eth0\n", 3, "missing required key 'ip' in node"),
    ("missing-via", NODE + "routes:\n  - cidr: 198.19.1.0/24\n", 5, "missing required key 'via' in routes[0]"),
    ("node-null", "node:\n", 1, "node: expected a mapping, got null"),
    ("tunnel-scalar", NODE + "tunnel: fast\n", 4, "tunnel: expected a mapping, got string 'fast'"),
    ("routes-mapping", NODE + "routes:\n  cidr: 198.19.1.0/24\n", 5, "routes: expected a list"),
    ("route-scalar", NODE + "routes:\n  - 198.19.1.0/24\n", 5, "routes[0]: expected a mapping"),
    ("node-ip-bad", "node:\n  interface: eth0\n  ip: 198.18.0.300/24\n", 3, "node.ip: invalid IPv4 address"),
    ("node-ip-int", "node:\n  interface: eth0\n  ip: 12\n", 3, "node.ip: expected a string, got int 12"),
    ("node-ip-loopback", "node:\n  interface: eth0\n  ip: 127.0.0.1/8\n", 3, "node.ip 127.0.0.1 is a loopback"),
    ("interface-too-long", "node:\n  ip: 198.18.0.10\n  interface: enp0s31f6-long-name\n", 3, "1 to 15 bytes"),
    ("interface-slash", "node:\n  ip: 198.18.0.10\n  interface: eth/0\n", 3, "must not contain"),
    ("tunnel-name-empty", NODE + "tunnel:\n  name: ''\n", 5, "tunnel.name: interface name ''"),
    ("tunnel-name-template", NODE + "tunnel:\n  name: tun%d\n", 5, "must not contain"),
    ("mode-case", NODE + "tunnel:\n  mode: always\n", 5, "unknown mode 'always'; did you mean 'Always'?"),
    ("mode-typo", NODE + "tunnel:\n  mode: CrossSubnett\n", 5, "did you mean 'CrossSubnet'?"),
    ("mode-bool", NODE + "tunnel:\n  mode: off\n", 5, "tunnel.mode: expected a string, got boolean false"),
    ("mtu-low", NODE + "tunnel:\n  mtu: 67\n", 5, "tunnel.mtu: 67 is out of range 68..65515"),
    ("mtu-high", NODE + "tunnel:\n  mtu: 65516\n", 5, "out of range 68..65515"),
    ("mtu-string", NODE + "tunnel:\n  mtu: '1480'\n", 5, "expected an integer 68..65515 or null, got string '1480'"),
    ("mtu-float", NODE + "tunnel:\n  mtu: 1480.0\n", 5, "got float 1480.0"),
    ("mtu-bool", NODE + "tunnel:\n  mtu: true\n", 5, "got boolean true"),
    ("mtu-list", NODE + "tunnel:\n  mtu: [1480]\n", 5, "tunnel.mtu: expected an integer, got a list"),
    ("mtu-bad-tag", NODE + "tunnel:\n  mtu: !!int big\n", 5, "tunnel.mtu: invalid literal"),
    ("mtu-unknown-tag", NODE + "tunnel:\n  mtu: !big 1\n", 5, "could not determine a constructor"),
    ("ttl-zero", NODE + "tunnel:\n  ttl: 0\n", 5, "tunnel.ttl: 0 is out of range 1..255"),
    ("ttl-typo", NODE + "tunnel:\n  ttl: inhert\n", 5, "expected an integer 1..255 or 'inherit'"),
    ("tos-high", NODE + "tunnel:\n  tos: 256\n", 5, "tunnel.tos: 256 is out of range 0..255"),
    ("pmtudisc-string", NODE + "tunnel:\n  pmtudisc: 'no'\n", 5, "expected true or false, got string 'no'"),
    ("check-source-mac-int", NODE + "tunnel:\n  check_source_mac: 0\n", 5, "expected true or false, got int 0"),
    ("ttl-vs-nopmtudisc", NODE + "tunnel:\n  ttl: 64\n  pmtudisc: false\n", 6, "conflicts with a fixed ttl"),
    ("ignore-df-vs-ttl", NODE + "tunnel:\n  ttl: 64\n  ignore_df: true\n", 6, "set by the fixed ttl"),
    ("ignore-df-vs-pmtudisc", NODE + "tunnel:\n  ignore_df: true\n  pmtudisc: true\n", 5, "set by pmtudisc: true"),
    ("workers-high", NODE + "tunnel:\n  workers: 65\n", 5, "tunnel.workers: 65 is out of range 1..64"),
    ("batch-zero", NODE + "tunnel:\n  batch: 0\n", 5, "tunnel.batch: 0 is out of range 1..1024"),
    ("coalesce-too-long", NODE + "tunnel:\n  coalesce_us: 20000\n", 5,
     "tunnel.coalesce_us: 20000 is out of range 0..10000"),
    ("ring-too-small", NODE + "tunnel:\n  ring_frames: 8\n", 5, "tunnel.ring_frames: 8 is out of range 64..65536"),
    ("listen-int", NODE + "stats:\n  listen: 9100\n", 5, 'expected "host:port"'),
    ("listen-no-port", NODE + "stats:\n  listen: localhost\n", 5, 'expected "host:port"'),
    ("listen-port-high", NODE + "stats:\n  listen: 'localhost:65536'\n", 5, 'expected "host:port"'),
    ("listen-ipv6-bare", NODE + "stats:\n  listen: '::1:9100'\n", 5, "put an IPv6 host in brackets"),
    ("listen-ipv6-bad", NODE + "stats:\n  listen: '[nope]:9100'\n", 5, "stats.listen:"),
    ("peer-series-negative", NODE + "stats:\n  listen: ':0'\n  peer_series: -1\n", 6,
     "stats.peer_series: -1 is out of range 0..10000"),
    ("peer-series-string", NODE + "stats:\n  peer_series: many\n", 5,
     "stats.peer_series: expected an integer 0..10000, got string 'many'"),
    ("cidr-host-bits", NODE + "routes:\n  - cidr: 198.19.1.5/24\n    via: 198.18.0.11\n", 5,
     "routes[0].cidr: 198.19.1.5/24 has host bits set; did you mean 198.19.1.0/24?"),
    ("cidr-bad", NODE + "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n  - cidr: 198.19/16\n    via: 198.18.0.11\n",
     6, "routes[1].cidr: invalid IPv4 CIDR"),
    ("cidr-int", NODE + "routes:\n  - cidr: 10\n    via: 198.18.0.11\n", 5, "routes[0].cidr: expected a string"),
    ("via-bad", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 198.18.0.x\n", 6, "routes[0].via: invalid IPv4 address"),
    ("via-multicast", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 239.1.1.1\n", 6, "multicast"),
    ("via-broadcast", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 255.255.255.255\n", 6, "broadcast"),
    ("via-unspecified", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 0.0.0.0\n", 6, "unspecified"),
    ("via-loopback", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 127.0.0.2\n", 6, "loopback"),
    ("via-inside-cidr", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 198.19.1.1\n", 6, "lies inside the routed CIDR"),
    ("via-self", NODE + "routes:\n  - cidr: 198.19.1.0/24\n    via: 198.18.0.10\n", 6, "this node's own address"),
    ("pod-cidrs-scalar", NODE + "  pod_cidrs: 198.19.1.0/24\n", 4, "node.pod_cidrs: expected a list of CIDRs"),
    ("pod-cidr-host-bits", NODE + "  pod_cidrs:\n    - 198.19.1.1/24\n", 5,
     "node.pod_cidrs[0]: 198.19.1.1/24 has host bits set; did you mean 198.19.1.0/24?"),
    ("pod-cidr-holds-node", NODE + "  pod_cidrs: [198.18.0.0/24]\n", 4, "holds this node's own address 198.18.0.10"),
    ("pod-cidr-duplicate", NODE + "  pod_cidrs:\n    - 198.19.1.0/24\n    - 198.19.1.0/24\n", 6,
     "node.pod_cidrs[1]: duplicate 198.19.1.0/24 (first on line 5)"),
    ("pod-cidr-overlap", NODE + "  pod_cidrs:\n    - 198.19.0.0/16\n    - 198.19.1.0/24\n", 6,
     "node.pod_cidrs[1]: 198.19.1.0/24 overlaps 198.19.0.0/16 (line 5)"),
    ("etcd-no-endpoints-key", NODE + "etcd:\n  ttl: 30\n", 5, "missing required key 'endpoints' in etcd"),
    ("etcd-no-endpoints", NODE + "etcd:\n  endpoints: []\n", 5, "etcd.endpoints: name at least one"),
    ("etcd-endpoint-scheme", NODE + "etcd:\n  endpoints:\n    - 198.18.0.1:2379\n", 6,
     "etcd.endpoints[0]: expected http://host:port or https://host:port, got '198.18.0.1:2379'"),
    ("etcd-endpoint-path", NODE + "etcd:\n  endpoints: [http://198.18.0.1:2379/v3]\n", 5,
     "give only scheme, host and port"),
    ("etcd-endpoint-port", NODE + "etcd:\n  endpoints: ['http://198.18.0.1:99999']\n", 5, "etcd.endpoints[0]: invalid URL"),
    ("etcd-endpoints-mixed", NODE + "etcd:\n  endpoints: [http://a:2379, https://b:2379]\n", 5,
     "mixes http:// and https://"),
    ("etcd-prefix-slash", NODE + "etcd:\n  endpoints: [http://a]\n  prefix: coreos.com/network/\n", 6,
     "etcd.prefix: 'coreos.com/network/' must start with '/', and not end with one; did you mean '/coreos.com/network'?"),
    ("etcd-ttl-low", NODE + "etcd:\n  endpoints: [http://a]\n  ttl: 2\n", 6, "etcd.ttl: 2 is out of range 5..86400"),
    ("etcd-typo", NODE + "etcd:\n  endpoint: [http://a]\n", 5, "did you mean 'endpoints'?"),
    ("etcd-tls-on-http", NODE + "etcd:\n  endpoints: [http://a]\n  tls: {ca: /dev/null}\n", 6,
     "etcd.tls: needs https:// endpoints"),
    ("etcd-tls-unreadable", NODE + "etcd:\n  endpoints: [https://a]\n  tls:\n    ca: /nonexistent/ca.pem\n", 7,
     "etcd.tls.ca: cannot read '/nonexistent/ca.pem'"),
    ("etcd-tls-cert-alone", NODE + "etcd:\n  endpoints: [https://a]\n  tls:\n    cert: /dev/null\n", 7,
     "etcd.tls: cert without key"),
    ("via-self-before-node", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n  - {cidr: 198.19.2.0/24,"
     " via: 198.18.0.10}\n" + NODE, 3, "routes[1].via: 198.18.0.10 is this node's own address"),
    ("route-alias-duplicate", NODE + "routes:\n  - &r {cidr: 198.19.1.0/24, via: 198.18.0.11}\n  - *r\n", 5,
     "routes[1]: duplicate route for 198.19.1.0/24; routes[0] on line 5"),  # an alias is its anchor's node
    ("route-undefined-alias", NODE + "routes:\n  - {cidr: 198.19.1.0/24, via: *nope}\n", 5,
     "invalid YAML: found undefined alias 'nope'"),
    ("route-key-twice", NODE + "routes:\n  - {cidr: 198.19.1.0/24, cidr: 198.19.2.0/24, via: 198.18.0.11}\n", 5,
     "duplicate key 'cidr' in routes[0]"),
    ("route-value-list", NODE + "routes:\n  - {cidr: [198.19.1.0/24], via: 198.18.0.11}\n", 5,
     "routes[0].cidr: expected a string, got a list"),
    ("route-via-float", NODE + "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18}\n", 5,
     "routes[0].via: expected a string, got float 198.18"),
    ("routes-second-error-in-list", NODE + "routes:\n" + "  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n" * 1
     + "  - {cidr: 198.19.2.0/24, via: 198.18.0.311}\n", 6, "routes[1].via: invalid IPv4 address"),
    ("kernel-learn-string", NODE + "kernel:\n  learn: 'yes'\n", 5, "kernel.learn: expected true or false"),
    ("kernel-resync-negative", NODE + "kernel:\n  resync: -1\n", 5, "kernel.resync: -1 is out of range 0..86400"),
    ("kernel-unknown-key", NODE + "kernel:\n  lern: true\n", 5, "unknown key 'lern' in kernel; did you mean 'learn'?"),
    ("duplicate-route", NODE + "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n"
     "  - {cidr: 198.19.2.0/24, via: 198.18.0.11}\n  - {cidr: 198.19.1.0/24, via: 198.18.0.12}\n",
     7, "routes[2]: duplicate route for 198.19.1.0/24; routes[0] on line 5 already routes it"),
]


@pytest.mark.parametrize("text, line, reason", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_error_names_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, "ipipfast.yaml")
    assert (e.value.source, e.value.line) == ("ipipfast.yaml", line)
    assert reason in e.value.reason
    assert str(e.value) == f"ipipfast.yaml:{line}: {e.value.reason}"


def test_empty_config_has_no_line() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("# only a comment\n", "c.yaml")
    assert e.value.line is None
    assert str(e.value) == "c.yaml: the config is empty; it needs at least node.ip"


def test_etcd_tls(tmp_path: Path) -> None:
    for name in ("ca.pem", "node.pem", "node-key.pem"):
        (tmp_path / name).write_text("")
    text = NODE + f"etcd:\n  endpoints: [https://198.18.0.1:2379]\n  tls:\n    ca: {tmp_path}/ca.pem\n" \
        f"    cert: {tmp_path}/node.pem\n    key: {tmp_path}/node-key.pem\n"
    assert parse_config(text).etcd == EtcdConfig(
        (EtcdEndpoint("https", "198.18.0.1", 2379),),
        tls=EtcdTLS(f"{tmp_path}/ca.pem", f"{tmp_path}/node.pem", f"{tmp_path}/node-key.pem"))
    assert str(EtcdEndpoint("https", "fd00::1", 2379)) == "https://[fd00::1]:2379"


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "file, node_ip, expected",
    [
        ("node: {interface: eth0}\n", "198.18.0.10", NodeConfig(IPv4Interface("198.18.0.10"), "eth0",
                                                                prefixlen_given=False)),
        ("tunnel: {name: tunl0}\n", "198.18.0.10/24", NodeConfig(IPv4Interface("198.18.0.10/24"))),
        ("# all defaults\n", "198.18.0.10/24", NodeConfig(IPv4Interface("198.18.0.10/24"))),
        ("node: {ip: 198.18.0.99/24, interface: eth0}\n", "198.18.0.10", NodeConfig(IPv4Interface("198.18.0.10"),
                                                                                    "eth0", prefixlen_given=False)),
    ],
    ids=["ip-from-the-command-line", "no-node-section", "empty-file", "over-the-file"],
)
def test_node_ip_from_the_command_line(file: str, node_ip: str, expected: NodeConfig) -> None:
    assert parse_config(file, "c.yaml", node_ip=node_ip).node == expected


def test_a_bad_node_ip_names_the_option() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config("node: {interface: eth0}\n", "c.yaml", node_ip="198.18.0.300")
    assert str(e.value).startswith("c.yaml with --node-ip: node.ip: invalid IPv4 address '198.18.0.300'")
    with pytest.raises(ConfigError, match="loopback"):
        parse_config("", "c.yaml", node_ip="127.0.0.1")


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "ipipfast.yaml"
    path.write_text(FULL)
    assert load_config(path) == parse_config(FULL)
    path.write_text(NODE + "tunnel:\n  mtu: 1\n")
    with pytest.raises(ConfigError, match=r"ipipfast\.yaml:5: tunnel\.mtu"):
        load_config(path)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config") as e:
        load_config(tmp_path / "nope.yaml")
    assert e.value.line is None


def test_config_from_dict_accepts_python_objects() -> None:
    config = config_from_dict(
        {
            "node": {"ip": IPv4Interface("198.18.0.10/24"), "interface": "eth0"},
            "tunnel": {"mode": Mode.CROSS_SUBNET, "ttl": 64},
            "stats": {"listen": "127.0.0.1:0"},
            "routes": (
                {"cidr": IPv4Network("198.19.1.0/24"), "via": IPv4Address("198.18.0.11")},
                {"cidr": "198.19.2.0/24", "via": "198.18.1.12"},
            ),
        }
    )
    assert config == Config(
        node=DEFAULT_NODE,
        tunnel=TunnelConfig(mode=Mode.CROSS_SUBNET, ttl=64, pmtudisc=True),
        stats=StatsConfig(listen=("127.0.0.1", 0)),
        routes=routes(("198.19.1.0/24", "198.18.0.11"), ("198.19.2.0/24", "198.18.1.12")),
    )


def test_config_from_dict_matches_yaml() -> None:
    assert config_from_dict(yaml.safe_load(FULL)) == parse_config(FULL)


@pytest.mark.parametrize(
    "d, reason",
    [
        ({"node": {"ip": "198.18.0.10", "interface": "eth0"}, "tunnel": {"mtu": "1400"}}, "tunnel.mtu: expected an integer"),
        ({"node": {"interface": "eth0"}}, "missing required key 'ip' in node"),
        ({"node": {"ip": object(), "interface": "eth0"}}, "cannot represent an object"),
        (
            {"node": {"ip": "198.18.0.10", "interface": "eth0"},
             "routes": [{"cidr": "198.19.1.0/24", "via": "198.18.0.11"}] * 2},
            "routes[1]: duplicate route for 198.19.1.0/24; routes[0] already routes it",
        ),
    ],
    ids=["wrong-type", "missing-key", "unrepresentable", "duplicate-route"],
)
def test_config_from_dict_errors_have_no_line(d: dict, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        config_from_dict(d, "testbed")
    assert e.value.line is None and e.value.source == "testbed"
    assert reason in e.value.reason
    assert str(e.value) == f"testbed: {e.value.reason}"


def _cidr_lines_by_compose(text: str) -> list[int]:
    """The line of each route's cidr value, from PyYAML's own composer."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    routes = next(v for k, v in root.value if k.value == "routes")
    return [next(v for k, v in item.value if k.value == "cidr").start_mark.line + 1 for item in routes.value]


@pytest.mark.parametrize("seed", range(4))
def test_streamed_routes_match_yaml_itself(seed: int) -> None:
    """The event reader against PyYAML's pure-Python loader and composer:
    the same routes, and each route's detail is its cidr's line."""
    import random

    rng = random.Random(seed)
    lines = [NODE, "routes:\n"]
    for i in range(300):
        cidr, via = f"198.19.{i // 4}.{i % 4 * 64}/26", f"198.18.{rng.randrange(4)}.{rng.randrange(11, 250)}"
        lines.append(rng.choice([
            f"  - {{cidr: {cidr}, via: {via}}}\n",
            f"  - cidr: {cidr}\n    via: {via}\n",
            f"  - via: '{via}'\n    cidr: \"{cidr}\"\n",
            f"  -\n    cidr: {cidr}  # a comment\n\n    via: {via}\n",
        ]))
    text = "".join(lines)
    config = parse_config(text)
    expected = config_from_dict(yaml.load(text, Loader=yaml.SafeLoader))
    assert config.routes == expected.routes and len(config.routes) == 300
    by_key = dict(zip(config.routes.keys, config.routes.details))
    assert [by_key[r.key] for r in expected_in_file_order(text)] == _cidr_lines_by_compose(text)


def expected_in_file_order(text: str) -> list[Route]:
    return [Route.parse(r["cidr"], r["via"]) for r in yaml.load(text, Loader=yaml.SafeLoader)["routes"]]


def test_command_line_overrides_keep_the_routes(tmp_path: Path) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(FULL)
    config = load_config(path, {"workers": 4, "tos": "inherit"})
    assert (config.tunnel.workers, config.tunnel.tos, config.tunnel.batch) == (4, None, 128)
    assert config.routes == parse_config(FULL).routes
    with pytest.raises(ConfigError) as e:  # FULL says pmtudisc: false
        load_config(path, {"ttl": 64})
    assert e.value.source == f"{path} with --ttl" and e.value.line is None


ROUTE_LINE_CASES = [
    # (id, the routes section and what follows it, whether the line reader takes it)
    ("flow", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n  - {via: 198.18.0.12, cidr: 198.19.2.0/26}\n", True),
    ("block-at-column-0", "routes:\n- cidr: 198.19.1.0/24\n  via: 198.18.0.11\n- via: 198.18.0.12\n  cidr: 198.19.2.7\n", True),
    ("block-indented-wide", "routes:\n    -   cidr: 198.19.1.0/24\n        via: 198.18.0.11\n", True),
    ("comments-and-blanks", "routes:  # ours\n\n  # a comment\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}  # one\n"
     "\n  - cidr: 198.19.2.0/24 # two\n    via: 198.18.0.12\nkernel: {learn: false}\n", True),
    ("followed-by-a-key", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\nstats: {listen: ':0'}\n", True),
    ("hash-without-space-is-in-the-value", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11#x}\n", False),
    ("leading-zero", "routes:\n  - {cidr: 198.19.01.0/24, via: 198.18.0.11}\n", False),
    ("octet-too-big", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.256}\n", False),
    ("host-bits", "routes:\n  - {cidr: 198.19.1.1/24, via: 198.18.0.11}\n", False),
    ("tunnel-loop", "routes:\n  - {cidr: 198.18.0.0/16, via: 198.18.0.11}\n", False),
    ("via-self", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.10}\n", True),
    ("duplicate", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n  - {cidr: 198.19.1.0/24, via: 198.18.0.12}\n", True),
    ("mixed-indentation", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n    - {cidr: 198.19.2.0/24, via: 198.18.0.11}\n", False),
    ("second-key-misaligned", "routes:\n  - cidr: 198.19.1.0/24\n   via: 198.18.0.11\n", False),
    ("tab", "routes:\n\t- {cidr: 198.19.1.0/24, via: 198.18.0.11}\n", False),
    ("crlf", "routes:\r\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\r\n", False),
    ("two-routes-keys", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\nroutes:\n  - {cidr: 198.19.2.0/24, via: 198.18.0.11}\n", False),
    ("second-document", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11}\n---\n" + NODE, False),
    ("quoted", "routes:\n  - {cidr: '198.19.1.0/24', via: \"198.18.0.11\"}\n", False),
    ("extra-key", "routes:\n  - {cidr: 198.19.1.0/24, via: 198.18.0.11, x: 1}\n", False),
]


@pytest.mark.parametrize("section, taken", [c[1:] for c in ROUTE_LINE_CASES], ids=[c[0] for c in ROUTE_LINE_CASES])
def test_route_lines_read_what_yaml_reads(section: str, taken: bool) -> None:
    """The line reader against the event reader on the whole text: the same
    routes with the same lines, or the same error at the same line."""
    from ipipfast import config as config_module
    from ipipfast.route_lines import cut

    for text in (NODE + section, section + NODE.replace("\r", "")):
        assert (cut(text) is not None) == taken, text
        try:
            want = config_module._parse(text, "c.yaml", config_module._Overrides({}, None), None)
        except ConfigError as e:
            with pytest.raises(ConfigError) as got:
                parse_config(text, "c.yaml")
            assert (got.value.line, got.value.reason) == (e.line, e.reason)
        else:
            got = parse_config(text, "c.yaml")
            assert got == want and list(got.routes.details) == list(want.routes.details)
