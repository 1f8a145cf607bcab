"""A namespace where the real XDP program runs on packet fixtures.

Two veth pairs with fixed MACs and permanent neighbour entries, so that
bpf_fib_lookup gives the same answer on every run and expected output
frames can be written down byte for byte:

    fxa 10.0.0.1/24  (02:00:00:00:0a:01)  client side: client 10.0.0.2, same-side target 10.0.0.50
    fxb 10.0.1.1/24  (02:00:00:00:0b:01)  target side: 10.0.1.11..13 (10.0.1.14 has no neighbour)

and the same for IPv6 (the MACs are the same hosts'):

    fxa fd00::1/64    client fd00::2, same-side target fd00::50
    fxb fd00:1::1/64  targets fd00:1::11..13 (fd00:1::14 has no neighbour)

BPF_PROG_TEST_RUN is run from a thread inside that namespace with the
ingress interface set, so the program sees exactly what it would see on fxa
or fxb.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from scapy.layers.l2 import Ether

from lb import netlink as nl
from lb.dataplane import libbpf
from lb.dataplane.dataplane import Dataplane
from lb.dataplane.loader import Program, purge_pins
from lb.dataplane.maps import Maps
from lb.dataplane.structs import Counter, Limits
from tests.names import name

NETNS = name("pkt")
NAME = NETNS  # pin directory /sys/fs/bpf/lb/<prefix>-pkt
LIMITS = Limits(ring_size=251, max_vips=16, max_targets=32, conntrack_size=4096)

CLIENT_IF, TARGET_IF = "fxa", "fxb"
MAC = {
    "fxa": "02:00:00:00:0a:01",
    "fxb": "02:00:00:00:0b:01",
    "client": "02:00:00:00:00:02",
    "near": "02:00:00:00:00:50",
    "t1": "02:00:00:00:01:11",
    "t2": "02:00:00:00:01:12",
    "t3": "02:00:00:00:01:13",
}
NEIGHBORS = [
    (CLIENT_IF, "10.0.0.2", MAC["client"]),
    (CLIENT_IF, "10.0.0.50", MAC["near"]),
    (TARGET_IF, "10.0.1.11", MAC["t1"]),
    (TARGET_IF, "10.0.1.12", MAC["t2"]),
    (TARGET_IF, "10.0.1.13", MAC["t3"]),
    (CLIENT_IF, "fd00::2", MAC["client"]),
    (CLIENT_IF, "fd00::50", MAC["near"]),
    (TARGET_IF, "fd00:1::11", MAC["t1"]),
    (TARGET_IF, "fd00:1::12", MAC["t2"]),
    (TARGET_IF, "fd00:1::13", MAC["t3"]),
]
ADDRESSES6 = {CLIENT_IF: "fd00::1", TARGET_IF: "fd00:1::1"}  # /64 each

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
ACTION_NAMES = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}


@dataclass
class PacketLab:
    program: Program
    maps: Maps
    dataplane: Dataplane
    ifindex: dict[str, int]

    def run(self, frame: bytes, ingress: str = CLIENT_IF, repeat: int = 1) -> libbpf.RunResult:
        return nl.run_in_netns(NETNS, libbpf.prog_test_run, self.program.fd, frame,
                               ingress_ifindex=self.ifindex[ingress], repeat=repeat)


def _build_namespace() -> dict[str, int]:
    nl.remove_netns(NETNS)
    nl.create_netns(NETNS)
    with nl.iproute(NETNS) as ipr:
        nl.set_up(ipr, "lo")
        for ifname, address in ((CLIENT_IF, "10.0.0.1"), (TARGET_IF, "10.0.1.1")):
            nl.add_veth(ipr, ifname, ifname + "-peer", NETNS)
            nl.set_mac(ipr, ifname, MAC[ifname])
            nl.add_address(ipr, ifname, address, 24)
            nl.add_address(ipr, ifname, ADDRESSES6[ifname], 64, nodad=True)
            nl.set_up(ipr, ifname)
            nl.set_up(ipr, ifname + "-peer")
        for ifname, address, mac in NEIGHBORS:
            nl.add_neighbor(ipr, ifname, address, mac)
        ifindex = {ifname: nl.ifindex(ipr, ifname) for ifname in (CLIENT_IF, TARGET_IF)}
    nl.set_sysctl(NETNS, "net.ipv4.ip_forward", "1")  # else fib lookups answer FWD_DISABLED
    nl.set_sysctl(NETNS, "net.ipv6.conf.all.forwarding", "1")
    return ifindex


def source_of(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address | None:
    """lb's address toward a target, as the daemon finds it: here 10.0.1.1 on fxb, 10.0.0.1 on fxa."""
    return nl.source_toward(address, NETNS)


@contextmanager
def packet_lab() -> Iterator[PacketLab]:
    purge_pins(NAME)
    try:
        ifindex = _build_namespace()
        with Program.load(NAME, LIMITS) as program, Maps(program.pin_dir, LIMITS) as maps:
            yield PacketLab(program, maps, Dataplane(maps, source_of=source_of), ifindex)
    finally:
        nl.remove_netns(NETNS)
        purge_pins(NAME)


# --- a frame through the program and what must come of it ---------------------------------


@dataclass
class Case:
    id: str
    frame: bytes
    action: int
    expect: bytes | None  # None: untouched
    counters: dict[Counter, int]
    ingress: str = CLIENT_IF
    before: list[tuple[bytes, str]] = field(default_factory=list)  # frames run first (setting up a flow)


def counter_deltas(maps: Maps, before: dict[Counter, int]) -> dict[Counter, int]:
    """The counters that changed since `before` (maps.counters() then), by how much."""
    after = maps.counters()
    return {r: after[r] - before[r] for r in Counter if after[r] != before[r]}


def run_case(pkt_lab: PacketLab, case: Case) -> libbpf.RunResult:
    """`case.before`, then `case.frame` on its ingress: the action and the
    counters that changed must be the case's. The frame out is the caller's to check."""
    for frame, ingress in case.before:
        pkt_lab.run(frame, ingress)
    before = pkt_lab.maps.counters()
    result = pkt_lab.run(case.frame, case.ingress)
    deltas = counter_deltas(pkt_lab.maps, before)
    assert (ACTION_NAMES[result.retval], deltas) == (ACTION_NAMES[case.action], case.counters)
    return result


def assert_frame(data: bytes, expected: bytes) -> None:
    """The frame byte for byte; where it differs, shown as packets."""
    if data != expected:
        assert Ether(data).show(dump=True) == Ether(expected).show(dump=True)
    assert data == expected
