"""flannel's subnet keys and lease values, as its nodes write them."""
from ipaddress import IPv4Address, IPv4Network

import pytest

from ipipfast.etcd import parse_attrs, parse_subnet_key, subnet_key


@pytest.mark.parametrize("tail, cidr", [
    ("10.5.52.0-24", "10.5.52.0/24"),
    ("10.244.0.0-16", "10.244.0.0/16"),
    ("198.19.1.7-32", "198.19.1.7/32"),
    ("10.5.52.0-24&fc00:0:0:52::-64", "10.5.52.0/24"),  # dual stack: the IPv4 part
])
def test_subnet_keys(tail: str, cidr: str) -> None:
    assert parse_subnet_key(tail) == IPv4Network(cidr)
    if "&" not in tail:
        assert subnet_key(IPv4Network(cidr)) == tail


@pytest.mark.parametrize("tail, reason", [
    ("10.5.52.1-24", "10.5.52.1/24 has host bits set; did you mean 10.5.52.0/24?"),
    ("10.5.52.0-33", "invalid IPv4 CIDR"),
    ("10.5.52.0/24", "not a subnet key"),
    ("config", "not a subnet key"),
    ("x10.5.52.0-24", "not a subnet key"),
    ("10.5.52.0-24/extra", "not a subnet key"),
])
def test_bad_subnet_keys(tail: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_subnet_key(tail)


@pytest.mark.parametrize("value, expected", [
    (b'{"PublicIP":"192.168.64.3","BackendType":"ipip","BackendData":null}', ("192.168.64.3", "ipip")),
    (b'{"PublicIP":"192.168.64.3","BackendType":"ipip"}', ("192.168.64.3", "ipip")),  # Go's omitempty
    (b'{"PublicIP":"192.168.64.4","PublicIPv6":"fc00::4","BackendType":"vxlan",'
     b'"BackendData":{"VNI":1,"VtepMAC":"6a:5e:2d:1c:0b:fa"},"BackendV6Data":null}', ("192.168.64.4", "vxlan")),
    (b'{"PublicIP":"192.168.64.5"}', ("192.168.64.5", "")),  # no backend: not ipip
])
def test_lease_values(value: bytes, expected: tuple[str, str]) -> None:
    ip, backend = parse_attrs(value)
    assert (ip, backend) == (IPv4Address(expected[0]), expected[1])


@pytest.mark.parametrize("value, reason", [
    (b"", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b'["192.168.64.3"]', "not a JSON object"),
    (b'{"BackendType":"ipip"}', "PublicIP is missing"),
    (b'{"PublicIP":3232251907}', "PublicIP is missing or not a string"),
    (b'{"PublicIP":"192.168.64"}', "invalid IPv4 address"),
    (b'{"PublicIP":"192.168.64.3","BackendType":4}', "BackendType is not a string"),
])
def test_bad_lease_values(value: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_attrs(value)
