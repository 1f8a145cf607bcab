"""lb.hostnet: full NAT's ports against the kernel's ephemeral ones (no
namespace needed); then, in the lab's lb namespace, IPv6 listener addresses
placed and removed, and lb's IPv6 address toward a target with its neighbour
resolved (what full NAT and DSR need of the host)."""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import pytest

from lb import config as configmod
from lb import lab as labmod
from lb import netlink as nl
from lb.hostnet import ADDRESS_PROTO, full_nat_port_clash, place_addresses, remove_addresses, xdp_interfaces
from lb.lab import Lab

CONFIG = """
[load_balancer]
name = "h"
{range}
[[listeners]]
name = "tcp"
protocol = "TCP"
address = "10.0.0.100"
port = 9000
default_action = {{ type = "forward", target_group = "tcp" }}
[[target_groups]]
name = "tcp"
protocol = "TCP"
port = 9000
preserve_client_ip = {preserve}
targets = [{{ id = "10.0.1.11" }}]
"""


def ephemeral(tmp_path: Path, low: int, high: int) -> str:
    path = tmp_path / "ip_local_port_range"
    path.write_text(f"{low}\t{high}\n")
    return str(path)


@pytest.mark.parametrize("range_, preserve, low, high, clash", [
    ("", "false", 32768, 60999, False),  # the defaults: 1024-32767 below Linux's 32768-60999
    ("", "false", 30000, 60999, True),  # a host whose ephemeral ports start lower
    ("full_nat_port_range = [40000, 50000]", "false", 32768, 60999, True),
    ("full_nat_port_range = [40000, 50000]", "true", 32768, 60999, False),  # no full-NAT group: no matter
    ("full_nat_port_range = [61000, 65535]", "false", 32768, 60999, False),
])
def test_full_nat_ports_against_the_ephemeral_range(tmp_path: Path, range_: str, preserve: str, low: int, high: int,
                                                    clash: bool) -> None:
    config = configmod.loads(CONFIG.format(range=range_, preserve=preserve))
    warning = full_nat_port_clash(config, ephemeral(tmp_path, low, high))
    assert (warning is not None) == clash
    if warning:
        assert "full_nat_port_range" in warning and f"{low}-{high}" in warning


def test_an_unreadable_range_is_no_warning(tmp_path: Path) -> None:
    config = configmod.loads(CONFIG.format(range="", preserve="false"))
    assert full_nat_port_clash(config, str(tmp_path / "absent")) is None


IPV6 = """
[load_balancer]
name = "h6"
[[listeners]]
name = "on-link"
protocol = "TCP"
address = "fd00::100"
port = 9000
default_action = { type = "forward", target_group = "six" }
[[listeners]]
name = "routed"
protocol = "UDP"
address = "fd00:5::100"
port = 9000
default_action = { type = "forward", target_group = "six-udp" }
[[target_groups]]
name = "six"
protocol = "TCP"
port = 9000
targets = [{ id = "fd00:1::11" }, { id = "fd00:1::12" }]
[[target_groups]]
name = "six-udp"
protocol = "UDP"
port = 9000
targets = [{ id = "fd00:1::13" }]
"""

IFA_F_TENTATIVE = 0x40  # uapi/linux/if_addr.h


@pytest.mark.root
def test_ipv6_listener_addresses_are_placed_usable_at_once_and_removed(lab: Lab) -> None:
    """In a connected subnet: on that interface; else on lo; /128, marked as
    lb's, not tentative (no DAD: a tentative address answers no neighbour
    solicitation), and removed by remove_addresses."""
    config = configmod.loads(IPV6)
    placed = nl.run_in_netns(lab.lb_ns, place_addresses, config)
    try:
        assert placed == [(labmod.LB_CLIENT_IF, "fd00::100", 128), ("lo", "fd00:5::100", 128)]
        with nl.iproute(lab.lb_ns) as ipr:
            for ifname, address, _ in placed:
                entry = next(a for a in ipr.get_addr(family=10, index=nl.ifindex(ipr, ifname))
                             if a.get_attr("IFA_ADDRESS") == address)
                assert entry["prefixlen"] == 128
                assert int(entry.get_attr("IFA_PROTO") or 0) == ADDRESS_PROTO
                flags = entry.get_attr("IFA_FLAGS") or entry["flags"]
                assert not flags & IFA_F_TENTATIVE, hex(flags)
        # a second lb up finds them, and takes them as its own (the state file lists them)
        assert sorted(nl.run_in_netns(lab.lb_ns, place_addresses, config, placed)) == sorted(placed)
    finally:
        assert sorted(remove_addresses(placed, lab.lb_ns)) == ["fd00:5::100", "fd00::100"]
    with nl.iproute(lab.lb_ns) as ipr:
        assert nl.find_address(ipr, "fd00::100") is None and nl.find_address(ipr, "fd00:5::100") is None


@pytest.mark.root
def test_the_xdp_interfaces_follow_the_ipv6_routes(lab: Lab) -> None:
    config = configmod.loads(IPV6)
    found = nl.run_in_netns(lab.lb_ns, xdp_interfaces, config)
    # fd00::100 on the client link; fd00:5::100 has no route (lo); the targets by their host routes
    assert found == [labmod.LB_CLIENT_IF, *(b.lb_ifname for b in lab.backends)]


@pytest.mark.root
def test_lbs_ipv6_address_toward_a_target_and_its_neighbour(lab: Lab) -> None:
    backend = lab.backends[1]
    with nl.iproute(lab.lb_ns) as ipr:
        index = nl.ifindex(ipr, backend.lb_ifname)
        for entry in ipr.get_neighbours(family=10, ifindex=index):
            if entry.get_attr("NDA_DST") == backend.address6:
                ipr.neigh("del", dst=backend.address6, ifindex=index)
    source = nl.source_toward(ipaddress.IPv6Address(backend.address6), lab.lb_ns)
    assert source == ipaddress.IPv6Address(labmod.BACKEND_GATEWAY6)
    deadline = time.monotonic() + 5
    while True:  # the neighbour solicitation went out; the backend answers it
        with nl.iproute(lab.lb_ns) as ipr:
            states = [n.get_attr("NDA_LLADDR") for n in ipr.get_neighbours(family=10, ifindex=index)
                      if n.get_attr("NDA_DST") == backend.address6]
        if any(states) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert any(states), "no neighbour entry with a MAC for the target"
    assert nl.source_toward(ipaddress.IPv6Address("fd00:7::1"), lab.lb_ns) is None  # no route: none
