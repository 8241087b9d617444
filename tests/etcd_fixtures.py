"""The fixtures of the tests on a real etcd: a testbed of three nodes and a
control-plane host, etcd on it, and a key prefix of each test's own."""
from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from ipipfast_lab.etcd import EtcdServer
from ipipfast_lab.testbed import Testbed


@pytest.fixture(scope="module")
def tb() -> Iterator[Testbed]:
    with Testbed(nodes=3, control_plane=True) as bed:
        yield bed


@pytest.fixture(scope="module")
def etcd(tb: Testbed) -> Iterator[EtcdServer]:
    with EtcdServer(tb) as server:
        yield server


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A prefix of the test's own, so the tests share one etcd."""
    return "/" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-") + "/coreos.com/network"
