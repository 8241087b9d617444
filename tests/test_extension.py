"""The extension a node loads, ipipfast._datapath, holds the datapath and
its API alone; the tests' entry points into the same C are a second
extension, ipipfast_lab.packets."""
from __future__ import annotations

from ipipfast import _datapath
from ipipfast_lab import packets


def test_the_node_extension_holds_no_test_entry_point():
    entry_points = {n for n, v in vars(packets).items()
                    if not n.startswith("_") and getattr(v, "__module__", None) == packets.__name__}
    assert entry_points >= {"Dropped", "Lpm", "Tunnel", "TxRing", "checksum", "coalesce", "coalesce_rounds",
                            "icmp_error"}
    assert not entry_points & set(vars(_datapath))


def test_the_datapath_api_is_what_the_daemon_uses():
    def public(cls: type) -> set[str]:
        return {n for n in dir(cls) if not n.startswith("_")}
    assert public(_datapath.Datapath) == {"add_workers", "send_icmp_error", "set_mtu", "set_peer_pmtu", "set_table",
                                         "sink_fileno", "snapshot", "stop"}
    assert public(_datapath.Worker) == {"ring_frames", "run_decap", "run_encap"}
