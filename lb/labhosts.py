"""The scale-out lab: a router spreading the VIP over N lb hosts by ECMP.

    client ─ router ═╦═ lb1 ═╦═ backend1..3
    10.0.0.2         ╚═ lb2 ═╝
                 (BIRD, ECMP)   (BIRD, lb announces 10.0.0.100/32)

``ScaleLab(prefix, hosts=N)`` (N ≥ 2; ``lab_for(prefix, 1)`` is lb.lab's
one-host lab, unchanged). The namespaces: ``<prefix>-client``,
``<prefix>-router``, ``<prefix>-lb1`` ... ``<prefix>-lbN`` and the backends.

- client 10.0.0.2/24, default via the router's 10.0.0.1 and the VIP's /32
  too (the VIP sits in the client's subnet but lives behind the router);
  the same in IPv6: fd00::2/64, default and ``VIP6``'s /128 via fd00::1.
- router ``to-lbK`` 10.0.(10+K).1/24, fd00:(10+K)::1/64 ─ lbK ``to-router``
  10.0.(10+K).2/24, fd00:(10+K)::2/64; BIRD in the router (AS 65000) peers
  with every host (AS 65001) over IPv4, takes IPv4 and IPv6 routes (an lb
  config with IPv6 VIPs adds an ``ipv6`` channel: next hop fd00:(10+K)::2),
  and installs them with ``merge paths``: one kernel route, one next hop per
  host; ``fib_multipath_hash_policy = 1`` (both families) hashes the 5-tuple.
  IPv6 addresses are added without DAD and kept while a link is down
  (``keep_addr_on_down``), as the IPv4 ones are.
- each host has a link to each backend (``to-backendJ`` in the host,
  ``eth(K-1)`` in the backend) and the gateway address 10.0.1.K on it. A
  backend's default route has one next hop per host, hashed on the 5-tuple
  as well, and a next hop whose link goes down is skipped
  (``ignore_routes_with_linkdown``): a target's replies reach some live
  host, often not the one that forwarded the request, which NATs them back
  statelessly (docs/bgp.md).
- each host runs its own BIRD (``/run/lb-lab/<prefix>/lbK.*``) whose config
  includes ``lbK.d/*.conf``, the fragment lb writes: ``host_config()``
  gives each host's lb config (the same listeners and groups, its own name,
  namespace, admin socket and BGP identity).
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Any

from lb import netlink as nl
from lb.lab import (
    CLIENT_ADDR,
    CLIENT_ADDR6,
    CLIENT_NET6_PREFIXLEN,
    CLIENT_NET_PREFIXLEN,
    HOST_IF,
    LB_CLIENT_ADDR,
    LB_CLIENT_ADDR6,
    LB_CLIENT_IF,
    SENDER_FEATURES,
    VIP,
    Lab,
    LabError,
)
from lb.labbird import LabBird, LabBirdError

MAX_HOSTS = 8  # gateway addresses 10.0.1.1..8, below the backends' .11..
ROUTER_AS = 65000
LB_AS = 65001
UPLINK_IF = "to-router"
BFD_INTERVAL_MS = 100
BFD_MULTIPLIER = 3
RTNH_F_ONLINK = 4  # a next hop on this link, whatever the routes say
HOLD_TIME = 3  # seconds: a host gone without BFD is noticed within this
VIP6 = "fd00::100"  # an IPv6 VIP for lab configs: in the client's subnet, behind the router (as VIP)


@dataclass(frozen=True)
class LbHost:
    index: int  # 1..N
    netns: str
    address: str  # on to-router
    router_address: str  # the router's end
    router_ifname: str  # to-lbK, in the router
    gateway: str  # 10.0.1.K: the backends' next hop through this host
    bird: LabBird
    address6: str = ""  # on to-router: fd00:(10+K)::2, the next hop of its IPv6 VIPs
    router_address6: str = ""  # fd00:(10+K)::1


def lab_for(prefix: str = "lab", hosts: int = 1, backend_count: int = 3) -> Lab:
    """One host: today's lab exactly; more: the router and N hosts."""
    if hosts == 1:
        return Lab(prefix, backend_count)
    return ScaleLab(prefix, backend_count, hosts=hosts)


@dataclass(frozen=True)
class ScaleLab(Lab):
    hosts: int = 2
    lb_hosts: tuple[LbHost, ...] = field(init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 2..{MAX_HOSTS} (1 is lb.lab.Lab)")
        hosts = tuple(
            LbHost(k, f"{self.prefix}-lb{k}", f"10.0.{10 + k}.2", f"10.0.{10 + k}.1", f"to-lb{k}", f"10.0.1.{k}",
                   LabBird(self.run_dir, f"lb{k}", f"{self.prefix}-lb{k}"), f"fd00:{10 + k}::2", f"fd00:{10 + k}::1")
            for k in range(1, self.hosts + 1)
        )
        object.__setattr__(self, "lb_hosts", hosts)

    @property
    def run_dir(self) -> str:
        return f"/run/lb-lab/{self.prefix}"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}-router"

    @property
    def router_bird(self) -> LabBird:
        return LabBird(self.run_dir, "router", self.router_ns)

    @property
    def lb_ns(self) -> str:
        return self.lb_hosts[0].netns

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client_ns, self.router_ns, *(h.netns for h in self.lb_hosts), *(b.netns for b in self.backends))

    @property
    def lb_interfaces(self) -> tuple[str, ...]:
        return (UPLINK_IF, *(b.lb_ifname for b in self.backends))

    # --- lifecycle -------------------------------------------------------------

    def down(self) -> list[str]:
        birds = (self.router_bird, *(h.bird for h in self.lb_hosts))
        for bird in birds:
            bird.stop()
        removed = super().down()
        for bird in birds:  # what _start_birds and `lb lab up` wrote
            shutil.rmtree(bird.fragment_dir, ignore_errors=True)
            for path in (bird.config_path, os.path.join(self.run_dir, f"{bird.name}.toml")):
                if os.path.exists(path):
                    os.unlink(path)
        return removed

    def status(self) -> dict[str, Any]:
        present = [ns for ns in self.namespaces if nl.netns_exists(ns)]
        links: dict[str, bool] = {}
        for host in self.lb_hosts:
            if host.netns in present:
                with nl.iproute(host.netns) as ipr:
                    for ifname in self.lb_interfaces:
                        links[f"lb{host.index}:{ifname}"] = nl.link_is_up(ipr, ifname)
        servers = {b.name: bool(self._server_pids(b)) for b in self.backends}
        birds = {b.name: b.pid() is not None for b in (self.router_bird, *(h.bird for h in self.lb_hosts))}
        complete = (len(present) == len(self.namespaces) and len(links) == len(self.lb_hosts) * len(self.lb_interfaces)
                    and all(links.values()) and all(servers.values()) and all(birds.values()))
        return {"prefix": self.prefix, "hosts": self.hosts, "namespaces": present, "links": links,
                "servers": servers, "birds": birds, "complete": complete}

    def _build(self) -> None:
        for ns in self.namespaces:
            nl.create_netns(ns)
        for ns in (self.router_ns, *(h.netns for h in self.lb_hosts)):
            nl.set_sysctl(ns, "net.ipv6.conf.all.keep_addr_on_down", "1")  # a link down and up keeps them
        with nl.iproute(self.router_ns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_veth(ipr, LB_CLIENT_IF, HOST_IF, self.client_ns)
            nl.add_address(ipr, LB_CLIENT_IF, LB_CLIENT_ADDR, CLIENT_NET_PREFIXLEN)
            nl.add_address(ipr, LB_CLIENT_IF, LB_CLIENT_ADDR6, CLIENT_NET6_PREFIXLEN, nodad=True)
            nl.set_up(ipr, LB_CLIENT_IF)
            for host in self.lb_hosts:
                nl.add_veth(ipr, host.router_ifname, UPLINK_IF, host.netns)
                nl.add_address(ipr, host.router_ifname, host.router_address, 24)
                nl.add_address(ipr, host.router_ifname, host.router_address6, 64, nodad=True)
                nl.set_up(ipr, host.router_ifname)
        for key, value in (("net.ipv4.ip_forward", "1"), ("net.ipv4.fib_multipath_hash_policy", "1"),
                           ("net.ipv6.conf.all.forwarding", "1"), ("net.ipv6.fib_multipath_hash_policy", "1")):
            nl.set_sysctl(self.router_ns, key, value)
        for host in self.lb_hosts:
            # The router sends into the hosts' XDP and receives their XDP_TX.
            nl.set_features(self.router_ns, host.router_ifname, SENDER_FEATURES)
            self._build_host(host)
        self._configure_host(self.client_ns, CLIENT_ADDR, CLIENT_NET_PREFIXLEN, LB_CLIENT_ADDR)
        self._configure_host6(self.client_ns, CLIENT_ADDR6, CLIENT_NET6_PREFIXLEN, LB_CLIENT_ADDR6)
        with nl.iproute(self.client_ns) as ipr:
            nl.add_route(ipr, f"{VIP}/32", gateway=LB_CLIENT_ADDR)
            nl.add_route(ipr, f"{VIP6}/128", gateway=LB_CLIENT_ADDR6)
        for b in self.backends:
            self._configure_backend(b.netns, b.address)
        for b in self.backends:
            self.start_server(b)
        self._start_birds()

    def _build_host(self, host: LbHost) -> None:
        with nl.iproute(host.netns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_address(ipr, UPLINK_IF, host.address, 24)
            nl.add_address(ipr, UPLINK_IF, host.address6, 64, nodad=True)
            nl.set_up(ipr, UPLINK_IF)
            nl.add_route(ipr, "default", gateway=host.router_address)
            nl.add_route(ipr, "::/0", gateway=host.router_address6)
            for b in self.backends:
                nl.add_veth(ipr, b.lb_ifname, f"eth{host.index - 1}", b.netns)
                nl.add_address(ipr, b.lb_ifname, host.gateway, 32)
                nl.set_up(ipr, b.lb_ifname)
                nl.add_route(ipr, f"{b.address}/32", oif=b.lb_ifname)
        nl.set_sysctl(host.netns, "net.ipv4.ip_forward", "1")

    def set_links(self, host: LbHost, up: bool, ifnames: tuple[str, ...] | None = None) -> None:
        """A host's links (all, or ``ifnames``) down — a host that dies, or that
        leaves the backends' gateways — or up again with their routes (the
        kernel drops a route with its interface)."""
        with nl.iproute(host.netns) as ipr:
            for ifname in ifnames or self.lb_interfaces:
                ipr.link("set", index=nl.ifindex(ipr, ifname), state="up" if up else "down")
            if up:
                nl.add_route(ipr, "default", gateway=host.router_address)
                nl.add_route(ipr, "::/0", gateway=host.router_address6)
                for b in self.backends:
                    nl.add_route(ipr, f"{b.address}/32", oif=b.lb_ifname)

    def _configure_backend(self, ns: str, address: str) -> None:
        for key, value in (("net.ipv4.fib_multipath_hash_policy", "1"),
                           ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1")):
            nl.set_sysctl(ns, key, value)
        with nl.iproute(ns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_address(ipr, HOST_IF, address, 32)
            hops = []
            for host in self.lb_hosts:
                ifname = f"eth{host.index - 1}"
                nl.set_up(ipr, ifname)
                nl.add_route(ipr, f"{host.gateway}/32", oif=ifname)
                hops.append({"gateway": host.gateway, "oif": nl.ifindex(ipr, ifname), "flags": RTNH_F_ONLINK})
            ipr.route("add", dst="0.0.0.0/0", multipath=hops)
        for host in self.lb_hosts:
            nl.set_features(ns, f"eth{host.index - 1}", SENDER_FEATURES)

    def _start_birds(self) -> None:
        try:
            self.router_bird.start(self.router_bird_config())
            for host in self.lb_hosts:
                host.bird.start(f"router id {host.address};\nprotocol device {{ scan time 1; }}\n"
                                f"{host.bird.include_line()}\n")
        except LabBirdError as exc:
            raise LabError(str(exc)) from exc

    def router_bird_config(self) -> str:
        peers = "".join(f"protocol bgp lb{h.index} from lbhost {{ neighbor {h.address} as {LB_AS}; }}\n"
                        for h in self.lb_hosts)
        return f"""# The lab's router: ECMP over every lb host that announces a VIP.
router id {LB_CLIENT_ADDR};
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ export all; }}; merge paths on; }}
protocol bfd {{ interface "to-lb*" {{ min rx interval {BFD_INTERVAL_MS} ms; min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }}; }}
template bgp lbhost {{
  local as {ROUTER_AS};
  connect retry time 1;
  error wait time 1, 5;
  graceful restart off;
  bfd on;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
{peers}"""

    # --- the hosts' lb configs -------------------------------------------------------

    def host_name(self, host: LbHost) -> str:
        return f"{self.prefix}-lb{host.index}"

    def host_config(self, base: str, host: LbHost, *, bfd: bool = True, hold_time: int = HOLD_TIME,
                    extra_bgp: str = "") -> str:
        """``base`` (a config for the one-host lab) made this host's: its name,
        namespace, interfaces and admin socket, and a [load_balancer.bgp] table."""
        settings = {
            "name": f'"{self.host_name(host)}"',
            "netns": f'"{host.netns}"',
            "interfaces": "[" + ", ".join(f'"{i}"' for i in self.lb_interfaces) + "]",
            "admin_socket": f'"/run/lb/{self.host_name(host)}.sock"',
        }
        head, sep, rest = base.partition("[load_balancer]")
        if not sep:
            raise ValueError("the base config has no [load_balancer] table")
        next_table = re.search(r"^\[", rest, re.M)
        cut = next_table.start() if next_table else len(rest)
        section, tail = rest[:cut], rest[cut:]
        for key, value in settings.items():
            line = f"{key} = {value}"
            section, found = re.subn(rf"^{key}\s*=.*$", line, section, count=1, flags=re.M)
            if not found:
                section = f"\n{line}" + section
        bgp = f"""
[load_balancer.bgp]
router_id = "{host.address}"
local_as = {LB_AS}
neighbors = [{{ address = "{host.router_address}", as = {ROUTER_AS} }}]
hold_time = {hold_time}
bfd = {{ enabled = {"true" if bfd else "false"}, interval = {BFD_INTERVAL_MS}, multiplier = {BFD_MULTIPLIER} }}
bird_socket = "{host.bird.socket}"
bird_config = "{host.bird.fragment_dir}/lb.conf"
{extra_bgp}
"""
        return head + sep + section + bgp + "\n" + tail

    def host_config_path(self, host: LbHost) -> str:
        return os.path.join(self.run_dir, f"lb{host.index}.toml")

    def write_host_configs(self, base: str) -> list[str]:
        """Each host's config (host_config of ``base``) under run_dir; their paths."""
        paths = []
        for host in self.lb_hosts:
            path = self.host_config_path(host)
            with open(path, "w") as f:
                f.write(self.host_config(base, host))
            paths.append(path)
        return paths

    def vip_next_hops(self, vip: str = VIP) -> list[str]:
        """The router's kernel route to the VIP (/32 or /128): its next hops (host addresses)."""
        address = ipaddress.ip_address(vip)
        family = 10 if address.version == 6 else 2  # AF_INET6, AF_INET
        with nl.iproute(self.router_ns) as ipr:  # a dump: get_routes(dst=...) is a lookup, one next hop
            found = [r for r in ipr.get_routes(family=family, table=254)
                     if r.get_attr("RTA_DST") == str(address) and r["dst_len"] == address.max_prefixlen]
        hops: list[str] = []
        for route in found:
            gateway = route.get_attr("RTA_GATEWAY")
            if gateway:
                hops.append(gateway)
            for hop in route.get_attr("RTA_MULTIPATH") or []:
                hop_gateway = hop.get_attr("RTA_GATEWAY")
                if hop_gateway:
                    hops.append(hop_gateway)
        return sorted(hops, key=ipaddress.ip_address)

    def host_of(self, address: str) -> LbHost:
        return next(h for h in self.lb_hosts if h.address == address)
