"""Can an IPv4 session carry the IPv6 VIPs? The host's side of the answer.

An IPv6 route needs an IPv6 next hop. Over an IPv4 session lb's fragment
says ``next hop self`` and BIRD takes this host's IPv6 address on the
interface toward the neighbour (or the config's ``ipv6_next_hop``). Without
one BIRD still sends the routes, with next hop ``::``, and the router drops
them as malformed (RFC 7606 treat-as-withdraw) without a word: `lb up` asks
the kernel first, as BIRD will, and says what to do.
"""

from __future__ import annotations

import ipaddress

from lb import netlink as nl
from lb.bgp import fragment
from lb.model import Bgp


def missing_ipv6_next_hops(bgp: Bgp) -> list[str]:
    """One sentence per IPv4 neighbour whose session would carry the IPv6
    VIPs with no IPv6 next hop; run inside lb's network namespace."""
    vips = [str(a) for a in bgp.announce if a.version == 6]
    problems: list[str] = []
    if not vips:  # IPv4 only: nothing to ask the kernel
        return problems
    with nl.iproute() as ipr:
        for index, n in enumerate(bgp.neighbors):
            if 6 not in fragment.channels(bgp, n) or n.address.version == 6 or n.ipv6_next_hop is not None:
                continue
            ifname = nl.route_interface(ipr, str(n.address))
            if ifname is None:  # no route: the session cannot come up, which `lb status` shows
                continue
            if any(_global(a) for a in nl.addresses(ipr, ifname)):
                continue
            problems.append(
                f"load_balancer.bgp.neighbors[{index}]: {', '.join(vips)} cannot be announced to {n.address}: "
                f"over an IPv4 session the IPv6 next hop is this host's IPv6 address on {ifname} (the interface "
                f"toward {n.address}), and {ifname} has none. Add one (global or unique local), set "
                f"ipv6_next_hop, peer over IPv6 too, or list only IPv4 addresses in announce (docs/bgp.md)")
    return problems


def _global(text: str) -> bool:
    address = ipaddress.ip_address(text)
    return address.version == 6 and not (address.is_link_local or address.is_loopback)
