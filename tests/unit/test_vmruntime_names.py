"""The VM runtime's pure naming and addressing (no machine changes)."""

from __future__ import annotations

import pytest

from gtvp_local.vmruntime import names


def test_everything_is_prefixed_and_fits_ifnamsiz() -> None:
    for octet in (names.FIRST_HOST, 99, names.LAST_HOST):
        for ifname in (names.host_veth(octet), names.member_veth(octet)):
            assert ifname.startswith("gtvpvm")
            assert len(ifname) <= names.IFNAMSIZ
    assert names.BRIDGE.startswith("gtvpvm")
    assert len(names.BRIDGE) <= names.IFNAMSIZ
    assert names.netns_name("node-1") == "gtvpvm-node-1"


def test_octet_out_of_range_is_refused() -> None:
    for bad in (0, 1, 255):
        with pytest.raises(ValueError, match="outside"):
            names.host_veth(bad)


@pytest.mark.parametrize(
    "member", ["node-1", "Node_1", "a" * 80, "x/../y", "", "ünïcode", "kind-worker2"]
)
def test_netns_names_are_sanitized_and_short(member: str) -> None:
    ns = names.netns_name(member)
    assert ns.startswith("gtvpvm-")
    assert len(ns) <= names.NETNS_MAX
    assert all((c.isalnum() and c.isascii()) or c == "-" for c in ns)


def test_sanitized_names_stay_distinct() -> None:
    # names that clean to the same text keep a hash of the original
    assert names.netns_name("Node_1") != names.netns_name("node-1")
    assert names.netns_name("a" * 80) != names.netns_name("a" * 81)
    assert names.sanitize("node-1", 20) == "node-1"


def test_allocation_is_stable_and_skips_taken_octets() -> None:
    assigned = {"node-1": 2}
    assert names.allocate(assigned, "node-1") == 2
    assert names.allocate(assigned, "node-2") == 3
    assert names.allocate(assigned, "node-2", taken={3, 4}) == 5
    assert names.allocate({}, "x", taken={2}) == 3
    full = {f"m{i}": i for i in range(names.FIRST_HOST, names.LAST_HOST + 1)}
    with pytest.raises(RuntimeError, match="no free address"):
        names.allocate(full, "one-more")
    assert names.address(7) == "10.77.0.7"


def test_octets_in_use_reads_only_our_host_veths() -> None:
    links = ["lo", "eth0", "gtvp0", "gtvpvm-br0", "gtvpvm-h2", "gtvpvm-h17@if3", "gtvpvm-m4"]
    assert names.octets_in_use(links) == {2, 17}


def test_process_names_and_ports() -> None:
    assert names.process_name("web", 0) == "gtvpvm-web.0"
    assert names.process_name("gtvp-samples/web", 3).startswith("gtvpvm-gtvp-samples-web")
    port = names.migration_port("web")
    assert port == names.migration_port("web")
    assert 49152 <= port < 49152 + 8192
