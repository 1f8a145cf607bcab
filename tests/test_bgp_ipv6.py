"""IPv6 VIPs over BGP, between two real BIRDs in namespaces of the test's own:
a router's BIRD learns lb's /128 over an IPv6 session and over an IPv4 one,
installs it (ECMP over both next hops) and loses it when lb withdraws.

    router (BIRD, AS 65000) to-host ══ to-router host (BIRD + lb.bgp.speaker, AS 65001)
      10.255.6.1/24, fd00:ff6::1/64          10.255.6.2/24, fd00:ff6::2/64
      fd00:ff6:1::1/64                      fd00:ff6:1::2/64

lb's config peers with both of the router's addresses: the IPv6 session
carries the IPv6 VIP with next hop fd00:ff6::2 (the session's own address),
the IPv4 one carries the IPv4 VIP and, with ``ipv6_next_hop``, the IPv6 VIP
with next hop fd00:ff6:1::2 — so the router's one kernel route to the VIP has
a next hop per session, and each can be told apart. A second link, with no
IPv6 address, shows what lb says when an IPv4 session cannot carry an IPv6 VIP.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest

from lb import config as configmod
from lb import netlink as nl
from lb.bgp import bird, fragment, speaker
from lb.cli.common import EXIT_NOT_RUNNING
from lb.labbird import LabBird
from lb.model import BgpNeighbor, LoadBalancer
from tests.names import PREFIX, name

pytestmark = pytest.mark.root

VIP = ipaddress.IPv4Address("10.0.0.100")
VIP6 = ipaddress.IPv6Address("fd00:9::100")
ROUTER4, HOST4 = "10.255.6.1", "10.255.6.2"
ROUTER6, HOST6 = "fd00:ff6::1", "fd00:ff6::2"
ROUTER6_2, HOST6_NEXT_HOP = "fd00:ff6:1::1", "fd00:ff6:1::2"  # a second subnet: the sessions' sources stay HOST6
HOST6_NEXT_HOP6 = ipaddress.IPv6Address(HOST6_NEXT_HOP)
V4_ONLY_ROUTER = "10.255.7.1"  # the router's end of a second link, which has no IPv6 address
BOTH = sorted([HOST6, HOST6_NEXT_HOP])  # the /128's next hops: one per session
RUN_DIR = f"/run/lb-test/{PREFIX}/bgp-ipv6"
TIMEOUT = 20.0  # seconds for sessions to come up and the router's kernel route to follow

ROUTER_CONFIG = f"""router id {ROUTER4};
protocol device {{ scan time 1; }}
protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}
protocol kernel {{ ipv6 {{ export all; }}; merge paths on; }}
template bgp lbhost {{ local as 65000; connect retry time 1; error wait time 1, 5; graceful restart off; }}
protocol bgp over4 from lbhost {{
  neighbor {HOST4} as 65001;
  ipv4 {{ import filter {{ if net ~ [ 10.0.0.0/24{{32,32}} ] then accept; reject; }}; export none; }};
  ipv6 {{ import filter {{ if net ~ [ fd00:9::/64{{128,128}} ] then accept; reject; }}; export none; }};
}}
protocol bgp over6 from lbhost {{
  neighbor {HOST6} as 65001;
  ipv6 {{ import filter {{ if net ~ [ fd00:9::/64{{128,128}} ] then accept; reject; }}; export none; }};
}}
"""


@dataclass
class Pair:
    router: LabBird
    host: LabBird
    config_path: str  # lb's config, for `lb status`

    @property
    def router_ns(self) -> str:
        return self.router.netns

    def config(self) -> LoadBalancer:
        return configmod.load(self.config_path)


def lb_config_text(host: LabBird, lb_name: str) -> str:
    """A TCP listener on the IPv4 VIP, an HTTP one on the IPv6 VIP (HTTP
    listeners take IPv6 addresses); both announced by default."""
    return f"""
[load_balancer]
name = "{lb_name}"
[load_balancer.bgp]
router_id = "{HOST4}"
local_as = 65001
neighbors = [
  {{ address = "{ROUTER6}", as = 65000 }},
  {{ address = "{ROUTER4}", as = 65000, ipv6_next_hop = "{HOST6_NEXT_HOP}" }},
]
bird_socket = "{host.socket}"
bird_config = "{host.fragment_dir}/lb.conf"
[[listeners]]
name = "echo"
protocol = "TCP"
address = "{VIP}"
port = 9000
default_action = {{ type = "forward", target_group = "echo" }}
[[listeners]]
name = "web6"
protocol = "HTTP"
address = "{VIP6}"
port = 80
default_action = {{ type = "fixed-response", status_code = 200 }}
[[target_groups]]
name = "echo"
protocol = "TCP"
port = 9000
targets = [{{ id = "10.0.1.11" }}]
"""


def link(a_ns: str, a_if: str, b_ns: str, b_if: str, addresses: dict[str, list[tuple[str, int]]]) -> None:
    with nl.iproute(a_ns) as ipr:
        nl.add_veth(ipr, a_if, b_if, b_ns)
    for ns, ifname in ((a_ns, a_if), (b_ns, b_if)):
        with nl.iproute(ns) as ipr:
            nl.set_up(ipr, "lo")
            for address, prefixlen in addresses[ns]:
                nl.add_address(ipr, ifname, address, prefixlen, nodad=True)
            nl.set_up(ipr, ifname)


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    router_ns, host_ns = name("b6-router"), name("b6-host")
    for ns in (router_ns, host_ns):
        if nl.netns_exists(ns):
            nl.remove_netns(ns)
        nl.create_netns(ns)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    os.makedirs(RUN_DIR)
    router, host = LabBird(RUN_DIR, "router", router_ns), LabBird(RUN_DIR, "host", host_ns)
    try:
        link(router_ns, "to-host", host_ns, "to-router", {
            router_ns: [(ROUTER4, 24), (ROUTER6, 64), (ROUTER6_2, 64)],
            host_ns: [(HOST4, 24), (HOST6, 64), (HOST6_NEXT_HOP, 64)],
        })
        link(router_ns, "to-host-v4", host_ns, "to-router-v4", {  # an IPv4-only link
            router_ns: [(V4_ONLY_ROUTER, 24)], host_ns: [("10.255.7.2", 24)]})
        router.start(ROUTER_CONFIG)
        host.start(f"router id {HOST4};\nprotocol device {{ scan time 1; }}\n{host.include_line()}\n")
        config_path = os.path.join(RUN_DIR, "lb.toml")
        with open(config_path, "w") as f:
            f.write(lb_config_text(host, name("b6")))
        yield Pair(router, host, config_path)
    finally:
        for proc in (host, router):
            proc.stop()
        for ns in (router_ns, host_ns):
            nl.remove_netns(ns)
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def kernel_next_hops(ns: str, prefix: str) -> list[str]:
    """The gateways of the router's kernel route to ``prefix`` (what BIRD installed)."""
    family = "-6" if ":" in prefix else "-4"
    out = subprocess.run(["ip", "-j", family, "-n", ns, "route", "show", prefix], capture_output=True, text=True,
                         check=True).stdout
    hops: list[str] = []
    for route in json.loads(out or "[]"):
        if route.get("gateway"):
            hops.append(route["gateway"])
        hops += [hop["gateway"] for hop in route.get("nexthops", []) if hop.get("gateway")]
    return sorted(hops)


def wait_next_hops(ns: str, prefix: str, expected: list[str]) -> float:
    start = time.monotonic()
    while time.monotonic() - start < TIMEOUT:
        if kernel_next_hops(ns, prefix) == expected:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"the router's route to {prefix} goes via {kernel_next_hops(ns, prefix)}, not {expected}")


def learned_from(router: LabBird, prefix: str) -> list[str]:
    """The router BIRD's BGP protocols that gave it ``prefix``."""
    reply = bird.command(router.socket, f"show route {prefix} table master{6 if ':' in prefix else 4}")
    return sorted(text.split("[", 1)[1].split()[0] for text in reply.rows(1007) if "[" in text)


def test_the_router_learns_the_ipv6_vip_over_both_sessions_and_loses_it_on_withdraw(pair: Pair) -> None:
    lb = pair.config()
    assert lb.bgp is not None and lb.bgp.announce == (VIP, VIP6)  # the default: both families
    s = speaker.Speaker(lb)
    s.start()
    try:
        s.update({VIP, VIP6})
        took = wait_next_hops(pair.router_ns, f"{VIP6}/128", BOTH)
        wait_next_hops(pair.router_ns, f"{VIP}/32", [HOST4])
        print(f"\nthe router installed the /128 over both sessions {took:.2f} s after the announcement")
        assert learned_from(pair.router, f"{VIP6}/128") == ["over4", "over6"]
        assert learned_from(pair.router, f"{VIP}/32") == ["over4"]  # an IPv6 session carries IPv6 only
        status = s.status()
        assert status["announced"] == [f"{VIP}/32", f"{VIP6}/128"] and status["wanted"] == [str(VIP), str(VIP6)]
        assert [(x["neighbor"], x["state"], x["info"]) for x in status["sessions"]] == [
            (ROUTER6, "up", "Established"), (ROUTER4, "up", "Established")]

        # `lb bgp withdraw`: both families go, at the router too; `lb bgp announce`: back.
        assert s.withdraw()["announced"] == []
        took = wait_next_hops(pair.router_ns, f"{VIP6}/128", [])
        wait_next_hops(pair.router_ns, f"{VIP}/32", [])
        print(f"withdrawn at the router {took:.3f} s after lb bgp withdraw")
        assert s.announce()["announced"] == [f"{VIP}/32", f"{VIP6}/128"]
        wait_next_hops(pair.router_ns, f"{VIP6}/128", BOTH)

        # The IPv6 VIP no longer served (its listener not ready): its /128 goes, the /32 stays.
        s.update({VIP})
        wait_next_hops(pair.router_ns, f"{VIP6}/128", [])
        assert kernel_next_hops(pair.router_ns, f"{VIP}/32") == [HOST4]
        s.update({VIP, VIP6})
        wait_next_hops(pair.router_ns, f"{VIP6}/128", BOTH)
    finally:
        assert lb.bgp is not None
        speaker.remove(lb.bgp, lb.name)  # lb down
    wait_next_hops(pair.router_ns, f"{VIP6}/128", [])


def test_lb_status_shows_the_ipv6_prefix(pair: Pair) -> None:
    """`lb status --json` with no daemon asks BIRD: the /128 is there."""
    lb = pair.config()
    assert lb.bgp is not None
    s = speaker.Speaker(lb)
    s.start()
    try:
        s.update({VIP, VIP6})
        result = subprocess.run([sys.executable, "-m", "lb", "status", "-c", pair.config_path, "--json"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == EXIT_NOT_RUNNING, result.stderr  # no daemon: it says so, and asks BIRD
        assert json.loads(result.stdout)["bgp"]["announced"] == [f"{VIP}/32", f"{VIP6}/128"]
        text = subprocess.run([sys.executable, "-m", "lb", "status", "-c", pair.config_path],
                              capture_output=True, text=True, timeout=30).stdout
        assert f"announced: {VIP}/32, {VIP6}/128" in text
    finally:
        speaker.remove(lb.bgp, lb.name)


def test_an_ipv4_only_config_writes_the_fragment_it_always_did(pair: Pair) -> None:
    """No IPv6 VIP or neighbour: no IPv6 table, no ipv6 channel (a session's
    channels changing would restart it on upgrade)."""
    lb = pair.config()
    assert lb.bgp is not None
    v4 = replace(lb.bgp, announce=(VIP,), neighbors=(BgpNeighbor(ipaddress.IPv4Address(ROUTER4), 65000),))
    text = fragment.render(v4, "x", {VIP})
    assert "ipv6" not in text and "route 10.0.0.100/32 blackhole;" in text


def test_an_ipv4_session_without_an_ipv6_next_hop_stops_lb_up(pair: Pair) -> None:
    """An IPv4 neighbour reached over a link where this host has no IPv6
    address: BIRD would send the /128 with next hop :: and the router drop it
    without a word. `lb up` says so (and leaves no fragment); ipv6_next_hop,
    or announcing IPv4 only, is accepted."""
    lb = pair.config()
    assert lb.bgp is not None
    v4_only = replace(lb.bgp, neighbors=(BgpNeighbor(ipaddress.IPv4Address(V4_ONLY_ROUTER), 65000),))
    s = speaker.Speaker(replace(lb, bgp=v4_only))
    with pytest.raises(speaker.SpeakerError) as info:
        nl.run_in_netns(pair.host.netns, s.start)  # as the daemon: inside lb's namespace
    assert str(info.value) == (
        f"load_balancer.bgp.neighbors[0]: {VIP6} cannot be announced to {V4_ONLY_ROUTER}: over an IPv4 session the "
        "IPv6 next hop is this host's IPv6 address on to-router-v4 (the interface toward 10.255.7.1), and "
        "to-router-v4 has none. Add one (global or unique local), set ipv6_next_hop, peer over IPv6 too, or list "
        "only IPv4 addresses in announce (docs/bgp.md)")
    assert not os.path.exists(s.path)
    for bgp in (replace(v4_only, neighbors=(replace(v4_only.neighbors[0], ipv6_next_hop=HOST6_NEXT_HOP6),)),
                replace(v4_only, announce=(VIP,))):
        s = speaker.Speaker(replace(lb, bgp=bgp))
        nl.run_in_netns(pair.host.netns, s.start)
        speaker.remove(bgp, lb.name)
