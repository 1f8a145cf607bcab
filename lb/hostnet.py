"""The host's network as `lb up` arranges it, and `lb down` puts back.

- `enter_netns`: run inside the config's network namespace (the lab's);
- `place_addresses`: make every listener address local, so the host answers
  ARP (IPv6: neighbour solicitations) for L4 VIPs and the L7 proxy can bind,
  marked as lb's; `remove_addresses` undoes it;
- `xdp_interfaces`: where the XDP program attaches, from the config or from
  the routes.

The synchronous pyroute2 calls here run their own event loop: inside the
daemon's loop, call them from a worker thread.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

from pyroute2.netns import setns

from lb import netlink as nl
from lb.model import ForwardAction, LoadBalancer, Protocol

log = logging.getLogger("lb.hostnet")


class NoSuchNetns(LookupError):
    """The config names a network namespace that does not exist."""


def enter_netns(name: str | None) -> None:
    """Move this thread (call it from the main thread, before any other
    thread or socket exists) into namespace `name`; None stays put."""
    if name is None:
        return
    if not nl.netns_exists(name):
        raise NoSuchNetns(f"load_balancer.netns: namespace {name!r} does not exist (for the lab: lb lab up)")
    setns(name, flags=0)


def listener_addresses(config: LoadBalancer) -> list[str]:
    """Every listener address but 0.0.0.0 and ::, once each, in config order."""
    seen: list[str] = []
    for listener in config.listeners:
        if not listener.address.is_unspecified and str(listener.address) not in seen:
            seen.append(str(listener.address))
    return seen


# IFA_PROTO of the addresses lb places (an unassigned value; `ip address`
# shows `proto 0x6c`; Linux 5.18+, docs/kernel-notes.md). With the state
# file's list it tells lb's own address from one an operator put in its place.
ADDRESS_PROTO = 0x6C

Placed = tuple[str, str, int]  # (ifname, address, prefixlen)


def place_addresses(config: LoadBalancer, earlier: Iterable[Placed] = ()) -> list[Placed]:
    """Make every listener address local. An address inside a connected
    subnet goes on that interface; any other on `lo` (a routed VIP: the
    upstream router, or BGP, sends it here). Returns the addresses lb owns
    (`lb down` removes those): the ones it added now, and the ones already
    there that `earlier` (the state file of an `lb up` killed before `lb
    down`) lists and that still carry lb's mark. Any other address already
    there is the operator's, and stays theirs."""
    owned: list[Placed] = []
    ours_before = {address for _, address, _ in earlier}
    with nl.iproute() as ipr:
        for address in listener_addresses(config):
            present = nl.find_address(ipr, address)
            if present is not None:
                ifname, prefixlen, proto = present
                if address in ours_before and proto == ADDRESS_PROTO:
                    owned.append((ifname, address, prefixlen))
                    log.info("address %s/%d on %s: placed by the last lb up, still ours", address, prefixlen, ifname)
                continue
            ifname = nl.interface_for_subnet(ipr, address) or "lo"
            prefixlen = ipaddress.ip_address(address).max_prefixlen
            # IPv6 without duplicate address detection: a tentative address
            # answers no neighbour solicitation and takes no bind() for a second or more.
            nl.add_address(ipr, ifname, address, prefixlen, proto=ADDRESS_PROTO, nodad=prefixlen == 128)
            owned.append((ifname, address, prefixlen))
            log.info("address %s/%d added to %s", address, prefixlen, ifname)
    return owned


def remove_addresses(added: list[Placed], netns: str | None) -> list[str]:
    """Remove what place_addresses owned (inside `netns`); returns the addresses."""
    removed = []
    with nl.iproute(netns) as ipr:
        for ifname, address, prefixlen in added:
            nl.remove_address(ipr, ifname, address, prefixlen)
            removed.append(address)
    return removed


def xdp_interfaces(config: LoadBalancer) -> list[str]:
    """Where the program attaches: the config's list, or derived from the
    routes toward the L4 VIPs' subnets and toward every L4 target."""
    if config.interfaces:
        return list(config.interfaces)
    found: list[str] = []
    with nl.iproute() as ipr:
        l4 = config.listeners_of(Protocol.TCP, Protocol.UDP)
        wanted = [str(listener.address) for listener in l4]
        groups = {a.name for listener in l4 if isinstance(listener.default_action, ForwardAction)
                  for a in listener.default_action.target_groups}  # lb.config allows only forward on L4
        wanted += [str(t.address) for g in config.target_groups if g.name in groups for t in g.targets]
        for address in wanted:
            ifname = nl.interface_for_subnet(ipr, address) or nl.route_interface(ipr, address)
            if ifname and ifname != "lo" and ifname not in found:
                found.append(ifname)
    return found


EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"


def full_nat_port_clash(config: LoadBalancer, path: str = EPHEMERAL_PORTS) -> str | None:
    """A warning when a group uses full NAT and full_nat_port_range overlaps
    this namespace's ephemeral ports: a connection lb's own kernel opens to
    a target (a health check, the L7 proxy) could then hold the 5-tuple a
    full-NAT flow is given, and its replies would be taken for the flow's.
    None when there is no such overlap (or the range cannot be read)."""
    if not any(g.forwarding_mode == "full-nat" for g in config.target_groups):
        return None
    try:
        with open(path) as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return None
    first, last = config.full_nat_port_range
    if first > high or low > last:
        return None
    return (f"full_nat_port_range [{first}, {last}] overlaps the kernel's ephemeral ports {low}-{high} "
            f"(net.ipv4.ip_local_port_range): lb's own connections to a target can collide with full-NAT flows; "
            f"move one of the two apart")
