"""The DSR lab: lb and its targets on one L2 segment, replies through a router.

    client (10.30.0.2) ── router (10.30.0.1 | 10.30.1.1) ── switch (bridge) ─┬─ lb (10.30.1.2)
           (fd30::2)            (fd30::1 | fd30:1::1)                        ├─ target1 (10.30.1.11, fd30:1::11)
                                                                             ├─ target2 (10.30.1.12, fd30:1::12)
                                                                             └─ target3 (10.30.1.13, fd30:1::13)
                                                                                 lb: fd30:1::2

The router sends the VIP (10.30.9.100) to lb; lb's XDP program rewrites
only the destination MAC to a target's and sends the frame back out of its
one link (XDP_TX: XDP cannot redirect into a bridge, but a frame sent out
of lb's own veth reaches the bridge's port like any other). Each target
holds the VIP on `lo` with ARP suppressed (arp_ignore = 1, arp_announce =
2: the README's target set-up) and answers the client directly through the
router: no reply crosses lb. The client and the targets turn TX checksum
offload off (a full-NAT flow's replies do cross lb's program).
The switch's port toward lb has an XDP program that passes everything:
veth delivers the frames lb's program sends back with XDP_TX only to a
peer that has one (docs/kernel-notes.md).

IPv6 sits alongside, the same shape (addresses without duplicate address
detection): the router sends fd30:9::100 to lb, and each target holds it on
`lo` with no sysctl: Linux answers a neighbour solicitation only for an
address of the interface it arrives on.

`DsrLab(prefix).up()` builds it (rolled back when it fails half-way) and
starts lb.labserver on each target; `down()` removes every namespace.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from lb import netlink as nl
from lb.lab import HOST_IF, SENDER_FEATURES, Backend, Lab, LabError, attach_pass_program
from lb.model import XdpMode

CLIENT_ADDR = "10.30.0.2"
ROUTER_CLIENT_ADDR = "10.30.0.1"
ROUTER_ADDR = "10.30.1.1"
LB_ADDR = "10.30.1.2"
VIP = "10.30.9.100"
TARGET_ADDRS = ("10.30.1.11", "10.30.1.12", "10.30.1.13")
PREFIXLEN = 24
CLIENT_ADDR6 = "fd30::2"
ROUTER_CLIENT_ADDR6 = "fd30::1"
ROUTER_ADDR6 = "fd30:1::1"
LB_ADDR6 = "fd30:1::2"
VIP6 = "fd30:9::100"
TARGET_ADDRS6 = ("fd30:1::11", "fd30:1::12", "fd30:1::13")
PREFIXLEN6 = 64
BRIDGE = "br0"
XDP_MODE = XdpMode.NATIVE
LB_IF = HOST_IF  # lb's one link, where XDP is attached
# The target side of DSR (README: direct server return targets).
TARGET_SYSCTLS = {"net.ipv4.conf.all.arp_ignore": "1", "net.ipv4.conf.all.arp_announce": "2",
                  f"net.ipv4.conf.{HOST_IF}.arp_ignore": "1", f"net.ipv4.conf.{HOST_IF}.arp_announce": "2"}


@dataclass(frozen=True)
class DsrLab:
    """Names and addresses of the DSR lab; up() and down() build and remove it."""

    prefix: str = "dsr"
    targets: tuple[Backend, ...] = field(init=False)

    def __post_init__(self) -> None:
        targets = tuple(Backend(f"target{i}", address, f"{self.prefix}-target{i}", f"to-target{i}", address6)
                        for i, (address, address6) in enumerate(zip(TARGET_ADDRS, TARGET_ADDRS6), 1))
        object.__setattr__(self, "targets", targets)

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}-router"

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-switch"

    @property
    def lb_ns(self) -> str:
        return f"{self.prefix}-lb"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client_ns, self.router_ns, self.switch_ns, self.lb_ns, *(t.netns for t in self.targets))

    @property
    def run_dir(self) -> str:
        """Where the lab keeps its servers' logs (removed by down())."""
        return self._servers().lab_run_dir

    def _servers(self) -> Lab:
        # lb.lab.Lab knows how to start, find and kill lb.labserver in a namespace.
        return Lab(self.prefix, backend_count=len(self.targets))

    def up(self) -> None:
        self.down()
        try:
            self._build()
        except BaseException as exc:
            self.down()
            if isinstance(exc, OSError) or type(exc).__module__.startswith("pyroute2"):
                raise LabError(f"DSR lab up failed, rolled back: {exc}") from exc
            raise

    def down(self) -> list[str]:
        removed = []
        for ns in self.namespaces:
            Lab._kill_processes(ns)
        for ns in self.namespaces:
            if nl.netns_exists(ns):
                nl.remove_netns(ns)
                removed.append(ns)
        shutil.rmtree(self.run_dir, ignore_errors=True)  # the servers' logs
        return removed

    def _build(self) -> None:
        for ns in self.namespaces:
            nl.create_netns(ns)
        ports = [("to-router", self.router_ns), ("to-lb", self.lb_ns),
                 *((t.lb_ifname, t.netns) for t in self.targets)]
        with nl.iproute(self.switch_ns) as ipr:
            nl.add_bridge(ipr, BRIDGE)
            nl.set_up(ipr, BRIDGE)
            for port, peer_ns in ports:
                nl.add_veth(ipr, port, "eth1" if peer_ns == self.router_ns else HOST_IF, peer_ns)
                nl.set_master(ipr, port, BRIDGE)
                nl.set_up(ipr, port)
        attach_pass_program(self.switch_ns, "to-lb")
        with nl.iproute(self.router_ns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_veth(ipr, HOST_IF, HOST_IF, self.client_ns)
            nl.add_address(ipr, HOST_IF, ROUTER_CLIENT_ADDR, PREFIXLEN)
            nl.add_address(ipr, "eth1", ROUTER_ADDR, PREFIXLEN)
            nl.set_up(ipr, HOST_IF)
            nl.set_up(ipr, "eth1")
            nl.add_route(ipr, f"{VIP}/32", gateway=LB_ADDR)
        nl.set_sysctl(self.router_ns, "net.ipv4.ip_forward", "1")
        self._host(self.client_ns, CLIENT_ADDR, ROUTER_CLIENT_ADDR)
        nl.set_features(self.client_ns, HOST_IF, SENDER_FEATURES)
        self._host(self.lb_ns, LB_ADDR, ROUTER_ADDR)
        nl.set_sysctl(self.lb_ns, "net.ipv4.ip_forward", "1")  # else bpf_fib_lookup answers FWD_DISABLED
        with nl.iproute(self.lb_ns) as ipr:
            nl.add_address(ipr, "lo", VIP, 32)
        for target in self.targets:
            self._host(target.netns, target.address, ROUTER_ADDR)
            # Whole checksums, as the client's: a full-NAT reply crosses lb's
            # XDP program, which cannot finish a veth's partial checksum.
            nl.set_features(target.netns, HOST_IF, SENDER_FEATURES)
            for key, value in TARGET_SYSCTLS.items():
                nl.set_sysctl(target.netns, key, value)
            with nl.iproute(target.netns) as ipr:
                nl.add_address(ipr, "lo", VIP, 32)
        self._build_ipv6()
        servers = self._servers()
        for target in self.targets:
            servers.start_server(target)

    def _build_ipv6(self) -> None:
        """The IPv6 addresses and routes, on the links _build made."""
        with nl.iproute(self.router_ns) as ipr:
            nl.add_address(ipr, HOST_IF, ROUTER_CLIENT_ADDR6, PREFIXLEN6, nodad=True)
            nl.add_address(ipr, "eth1", ROUTER_ADDR6, PREFIXLEN6, nodad=True)
            nl.add_route(ipr, f"{VIP6}/128", gateway=LB_ADDR6)
        for ns in (self.router_ns, self.lb_ns):  # lb: else bpf_fib_lookup answers FWD_DISABLED
            nl.set_sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
        hosts = [(self.client_ns, CLIENT_ADDR6, ROUTER_CLIENT_ADDR6), (self.lb_ns, LB_ADDR6, ROUTER_ADDR6),
                 *((t.netns, t.address6, ROUTER_ADDR6) for t in self.targets)]
        for ns, address, gateway in hosts:
            with nl.iproute(ns) as ipr:
                nl.add_address(ipr, HOST_IF, address, PREFIXLEN6, nodad=True)
                nl.add_route(ipr, "::/0", gateway=gateway)
        for target in self.targets:
            with nl.iproute(target.netns) as ipr:
                nl.add_address(ipr, "lo", VIP6, 128, nodad=True)

    @staticmethod
    def _host(ns: str, address: str, gateway: str) -> None:
        with nl.iproute(ns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_address(ipr, HOST_IF, address, PREFIXLEN)
            nl.set_up(ipr, HOST_IF)
            nl.add_route(ipr, "default", gateway=gateway)
