"""The IPv6 flow tables (conntrack6, half_open6, fullnat_flows6) get their
full sizes only when the config has an IPv6 TCP/UDP listener; otherwise a few
entries a CPU. A restart that changes which is the case replaces the pinned
table when no flow can be lost by it (it is empty, or the config serves no
IPv6 VIP its entries could belong to), and refuses a non-empty one as before;
every other map, IPv4 flows and all, is adopted as it is.

Sizes from real configs (lb.config.loads); the loader on real pinned maps."""

from __future__ import annotations

import ctypes
import logging
import os
import re
import time
from dataclasses import replace

import pytest

from lb import config as configmod
from lb.daemon import ipv6_flows_change
from lb.dataplane import libbpf
from lb.dataplane.libbpf import BpfMap
from lb.dataplane.loader import LoaderError, Program, bpf_source_dir, map_mismatch, pin_dir, purge_pins
from lb.dataplane.pins import limits_for
from lb.dataplane.structs import (
    LRU_LOCAL_FREE_TARGET,
    TABLE_CONNTRACK6,
    FlowKey,
    FlowKey6,
    FlowState,
    FlowState6,
    Limits,
    MapName,
    fill_held,
    fill_removed_by_lb,
    ip6_to_net,
    ip_to_net,
    map_specs,
    port_to_net,
    unused_flow_table_entries,
)
from lb.model import LoadBalancer
from tests.daemon_fixture import forwarded
from tests.names import name

IPV6_FLOW_TABLES = (MapName.CONNTRACK6, MapName.HALF_OPEN6, MapName.FULLNAT_FLOWS6)
CHECK = "{ interval = 10, timeout = 5 }"
NAME = name("v6tables")


def config(listeners: str, settings: str = "") -> LoadBalancer:
    return configmod.loads(f'[load_balancer]\nname = "x"\n{settings}' + listeners)


IPV4_TCP = forwarded("web", "TCP", 80, '[{ id = "10.1.0.11" }]', CHECK, address="10.0.0.1")
IPV6_UDP = forwarded("dns6", "UDP", 53, '[{ id = "fd00:1::11" }]', CHECK, address="fd00::100")
IPV6_HTTP = forwarded("web6", "HTTP", 8080, '[{ id = "fd00:1::11" }]', CHECK, address="fd00::100")


# --- sizes per config -------------------------------------------------------------

def test_the_unused_size_is_a_batch_of_free_entries_a_cpu() -> None:
    assert LRU_LOCAL_FREE_TARGET == 128  # the kernel's LOCAL_FREE_TARGET (kernel/bpf/bpf_lru_list.h)
    assert unused_flow_table_entries() == LRU_LOCAL_FREE_TARGET * libbpf.possible_cpus()


def test_an_ipv4_only_config_gets_small_ipv6_flow_tables() -> None:
    limits = limits_for(config(IPV4_TCP))
    assert not limits.ipv6_flows
    specs = map_specs(limits)
    small = unused_flow_table_entries()
    assert [specs[n].max_entries for n in IPV6_FLOW_TABLES] == [small, small, small]
    assert f"-DCONNTRACK6_SIZE={small}" in limits.cflags() and f"-DHALF_OPEN6_SIZE={small}" in limits.cflags()
    full = map_specs(replace(limits, ipv6_flows=True))
    # Every other map, the IPv4 flow tables first, is as it was: pinned ones are adopted.
    assert {n: s for n, s in specs.items() if n not in IPV6_FLOW_TABLES} == \
           {n: s for n, s in full.items() if n not in IPV6_FLOW_TABLES}
    assert specs[MapName.CONNTRACK].max_entries == specs[MapName.FULLNAT_FLOWS].max_entries == 524288
    assert specs[MapName.HALF_OPEN].max_entries == 131072


def test_an_ipv6_tcp_or_udp_listener_gives_them_their_full_sizes() -> None:
    limits = limits_for(config(IPV4_TCP + IPV6_UDP, "conntrack_size = 65536\nhalf_open_size = 4096\n"))
    assert limits.ipv6_flows
    specs = map_specs(limits)
    assert [specs[n].max_entries for n in IPV6_FLOW_TABLES] == [65536, 4096, 65536]
    assert "-DCONNTRACK6_SIZE=65536" in limits.cflags() and "-DHALF_OPEN6_SIZE=4096" in limits.cflags()


def test_an_ipv6_http_listener_alone_needs_no_ipv6_flow_table() -> None:
    # HTTP listeners are the L7 proxy's sockets: no XDP flow.
    assert not limits_for(config(IPV4_TCP + IPV6_HTTP)).ipv6_flows


def test_a_table_smaller_than_the_unused_size_keeps_its_own() -> None:
    limits = Limits(conntrack_size=128, half_open_size=64, ipv6_flows=False)
    small = unused_flow_table_entries()
    specs = map_specs(limits)
    assert specs[MapName.CONNTRACK6].max_entries == min(128, small)
    assert specs[MapName.HALF_OPEN6].max_entries == min(64, small)


def test_consts_h_defaults_the_ipv6_sizes_to_the_ipv4_ones() -> None:
    # Limits() has ipv6_flows=True: full sizes, as a compile without the loader's cflags.
    consts = (bpf_source_dir() / "consts.h").read_text()
    assert re.search(r"#define CONNTRACK6_SIZE CONNTRACK_SIZE\n", consts)
    assert re.search(r"#define HALF_OPEN6_SIZE HALF_OPEN_SIZE\n", consts)
    assert Limits().ipv6_flows


# --- the loader on real pinned maps ---------------------------------------------------

LIMITS = Limits(ring_size=13, max_vips=4, max_targets=8, conntrack_size=2048, half_open_size=1024)
SMALL, FULL = replace(LIMITS, ipv6_flows=False), LIMITS


def map_ids() -> dict[MapName, int]:
    ids = {}
    for map_name in MapName:
        fd = libbpf.obj_get(os.path.join(pin_dir(NAME), map_name.value))
        try:
            ids[map_name] = libbpf.map_info(fd).map_id
        finally:
            os.close(fd)
    return ids


def pinned(map_name: MapName, key: type[ctypes.Structure], value: type[ctypes.Structure] | type[ctypes.c_uint64],
           ) -> BpfMap:
    return BpfMap.open_pinned(os.path.join(pin_dir(NAME), map_name.value), key, value)


def max_entries(map_name: MapName) -> int:
    with pinned(map_name, FlowKey6, FlowState6) as bpf_map:
        return bpf_map.info.max_entries


def ipv4_flow() -> tuple[FlowKey, FlowState]:
    key = FlowKey(ip_to_net("192.0.2.7"), ip_to_net("10.0.0.1"), port_to_net(40000), port_to_net(80), 6)
    return key, FlowState(target_id=3, vip_id=1)


def ipv6_flow() -> tuple[FlowKey6, FlowState6]:
    key = FlowKey6(ip6_to_net("2001:db8::7"), ip6_to_net("fd00::100"), port_to_net(40000), port_to_net(80), 6)
    return key, FlowState6(flow=FlowState(target_id=4, vip_id=2))


def fill_slots() -> tuple[int, int]:
    with pinned(MapName.TABLE_FILL, ctypes.c_uint32, ctypes.c_uint64) as fill:
        held = fill.lookup(ctypes.c_uint32(fill_held(TABLE_CONNTRACK6)))
        by_lb = fill.lookup(ctypes.c_uint32(fill_removed_by_lb(TABLE_CONNTRACK6)))
        assert held is not None and by_lb is not None
        return int(held.value), int(by_lb.value)


def set_fill_slots(held: int, by_lb: int) -> None:
    with pinned(MapName.TABLE_FILL, ctypes.c_uint32, ctypes.c_uint64) as fill:
        fill.update(ctypes.c_uint32(fill_held(TABLE_CONNTRACK6)), ctypes.c_uint64(held))
        fill.update(ctypes.c_uint32(fill_removed_by_lb(TABLE_CONNTRACK6)), ctypes.c_uint64(by_lb))


def map_exists(map_id: int) -> bool:
    fd = libbpf.map_fd_by_id(map_id)
    if fd is None:
        return False
    os.close(fd)
    return True


@pytest.fixture
def clean() -> object:
    purge_pins(NAME)
    try:
        yield None
    finally:
        purge_pins(NAME)


@pytest.mark.root
def test_the_first_ipv6_listener_replaces_the_empty_small_tables_and_keeps_the_ipv4_flows(
        clean: None, caplog: pytest.LogCaptureFixture) -> None:
    with Program.load(NAME, SMALL):
        before = map_ids()
        assert [max_entries(n) for n in IPV6_FLOW_TABLES] == [min(2048, unused_flow_table_entries()),
                                                              min(1024, unused_flow_table_entries()),
                                                              min(2048, unused_flow_table_entries())]
        key, state = ipv4_flow()
        with pinned(MapName.CONNTRACK, FlowKey, FlowState) as conntrack:
            conntrack.update(key, state)
        set_fill_slots(5, 5)  # the model's count of a table that held 5 flows, all deleted since
        # A restart: the old program still runs (it holds the old tables) while the new one loads.
        with caplog.at_level(logging.INFO, logger="lb.dataplane"), Program.load(NAME, FULL):
            after = map_ids()
            assert {n: i for n, i in after.items() if n not in IPV6_FLOW_TABLES} == \
                   {n: i for n, i in before.items() if n not in IPV6_FLOW_TABLES}
            assert all(after[n] != before[n] for n in IPV6_FLOW_TABLES)
            assert [max_entries(n) for n in IPV6_FLOW_TABLES] == [2048, 1024, 2048]
            with pinned(MapName.CONNTRACK, FlowKey, FlowState) as conntrack:
                assert conntrack.lookup(key) is not None  # the IPv4 flow is still there
            assert fill_slots() == (0, 0)  # a new table starts its model at 0
            replaced = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
            assert len(replaced) == 3 and "conntrack6" in replaced[0] and "it held no entries" in replaced[0]
            assert f"max {min(2048, unused_flow_table_entries())} -> 2048" in replaced[0]
    # Once no program holds them, the old tables are freed (not leaked beside the new ones).
    deadline = time.monotonic() + 5
    while any(map_exists(before[n]) for n in IPV6_FLOW_TABLES) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map_exists(before[n]) for n in IPV6_FLOW_TABLES)


@pytest.mark.root
def test_a_mismatched_ipv6_table_holding_flows_is_refused_when_the_config_serves_ipv6(clean: None) -> None:
    with Program.load(NAME, SMALL):
        before = map_ids()
    key, state = ipv6_flow()  # e.g. an IPv6 flow that came in before the controller removed its VIP
    with pinned(MapName.CONNTRACK6, FlowKey6, FlowState6) as conntrack6:
        conntrack6.update(key, state)
    with pytest.raises(LoaderError) as refused:
        Program.load(NAME, FULL)
    message = str(refused.value)
    assert "conntrack6: pinned as lru_hash key 40 B value 56 B max " in message
    assert ("max 2048 flags 0x0 (its size follows the config's conntrack_size and IPv6 TCP/UDP listeners "
            "(any or none), changed since it was pinned), and it holds flows (an empty one would be replaced)"
            in message)
    assert "half_open6" not in message and "fullnat_flows6" not in message  # empty: they would be replaced
    assert map_ids() == before  # nothing was replaced


@pytest.mark.root
def test_removing_the_last_ipv6_listener_replaces_the_full_tables_whatever_they_hold(
        clean: None, caplog: pytest.LogCaptureFixture) -> None:
    """Their flows belong to IPv6 VIPs the config no longer has: the
    controller would end them anyway (vip_gens), and refusing would leave
    `lb down`, which drops the IPv4 flows too."""
    with Program.load(NAME, FULL):
        before = map_ids()
    key, state = ipv6_flow()
    with pinned(MapName.CONNTRACK6, FlowKey6, FlowState6) as conntrack6:
        conntrack6.update(key, state)
    set_fill_slots(1, 0)
    with caplog.at_level(logging.INFO, logger="lb.dataplane"), Program.load(NAME, SMALL):
        after = map_ids()
        assert all(after[n] != before[n] for n in IPV6_FLOW_TABLES)
        assert after[MapName.CONNTRACK] == before[MapName.CONNTRACK]
        with pinned(MapName.CONNTRACK6, FlowKey6, FlowState6) as conntrack6:
            assert conntrack6.info.max_entries == min(2048, unused_flow_table_entries())
            assert conntrack6.lookup(key) is None
        assert fill_slots() == (0, 0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "conntrack6" in r.getMessage()]
    assert warned and "the config has no IPv6 TCP/UDP listener" in warned[0]


@pytest.mark.root
def test_other_maps_of_another_size_are_still_refused(clean: None) -> None:
    with Program.load(NAME, SMALL):
        before = map_ids()
    with pytest.raises(LoaderError, match=r"conntrack: pinned .* \(its size follows the config's conntrack_size"):
        Program.load(NAME, replace(FULL, conntrack_size=4096))
    assert map_ids() == before



def pinned_info(path: str) -> libbpf.MapInfo:
    fd = libbpf.obj_get(path)
    try:
        return libbpf.map_info(fd)
    finally:
        os.close(fd)


def test_inspection_reads_the_ipv6_tables_at_any_size_but_no_other_map(clean: None) -> None:
    """lb conntrack / lb stats with a config edited to add IPv6 before the
    restart: the small IPv6 tables are read as they are (the loader would
    replace them); another map of another size still stops them."""
    with Program.load(NAME, SMALL):
        directory = pin_dir(NAME)
        for name, spec in map_specs(FULL).items():
            path = os.path.join(directory, name.value)
            info = pinned_info(path)
            if name in (MapName.CONNTRACK6, MapName.HALF_OPEN6, MapName.FULLNAT_FLOWS6):
                assert map_mismatch(path, spec, info) is not None
            assert map_mismatch(path, spec, info, reading=True) is None
        conntrack = map_specs(replace(FULL, conntrack_size=4096))[MapName.CONNTRACK]
        path = os.path.join(directory, "conntrack")
        assert map_mismatch(path, conntrack, pinned_info(path), reading=True)


# --- what a reload that changes it says -------------------------------------------------

def test_a_reload_adding_or_removing_ipv6_listeners_says_to_restart_not_lb_down() -> None:
    ipv4, both = config(IPV4_TCP), config(IPV4_TCP + IPV6_HTTP + IPV6_UDP)
    adding = ipv6_flows_change(ipv4, both)
    assert adding.startswith('listeners[2] ("dns6", fd00::100) is the first IPv6 TCP/UDP listener: the IPv6 flow '
                             "tables (conntrack6, half_open6, fullnat_flows6) get their full sizes, which takes a "
                             "restart: restart lb (`systemctl restart lb`")
    assert adding.endswith("which keeps every flow; not `lb down`, which drops them")
    removing = ipv6_flows_change(both, ipv4)
    assert removing.startswith('the config has no IPv6 TCP/UDP listener any more (it had "dns6"): the IPv6 flow '
                               "tables (conntrack6, half_open6, fullnat_flows6) shrink, which takes a restart")
    assert removing.endswith("which keeps every IPv4 flow; not `lb down`, which drops them")
