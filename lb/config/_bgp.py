"""``[load_balancer.bgp]``: the BGP sessions lb's BIRD holds and what it announces.

Read in two steps: :func:`read_bgp` checks the table itself while
``[load_balancer]`` is read, :func:`resolve_announce` checks (or defaults)
the announced addresses once the listeners are known. Every issue names its
key path, as everywhere in :mod:`lb.config`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace

from lb import model as m
from lb.config._reader import Table, report_duplicates, shown

BGP_KEYS = (
    "router_id", "local_as", "neighbors", "hold_time", "bfd", "communities", "announce",
    "withdraw_when_unhealthy", "bird_socket", "bird_config",
)  # fmt: skip
NEIGHBOR_KEYS = ("address", "as", "password", "ipv6_next_hop")
BFD_KEYS = ("enabled", "interval", "multiplier")
MAX_AS = 2**32 - 1
MAX_NEIGHBORS = 16  # ours
MAX_COMMUNITIES = 32  # ours
MAX_PASSWORD = 80  # TCP MD5 keys: Linux takes at most 80 bytes (TCP_MD5SIG_MAXKEYLEN)
# A password goes into BIRD's config between double quotes: no quote, no backslash.
PASSWORD = re.compile(r'[\x21\x23-\x5b\x5d-\x7e]+')
PASSWORD_RULE = 'printable ASCII without spaces, \'"\' or \'\\\''
COMMUNITY = re.compile(r"(\d+):(\d+)(?::(\d+))?")
COMMUNITY_RULE = "'ASN:VALUE' (standard, each 0..65535) or 'ASN:X:Y' (large, each 0..4294967295)"


def read_bgp(t: Table) -> m.Bgp | None:
    """The table without ``announce``'s default; None when it has an issue."""
    t.only(*BGP_KEYS)
    before = len(t.issues)
    router_id = _router_id(t)
    local_as = t.integer("local_as", 1, MAX_AS)
    neighbors = _neighbors(t)
    announce = _announce(t) if t.has("announce") else ()
    hold_time = t.integer("hold_time", 3, 65535, 90)
    bfd = _bfd(t.section("bfd"))
    communities = _communities(t)
    unhealthy = t.boolean("withdraw_when_unhealthy", True)
    socket = t.string("bird_socket", "/run/bird/bird.ctl", max_len=107)  # sun_path
    fragment = t.string("bird_config", "", max_len=4095, empty=True)
    for key, path in (("bird_socket", socket), ("bird_config", fragment)):
        if path and not path.startswith("/"):
            t.error(key, f"{shown(path)} is not an absolute path")
        elif path.endswith("/"):
            t.error(key, f"{shown(path)} names a directory; name the file")
    if len(t.issues) > before or router_id is None or local_as is None or neighbors is None or announce is None:
        return None
    return m.Bgp(router_id, local_as, neighbors, announce, hold_time, bfd, communities, unhealthy, socket, fragment)


def resolve_announce(t: Table, bgp: m.Bgp, listeners: tuple[m.Listener, ...]) -> m.Bgp | None:
    """``announce`` must name listener addresses; left out, it is every one of
    both families (but 0.0.0.0 and ::, a listener on every address). An IPv4
    VIP needs an IPv4 session to go over (IPv6 ones go over both kinds)."""
    served = {listener.address for listener in listeners}
    explicit = t.has("announce")
    if not explicit:
        every = sorted((a for a in served if not a.is_unspecified), key=lambda a: (a.version, a))
        if not every:
            unspecified = ", ".join(sorted({str(a) for a in served}))
            t.error(None, f"nothing to announce: every listener is on the unspecified address ({unspecified})")
            return None
        bgp = replace(bgp, announce=tuple(every))
    good = True
    for index, address in enumerate(bgp.announce):
        if explicit and address not in served:
            listed = ", ".join(str(a) for a in sorted(served, key=lambda a: (a.version, a))) or "none"
            t.error_item("announce", index, f"{address} is no listener's address (listeners: {listed})")
            good = False
    ipv4 = [a for a in bgp.announce if a.version == 4]
    if ipv4 and all(n.address.version == 6 for n in bgp.neighbors):
        why = "every neighbor is IPv6, and lb announces IPv4 VIPs over IPv4 sessions only: add an IPv4 neighbor"
        if explicit:
            for address in ipv4:
                t.error_item("announce", bgp.announce.index(address), f"{address} is IPv4 but {why}, "
                                                                       "or leave it out of announce")
        else:
            t.error("neighbors", f"{', '.join(map(str, ipv4))} would be announced (announce defaults to every "
                                 f"listener address) but {why}, or list the addresses to announce in announce")
        good = False
    return bgp if good else None


def _router_id(t: Table) -> ipaddress.IPv4Address | None:
    address = t.address("router_id")
    if address is not None and address.version != 4:
        t.error("router_id", f"{address} is not an IPv4 address: a BGP router ID is 32 bits, written as an IPv4 "
                             "address even on an IPv6-only host (any unique one)")
        return None
    return address


def _unusable(address: m.IPAddress) -> str | None:
    """Why ``address`` cannot be a BGP neighbour or next hop, or None."""
    if address.is_unspecified or address.is_multicast:
        return "is not a unicast address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_link_local:
            return "is link-local (fe80::/10), which needs an interface; use a global or unique local (fd00::/8) one"
        if address.ipv4_mapped is not None:
            return f"is IPv4-mapped; write {address.ipv4_mapped}"
    return None


def _neighbors(t: Table) -> tuple[m.BgpNeighbor, ...] | None:
    tables = t.tables("neighbors", required=True)
    if not tables and "neighbors" not in t.bad:
        t.error("neighbors", "needs at least 1 neighbor")
    elif len(tables) > MAX_NEIGHBORS:
        t.error("neighbors", f"{len(tables)} neighbors; at most {MAX_NEIGHBORS}")
    result: list[m.BgpNeighbor | None] = []
    for n in tables:
        n.only(*NEIGHBOR_KEYS)
        address = n.address("address")
        if address is not None and (why := _unusable(address)):
            n.error("address", f"{address} {why}")
        asn = n.integer("as", 1, MAX_AS)
        password = None
        if n.has("password"):
            password = n.string("password", max_len=MAX_PASSWORD, pattern=PASSWORD, rule=PASSWORD_RULE)
        next_hop = _ipv6_next_hop(n, address) if n.has("ipv6_next_hop") else None
        ok = address is not None and asn is not None and not {"address", "password", "ipv6_next_hop"} & n.bad
        result.append(m.BgpNeighbor(address, asn, password, next_hop) if ok else None)  # type: ignore[arg-type]
    report_duplicates([(n, str(a.address) if a is not None else None) for n, a in zip(tables, result, strict=True)],
                      "address", "neighbor address")
    if "neighbors" in t.bad or None in result or any(n.bad for n in tables):
        return None
    return tuple(x for x in result if x is not None)


def _ipv6_next_hop(n: Table, neighbor: m.IPAddress | None) -> ipaddress.IPv6Address | None:
    """The next hop of the IPv6 VIPs over an IPv4 session (this host's IPv6
    address toward the router), when BIRD's own pick will not do."""
    address = n.address("ipv6_next_hop")
    if address is None:
        return None
    if address.version != 6:
        n.error("ipv6_next_hop", f"{address} is not an IPv6 address")
    elif why := _unusable(address):
        n.error("ipv6_next_hop", f"{address} {why}")
    elif neighbor is not None and neighbor.version == 6:
        n.error("ipv6_next_hop", f"{neighbor} is an IPv6 neighbor: its session's own address is the next hop of "
                                 "the IPv6 VIPs (ipv6_next_hop is for IPv4 sessions)")
    else:
        return address
    return None


def _announce(t: Table) -> tuple[m.IPAddress, ...] | None:
    values = t.strings("announce")
    if values is None:
        return None
    t.count("announce", len(values), 1, 64)
    result: list[m.IPAddress] = []
    for index, text in enumerate(values):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            t.error_item("announce", index, f"{shown(text)} is not an IPv4 or IPv6 address")
            continue
        if address.is_unspecified:
            t.error_item("announce", index, f"{address} is the unspecified address (a listener on every address): "
                                            "announce the addresses clients connect to")
        elif address in result:
            t.error_item("announce", index, f"{address} is listed twice")
        else:
            result.append(address)
    return None if "announce" in t.bad else tuple(result)


def _bfd(t: Table) -> m.Bfd:
    t.only(*BFD_KEYS)
    default = m.Bfd()
    return m.Bfd(
        enabled=t.boolean("enabled", default.enabled),
        interval=t.integer("interval", 10, 10000, default.interval),
        multiplier=t.integer("multiplier", 1, 255, default.multiplier),
    )


def _communities(t: Table) -> tuple[tuple[int, ...], ...]:
    values = t.strings("communities", required=False) or []
    t.count("communities", len(values), 0, MAX_COMMUNITIES)
    result: list[tuple[int, ...]] = []
    for index, text in enumerate(values):
        match = COMMUNITY.fullmatch(text)
        parts = tuple(int(p) for p in match.groups() if p is not None) if match else ()
        limit = 0xFFFF if len(parts) == 2 else MAX_AS
        if not parts or any(p > limit for p in parts):
            t.error_item("communities", index, f"{shown(text)} is not a community: {COMMUNITY_RULE}")
        elif parts in result:
            t.error_item("communities", index, f"{shown(text)} is listed twice")
        else:
            result.append(parts)
    return tuple(result)
