"""Lab names and addresses: short enough for Linux, distinct between labs, private to the machine."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from fleet.lab.layout import MAX_HOSTS, Layout, preferred_octet, tag_for


def test_interface_names_fit_linux_limit_for_every_host():
    layout = Layout(Path("/srv/some/long/checkout/path/fleetdns"), 7)
    names = [layout.bridge, layout.dns_veth] + [layout.veth(i) for i in range(1, MAX_HOSTS + 1)]
    assert max(len(n) for n in names) <= 15
    assert len(set(names)) == len(names)


def test_two_homes_get_different_tags_and_usually_different_subnets():
    a, b = Path("/work/main"), Path("/tmp/pytest-of-root/lab-home0")
    assert tag_for(a) != tag_for(b)
    assert tag_for(a) == tag_for(a)
    assert 1 <= preferred_octet(a) <= 250


def test_addresses_are_private_and_inside_the_lab_network():
    layout = Layout(Path("/x"), 42)
    addresses = [layout.bridge_address, layout.dns_address] + [layout.address(i) for i in range(1, MAX_HOSTS + 1)]
    assert len(set(addresses)) == len(addresses)
    for address in addresses:
        ip = ipaddress.IPv4Address(address)
        assert ip.is_private and ip in layout.network and ip != layout.network.broadcast_address
