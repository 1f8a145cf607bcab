"""Dataplane and Maps with IPv6 VIPs and targets, on real pinned maps (made
from map_specs, no program loaded: what userspace writes is checked here,
the packet path by the XDP fixtures).

One id space for both families: an IPv6 VIP goes to `vips6`, its targets to
`targets6` (their `targets` slots zero), its ring into the shared `rings`,
its NAT replies to `replies6` with their ports in the shared `reply_ports`;
full NAT's source to `fullnat_srcs6`. A restart adopts all of it; an id
that moves from one family to the other leaves nothing behind in the first;
connection termination walks `conntrack6` and `half_open6` too.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from lb.dataplane.dataplane import Dataplane, DataplaneError, L4Service
from lb.dataplane.loader import open_maps, purge_pins
from lb.dataplane.maps import Endpoint, IPAddress, Maps, VipAddr
from lb.dataplane.pins import pin_dir
from lb.dataplane.structs import (
    FWD_FULLNAT,
    NO_TARGET,
    TABLE_CONNTRACK6,
    TABLE_HALF_OPEN6,
    FlowKey6,
    FlowState,
    FlowState6,
    HalfOpenFlow,
    HalfOpenFlow6,
    Limits,
    MapName,
    TrafficStats,
    fill_removed_by_lb,
    ip6_to_net,
    port_to_net,
)
from lb.inspect.access import InspectError
from lb.inspect.names import parse_endpoint, vip_dict
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("dp6")
LIMITS = Limits(ring_size=251, max_vips=8, max_targets=6, conntrack_size=1024, half_open_size=1024)
VIP6 = VipAddr(IPv6Address("fd00::100"), 9000, "TCP")
VIP4 = VipAddr(IPv4Address("10.0.0.100"), 9000, "TCP")
T6 = [Endpoint(IPv6Address(f"fd00:1::1{i}"), 9000) for i in (1, 2, 3)]
T4 = [Endpoint(IPv4Address(f"10.0.1.1{i}"), 9000) for i in (1, 2, 3)]
SOURCE6 = IPv6Address("fd00:1::1")


def source_of(address: IPAddress) -> IPAddress | None:
    return SOURCE6 if address.version == 6 else IPv4Address("10.0.1.1")


@pytest.fixture()
def maps() -> Iterator[Maps]:
    purge_pins(NAME)
    os.makedirs(pin_dir(NAME), exist_ok=True)
    try:
        for fd in open_maps(pin_dir(NAME), LIMITS).values():
            os.close(fd)
        with Maps(pin_dir(NAME), LIMITS) as opened:
            yield opened
    finally:
        purge_pins(NAME)


def service(vip: VipAddr, targets: list[Endpoint], mode: str = "nat", **kw: object) -> L4Service:
    return L4Service(vip, members=tuple((t, 1) for t in targets), mode=mode, **kw)  # type: ignore[arg-type]


def raw_lookup(maps: Maps, map_name: MapName, key: int) -> object:
    return maps.raw(map_name).lookup(ctypes.c_uint32(key))


def test_an_ipv6_vip_beside_an_ipv4_one_shares_the_id_space(maps: Maps) -> None:
    dp = Dataplane(maps, source_of=source_of)
    dp.apply([service(VIP4, T4), service(VIP6, T6)])

    vips = {e.vip: e for e in maps.vips()}
    assert set(vips) == {VIP4, VIP6}
    assert vips[VIP4].vip_id != vips[VIP6].vip_id
    assert len(list(maps.raw(MapName.VIPS6).items())) == len(list(maps.raw(MapName.VIPS).items())) == 1
    ids = {t.endpoint: t.target_id for t in maps.targets()}
    assert set(ids) == set(T4) | set(T6) and len(set(ids.values())) == 6  # one id each, both families
    for endpoint, target_id in ids.items():
        v4, v6 = raw_lookup(maps, MapName.TARGETS, target_id), raw_lookup(maps, MapName.TARGETS6, target_id)
        assert (getattr(v4, "addr") != 0) == (endpoint.address.version == 4)  # the other family's slot is zero
        assert any(getattr(v6, "addr").words) == (endpoint.address.version == 6)
    ring6 = set(dp.ring(VIP6)) - {NO_TARGET}
    assert ring6 == {ids[t] for t in T6}  # an IPv6 VIP's ring names IPv6 targets only
    assert set(dp.ring(VIP4)) - {NO_TARGET} == {ids[t] for t in T4}

    routes = {(r.endpoint, r.protocol): r for r in maps.routes()}
    assert set(routes) == {(t, "TCP") for t in T4 + T6}
    assert [v.vip for v in routes[(T6[0], "TCP")].vips] == [VIP6]
    assert len(list(maps.raw(MapName.REPLIES6).items())) == 3
    assert maps.reply_ports() == {9000}

    assert str(VIP6) == "TCP [fd00::100]:9000" and str(T6[0]) == "[fd00:1::11]:9000"
    assert vip_dict(VIP6)["vip"] == "[fd00::100]:9000" and vip_dict(VIP6)["address"] == "fd00::100"


def test_full_nat_and_dsr_write_the_ipv6_source_and_no_replies(maps: Maps) -> None:
    dp = Dataplane(maps, source_of=source_of)
    dsr_vip = VipAddr(IPv6Address("fd00::101"), 9000, "TCP")
    dp.apply([service(VIP6, T6[:2], "full-nat"), service(dsr_vip, T6[2:], "dsr")])
    for t in T6:
        target_id = dp.target_id(t)
        assert target_id is not None
        assert maps.fullnat_source(target_id) == SOURCE6
        assert raw_lookup(maps, MapName.FULLNAT_SOURCES, target_id).value == 0  # type: ignore[attr-defined]
    assert maps.routes() == [] and maps.reply_ports() == set()
    assert {e.vip: e.mode for e in maps.vips()} == {VIP6: "full-nat", dsr_vip: "dsr"}


def test_a_restart_adopts_ipv6_ids_and_changes_nothing(maps: Maps) -> None:
    services = [service(VIP4, T4), service(VIP6, T6)]
    first = Dataplane(maps, source_of=source_of)
    first.apply(services)
    ids = {t: first.target_id(t) for t in T4 + T6}
    vips = {e.vip: e.vip_id for e in maps.vips()}
    again = Dataplane(maps, source_of=source_of)
    assert {t: again.target_id(t) for t in T4 + T6} == ids
    report = again.apply(services)
    assert not (report.vips_added or report.vips_removed or report.targets_added or report.targets_retired)
    assert {e.vip: e.vip_id for e in maps.vips()} == vips


def test_an_id_that_changes_family_leaves_nothing_in_the_other(maps: Maps) -> None:
    dp = Dataplane(maps, source_of=source_of)
    dp.apply([service(VIP6, T6, end_flows_on_removal=True)])
    dp.apply([])  # every IPv6 target retired: their ids free
    assert [t.active for t in maps.targets()] == [False, False, False]
    more = [Endpoint(IPv4Address(f"10.0.2.{i}"), 9000) for i in range(1, 7)]  # needs all six ids
    dp.apply([service(VIP4, more, end_flows_on_removal=True)])
    targets = maps.targets()
    assert sorted(t.endpoint for t in targets) == sorted(more)  # each id once, the IPv6 slots zeroed
    assert not any(any(raw_lookup(maps, MapName.TARGETS6, i).addr.words)  # type: ignore[attr-defined]
                   for i in range(LIMITS.max_targets))
    assert maps.vips() == [e for e in maps.vips() if e.vip == VIP4]


def test_a_vip_with_targets_of_the_other_family_is_refused_before_any_write(maps: Maps) -> None:
    dp = Dataplane(maps, source_of=source_of)
    with pytest.raises(DataplaneError, match=r"TCP \[fd00::100\]:9000: a flow stays within one family; "
                                             r"targets of the other: 10.0.1.11:9000"):
        dp.apply([service(VIP6, [T6[0], T4[0]])])
    assert maps.vips() == [] and maps.targets() == []


def _count_traffic(maps: Maps, target_id: int) -> None:
    """As if the target had forwarded a packet (delete_flows skips targets that never did)."""
    stats = maps.raw(MapName.TARGET_STATS)
    cells = stats.lookup(ctypes.c_uint32(target_id))
    assert cells is not None
    cells[0] = TrafficStats(1, 60, 1, 0, 0)
    stats.update(ctypes.c_uint32(target_id), cells)


def _key6(client: str, sport: int, vip: VipAddr) -> FlowKey6:
    return FlowKey6(ip6_to_net(client), ip6_to_net(str(vip.address)), port_to_net(sport), port_to_net(vip.port), 6)


def test_ipv6_flows_are_read_and_ended_with_their_target(maps: Maps) -> None:
    dp = Dataplane(maps, source_of=source_of)
    health = [service(VIP6, T6, "full-nat")]
    dp.apply(health)
    doomed, kept = dp.target_id(T6[0]), dp.target_id(T6[1])
    assert doomed is not None and kept is not None
    vip_id = next(e.vip_id for e in maps.vips() if e.vip == VIP6)
    gen = maps.vip_gen(vip_id)
    conntrack6, half_open6 = maps.raw(MapName.CONNTRACK6), maps.raw(MapName.HALF_OPEN6)
    for sport, target_id in ((40001, doomed), (40002, kept), (40003, doomed)):
        state = FlowState(target_id=target_id, vip_id=vip_id, vip_gen=gen, mode=FWD_FULLNAT,
                          snat_port=port_to_net(2000 + sport % 10))
        conntrack6.update(_key6("fd00::2", sport, VIP6), FlowState6(state, ip6_to_net(SOURCE6)))
    half = HalfOpenFlow(flow=FlowState(target_id=doomed, vip_id=vip_id, vip_gen=gen))
    half_open6.update(_key6("fd00::2", 40004, VIP6), HalfOpenFlow6(half))
    _count_traffic(maps, doomed)

    flows = {f.client.port: f for f in maps.flows()}
    assert set(flows) == {40001, 40002, 40003}
    assert flows[40001].client == Endpoint(IPv6Address("fd00::2"), 40001) and flows[40001].vip == VIP6
    assert flows[40001].mode == "full-nat" and flows[40001].source == Endpoint(SOURCE6, 2001)
    assert str(flows[40001].source) == "[fd00:1::1]:2001"
    assert [f.client.port for f in maps.half_open_flows()] == [40004]
    found = maps.flow("TCP", Endpoint(IPv6Address("fd00::2"), 40002), Endpoint(VIP6.address, 9000))
    assert found is not None and found.target_id == kept
    half_found = maps.flow("TCP", Endpoint(IPv6Address("fd00::2"), 40004), Endpoint(VIP6.address, 9000))
    assert half_found is not None and half_found.half_open
    assert maps.flow("TCP", Endpoint(IPv4Address("10.0.0.2"), 40002), Endpoint(VIP6.address, 9000)) is None

    # T6[0] unhealthy with connection termination: its flows (conntrack6 and half_open6) end
    report = dp.apply([L4Service(VIP6, members=((T6[1], 1), (T6[2], 1)), terminated=(T6[0],), mode="full-nat")])
    assert report.flows_ended == 3
    assert {f.client.port for f in maps.flows()} == {40002}
    assert list(maps.half_open_flows()) == []
    fill = maps.raw(MapName.TABLE_FILL)
    removed = [fill.lookup(ctypes.c_uint32(fill_removed_by_lb(t))) for t in (TABLE_CONNTRACK6, TABLE_HALF_OPEN6)]
    assert [getattr(value, "value", None) for value in removed] == [2, 1]


@pytest.mark.parametrize(("text", "address", "port"), [
    ("10.0.0.2:40000", "10.0.0.2", 40000),
    ("[fd00::2]:40000", "fd00::2", 40000),
    ("fd00::2", "fd00::2", None),
    ("[fd00::2]", "fd00::2", None),
    ("10.0.0.2", "10.0.0.2", None),
])  # fmt: skip
def test_endpoints_as_users_type_them(text: str, address: str, port: int | None) -> None:
    assert parse_endpoint(text, port_required=False) == (ip_address(address), port)


@pytest.mark.parametrize(("text", "words"), [
    ("fd00::2:70000", "is not ADDRESS:PORT or [IPV6]:PORT"),  # an IPv6 port needs the brackets
    ("[fd00::2]40000", "is not ADDRESS:PORT or [IPV6]:PORT"),
    ("[10.0.0.2]:40000", "'10.0.0.2' is not an IPv6 address"),
    ("[fd00::2]:0", "the port must be 1..65535"),
    ("[fd00::2]", "a port is needed"),
])  # fmt: skip
def test_endpoints_typed_wrong_are_named(text: str, words: str) -> None:
    with pytest.raises(InspectError, match=re.escape(words)):
        parse_endpoint(text)
