"""The XDP program attached to the namespace lab's lb host, for L4 tests."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.loader import Attachment, Program, purge_pins
from lb.dataplane.maps import Endpoint, Maps, VipAddr
from lb.dataplane.structs import Limits
from lb.lab import Lab
from lb.model import XdpMode

LIMITS = Limits(ring_size=65537, max_vips=8, max_targets=64, conntrack_size=65536)


def tcp_vip(port: int = labmod.ECHO_PORT) -> VipAddr:
    return VipAddr(ipaddress.IPv4Address(labmod.VIP), port, "TCP")


def udp_vip(port: int = labmod.ECHO_PORT) -> VipAddr:
    return VipAddr(ipaddress.IPv4Address(labmod.VIP), port, "UDP")


def backend_endpoints(lab: Lab, port: int = labmod.ECHO_PORT) -> list[Endpoint]:
    return [Endpoint(ipaddress.IPv4Address(b.address), port) for b in lab.backends]


def all_backends(vip: VipAddr, lab: Lab) -> L4Service:
    return L4Service(vip, members=tuple((e, 1) for e in backend_endpoints(lab)))


@dataclass
class L4Lab:
    lab: Lab
    program: Program
    maps: Maps
    dataplane: Dataplane
    attachments: list[Attachment]

    def backend_of(self, endpoint: Endpoint) -> str:
        return next(b.name for b in self.lab.backends if b.address == str(endpoint.address))


@contextmanager
def l4_lab(lab: Lab, mode: XdpMode = XdpMode.NATIVE) -> Iterator[L4Lab]:
    name = f"{lab.prefix}-l4"
    purge_pins(name)
    with nl.iproute(lab.lb_ns) as ipr:
        nl.add_address(ipr, labmod.LB_CLIENT_IF, labmod.VIP, 32)
    try:
        with Program.load(name, LIMITS) as program, Maps(program.pin_dir, LIMITS) as maps, \
                program.attached(lab.lb_interfaces, mode, lab.lb_ns) as attachments:
            dataplane = Dataplane(maps, source_of=lambda address: nl.source_toward(address, lab.lb_ns))
            yield L4Lab(lab, program, maps, dataplane, attachments)
    finally:
        with nl.iproute(lab.lb_ns) as ipr:
            nl.remove_address(ipr, labmod.LB_CLIENT_IF, labmod.VIP, 32)
        purge_pins(name)
