"""The Python mirrors of the shared C structs and constants match the program.

Sizes and field offsets are compared with the types bcc decodes from the
compiled bpf/lb.c (as cilium's alignchecker does against its object), and
the constants with the C headers, so neither side can drift alone.
"""

from __future__ import annotations

import ctypes
import ipaddress
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.dataplane import structs
from lb.dataplane.loader import Program, bpf_source_dir, purge_pins
from lb.dataplane.structs import Counter, Limits, MapName, map_specs
from tests.names import name

LIMITS = Limits(ring_size=13, max_vips=4, max_targets=8, conntrack_size=128)
NAME = name("structs")


@pytest.fixture(scope="module")
def program() -> Iterator[Program]:
    purge_pins(NAME)
    try:
        with Program.load(NAME, LIMITS) as loaded:
            yield loaded
    finally:
        purge_pins(NAME)


def layout(ctype: type) -> tuple[int, list[tuple[str, int, int]]]:
    fields = []
    for field, *_ in getattr(ctype, "_fields_", []):
        descriptor = getattr(ctype, field)
        fields.append((field, descriptor.offset, descriptor.size))
    return ctypes.sizeof(ctype), fields


@pytest.mark.root
@pytest.mark.parametrize("name", list(MapName), ids=[n.value for n in MapName])
def test_mirror_matches_what_bcc_decoded(program: Program, name: MapName) -> None:
    spec = map_specs(LIMITS)[name]
    key, leaf = program.decoded_types(name.value)
    if spec.per_cpu:  # bcc decodes a per-CPU value as an array of the C type
        leaf = leaf._type_
    assert layout(spec.key) == layout(key)
    assert layout(spec.value) == layout(leaf)


def header(name: str) -> str:
    return (bpf_source_dir() / name).read_text()


def test_counter_enum_matches_consts_h() -> None:
    body = re.search(r"enum lb_counter \{(.*?)\};", header("consts.h"), re.S)
    assert body is not None
    names = re.findall(r"^\s*CNT_([A-Z0-9_]+)", body.group(1), re.M)
    assert names[-1] == "MAX"
    assert names[:-1] == [c.name for c in Counter]
    assert re.search(r"CNT_PASS_NOT_IPV4 = 0,", body.group(1))


@pytest.mark.parametrize(
    "macro, value",
    [
        ("RING_SIZE", Limits().ring_size),
        ("MAX_VIPS", Limits().max_vips),
        ("MAX_TARGETS", Limits().max_targets),
        ("CONNTRACK_SIZE", Limits().conntrack_size),
        ("HALF_OPEN_SIZE", Limits().half_open_size),
        ("NO_TARGET", structs.NO_TARGET),
        ("TARGET_F_ACTIVE", structs.TARGET_F_ACTIVE),
        ("TARGET_F_IN_SERVICE", structs.TARGET_F_IN_SERVICE),
        ("MAX_REPLY_VIPS", structs.MAX_REPLY_VIPS),
        ("TABLE_CONNTRACK", structs.TABLE_CONNTRACK),
        ("TABLE_HALF_OPEN", structs.TABLE_HALF_OPEN),
        ("TABLE_CONNTRACK6", structs.TABLE_CONNTRACK6),
        ("TABLE_HALF_OPEN6", structs.TABLE_HALF_OPEN6),
        ("TABLE_COUNT", len(structs.TABLE_NAMES)),
        ("FLOW_HASH_SEED", structs.FLOW_HASH_SEED),
        ("NEW_FLOW_RATE_LIMIT", Limits().new_flow_rate_limit),
        ("CONNTRACK_LRU_FLAGS", 0),  # Limits().conntrack_per_cpu_lru is False
    ],
)
def test_constants_match_consts_h(macro: str, value: int) -> None:
    found = re.search(rf"#define {macro}\s+(\S+)", header("consts.h"))
    assert found is not None
    assert int(found.group(1).rstrip("U"), 0) == value


@pytest.mark.parametrize("macro, seconds", [("TCP_IDLE_NS", Limits().tcp_idle_timeout),
                                            ("UDP_IDLE_NS", Limits().udp_idle_timeout),
                                            ("TCP_CLOSED_NS", Limits().tcp_closed_timeout),
                                            ("TCP_TIME_WAIT_NS", Limits().tcp_time_wait_timeout),
                                            ("TCP_SYN_NS", Limits().tcp_syn_timeout)])
def test_idle_defaults_match_consts_h(macro: str, seconds: int) -> None:
    found = re.search(rf"#define {macro} \((\d+)ULL \*", header("consts.h"))
    assert found is not None and int(found.group(1)) == seconds


def test_next_hop_cache_default_matches_consts_h() -> None:
    found = re.search(r"#define NEXT_HOP_CACHE_NS (\d+)ULL", header("consts.h"))
    assert found is not None and int(found.group(1)) == Limits().next_hop_cache_ms * 1_000_000


def test_vip_meta_keeps_the_layout_of_pinned_vips_maps() -> None:
    # `reserved` became `mode` again, in name only: a vips map pinned by an
    # earlier build (value 16 B, four u32, the last always 0) is adopted, and
    # its 0 reads as FWD_NAT, the only mode those builds had.
    u32 = ctypes.sizeof(ctypes.c_uint32)
    fields = [("vip_id", 0, u32), ("ring", 4, u32), ("gen", 8, u32), ("mode", 12, u32)]
    assert layout(structs.VipMeta) == (16, fields)
    assert structs.FWD_NAT == 0


@pytest.mark.parametrize("macro, value", [("FWD_NAT", structs.FWD_NAT), ("FWD_FULLNAT", structs.FWD_FULLNAT),
                                          ("FWD_DSR", structs.FWD_DSR),
                                          ("FULLNAT_PORT_MIN", Limits().fullnat_port_min),
                                          ("FULLNAT_PORT_MAX", Limits().fullnat_port_max),
                                          ("FULLNAT_PORT_TRIES", Limits().fullnat_port_tries)])
def test_forwarding_constants_match_consts_h(macro: str, value: int) -> None:
    found = re.search(rf"#define {macro}\s+(\d+)", header("consts.h"))
    assert found is not None and int(found.group(1)) == value


def test_every_counter_has_help() -> None:
    assert set(structs.COUNTER_HELP) == set(Counter)


@pytest.mark.parametrize("bytes_, state", [
    ((1, 0, 0, 0), "syn_sent"), ((0, 0, 0, 0), "established"), ((0, 1, 0, 0), "closing"),
    ((0, 0, 1, 0), "closing"), ((0, 1, 1, 0), "time_wait"), ((0, 0, 0, 1), "closed"), ((1, 1, 1, 1), "closed"),
])
def test_tcp_state_names(bytes_: tuple[int, int, int, int], state: str) -> None:
    syn_only, fin_client, fin_target, rst = bytes_
    flow = structs.FlowState(syn_only=syn_only, fin_client=fin_client, fin_target=fin_target, rst=rst)
    assert structs.tcp_state(flow) == state
    assert (state in structs.CLOSED_TCP_STATES) == (bool(rst) or bool(fin_client and fin_target))


def test_every_map_in_maps_h_is_mirrored() -> None:
    declared = re.findall(r"BPF_(?:F_)?TABLE\(\"\w+\",\s*[\w ]+,\s*[\w ]+,\s*(\w+),", header("maps.h"))
    assert sorted(declared) == sorted(n.value for n in MapName)


def test_source_dir_is_the_checkout() -> None:
    assert bpf_source_dir() == Path(__file__).resolve().parents[1] / "bpf"


def test_ipv6_address_conversions_round_trip() -> None:
    address = "2001:db8::1:2"
    value = structs.ip6_to_net(address)
    assert bytes(value) == bytes.fromhex("20010db8000000000000000000010002")  # as the packet carries it
    assert structs.net_to_ip6(value) == ipaddress.IPv6Address(address)
    key = structs.VipKey6(addr=value, port=structs.port_to_net(443), proto=structs.IPPROTO_TCP)
    assert bytes(key)[:16] == bytes(value) and bytes(key)[16:18] == (443).to_bytes(2, "big")


def test_ipv6_values_embed_the_ipv4_flow_state() -> None:
    # The TCP lifecycle code reads a struct flow_state (half_open_flow) in
    # either family: it sits first in the IPv6 values, target_id at 0 (the
    # layout Maps' batch delete by target relies on).
    assert structs.FlowState6.flow.offset == 0 and structs.HalfOpenFlow6.half.offset == 0
    assert ctypes.sizeof(structs.FlowState6) == ctypes.sizeof(structs.FlowState) + 16
    assert ctypes.sizeof(structs.HalfOpenFlow6) == ctypes.sizeof(structs.HalfOpenFlow) + 16


def test_every_map_name_fits_the_kernels_name_field() -> None:
    # BPF_OBJ_NAME_LEN is 16 with the NUL: a longer name is cut, and two maps
    # (fullnat_sources, "fullnat_sources6") would show the same name.
    assert [n.value for n in MapName if len(n.value) > 15] == []
