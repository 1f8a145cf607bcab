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
NEIGHBOR_KEYS = ("address", "as", "password")
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
    router_id = _ipv4(t, "router_id")
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
    """``announce`` must name listener addresses; left out, it is every IPv4 one."""
    served = {listener.address for listener in listeners}
    if not t.has("announce"):
        ipv4 = sorted({a for a in served if isinstance(a, ipaddress.IPv4Address)})
        if not ipv4:
            t.error(None, "nothing to announce: no listener has an IPv4 address")
            return None
        return replace(bgp, announce=tuple(ipv4))
    good = True
    for index, address in enumerate(bgp.announce):
        if address not in served:
            listed = ", ".join(sorted(str(a) for a in served)) or "none"
            t.error_item("announce", index, f"{address} is no listener's address (listeners: {listed})")
            good = False
    return bgp if good else None


def _ipv4(t: Table, key: str) -> ipaddress.IPv4Address | None:
    address = t.address(key)
    if address is not None and address.version != 4:
        t.error(key, f"{address} is not an IPv4 address")
        return None
    return address


def _neighbors(t: Table) -> tuple[m.BgpNeighbor, ...] | None:
    tables = t.tables("neighbors", required=True)
    if not tables and "neighbors" not in t.bad:
        t.error("neighbors", "needs at least 1 neighbor")
    elif len(tables) > MAX_NEIGHBORS:
        t.error("neighbors", f"{len(tables)} neighbors; at most {MAX_NEIGHBORS}")
    result: list[m.BgpNeighbor | None] = []
    for n in tables:
        n.only(*NEIGHBOR_KEYS)
        address = _ipv4(n, "address")
        asn = n.integer("as", 1, MAX_AS)
        password = None
        if n.has("password"):
            password = n.string("password", max_len=MAX_PASSWORD, pattern=PASSWORD, rule=PASSWORD_RULE)
        ok = address is not None and asn is not None and "password" not in n.bad
        result.append(m.BgpNeighbor(address, asn, password) if ok else None)  # type: ignore[arg-type]
    report_duplicates([(n, n.value_of("address")) for n in tables], "address", "neighbor address")
    if "neighbors" in t.bad or None in result:
        return None
    return tuple(x for x in result if x is not None)


def _announce(t: Table) -> tuple[ipaddress.IPv4Address, ...] | None:
    values = t.strings("announce")
    if values is None:
        return None
    t.count("announce", len(values), 1, 64)
    result: list[ipaddress.IPv4Address] = []
    for index, text in enumerate(values):
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            t.error_item("announce", index, f"{shown(text)} is not an IPv4 address")
            continue
        if address.version != 4:
            t.error_item("announce", index, f"{address} is IPv6; lb announces IPv4 addresses only (docs/bgp.md)")
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
