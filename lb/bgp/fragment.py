"""The BIRD config fragment lb owns: its VIPs as static routes, its BGP sessions.

Everything lb puts into BIRD is in this one file, and every symbol in it
starts with ``lb_<name>_``, so it can share BIRD with the operator's own
config: BIRD's main config includes it (``include "/run/bird/lb-*.conf";``:
/run/bird is BIRD's own run directory, there before BIRD starts, so the glob
never names a missing directory; and a tmpfs, so no stale fragment survives a
reboot) and lb never writes anything else. The routes live in tables of their own
(``lb_<name>_v4``, and ``lb_<name>_v6`` when there are IPv6 VIPs or
neighbours), so no kernel protocol of the operator's config ever installs
them; the BGP sessions import nothing.

An IPv4 session carries the IPv4 VIPs, and the IPv6 ones too when there are
any: BIRD's ``next hop self`` takes this host's IPv6 address on the
interface toward the neighbour, or the neighbour's ``ipv6_next_hop``. An
IPv6 session carries the IPv6 VIPs only (docs/bgp.md says why).

Written atomically (a temporary file renamed over it); an empty set of VIPs
keeps the sessions up and announces nothing (a withdrawal). Removing the file
(``lb down``) takes the sessions away too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from lb.model import Bgp, BgpNeighbor, IPAddress

DEFAULT_DIR = "/run/bird"  # Debian's BIRD: bird:bird 0775; lb.service joins the group
# BGP timers: a host that comes back is peered again within seconds (BIRD's
# defaults wait 120 s before reconnecting), a session that fails backs off.
CONNECT_RETRY = 5
ERROR_WAIT = (1, 10)


def fragment_path(bgp: Bgp, name: str) -> str:
    return bgp.bird_config or os.path.join(DEFAULT_DIR, f"lb-{name}.conf")


def include_line(path: str) -> str:
    """What BIRD's config needs to read the fragment at ``path`` (a glob: no
    error while the file does not exist)."""
    directory, base = os.path.split(path)
    pattern = "lb-*.conf" if base.startswith("lb-") else "*.conf"
    return f'include "{os.path.join(directory, pattern)}";'


def symbol_prefix(name: str) -> str:
    """lb names are letters, digits and hyphens; BIRD symbols take no hyphen
    (and lb names take no underscore, so the mapping is one to one)."""
    return f"lb_{name.replace('-', '_')}_"


def table_name(name: str, version: int = 4) -> str:
    return f"{symbol_prefix(name)}v{version}"


def uses_ipv6(bgp: Bgp) -> bool:
    """The fragment has an IPv6 table (and channels): IPv6 VIPs or neighbours."""
    return any(a.version == 6 for a in bgp.announce) or any(n.address.version == 6 for n in bgp.neighbors)


def families(bgp: Bgp) -> tuple[int, ...]:
    """The address families of lb's tables: (4,) or (4, 6)."""
    return (4, 6) if uses_ipv6(bgp) else (4,)


def channels(bgp: Bgp, neighbor: BgpNeighbor) -> tuple[int, ...]:
    """The families a session carries: an IPv6 one IPv6 only; an IPv4 one
    IPv4, and IPv6 when some IPv6 VIP is to be announced."""
    if neighbor.address.version == 6:
        return (6,)
    return (4, 6) if any(a.version == 6 for a in bgp.announce) else (4,)


def peer_name(name: str, index: int) -> str:
    return f"{symbol_prefix(name)}peer{index}"


def render(bgp: Bgp, name: str, announced: Iterable[IPAddress]) -> str:
    """The fragment's text: announce exactly ``announced`` (a subset of bgp.announce)."""
    p = symbol_prefix(name)
    wanted = set(announced)
    lines = [f"# Written by lb for load balancer {name!r}; `lb up` rewrites it, `lb down` removes it. Do not edit."]
    for version in families(bgp):
        table = table_name(name, version)
        routes = sorted(a for a in wanted if a.version == version)
        lines += [
            f"ipv{version} table {table};",
            f"protocol static {p}vips{'' if version == 4 else '6'} {{",
            f"  ipv{version} {{ table {table}; }};",
            *(f"  route {address}/{address.max_prefixlen} blackhole;" for address in routes),
            "}",
        ]
    if bgp.bfd.enabled:
        interval = f"{bgp.bfd.interval} ms"
        lines += [  # its sessions are the ones the BGP protocols below ask for
            f"protocol bfd {p}bfd {{",
            f'  interface "*" {{ min rx interval {interval}; min tx interval {interval}; '
            f"multiplier {bgp.bfd.multiplier}; }};",
            "}",
        ]
    export = "".join(
        f"bgp_community.add(({c[0]}, {c[1]})); " if len(c) == 2
        else f"bgp_large_community.add(({c[0]}, {c[1]}, {c[2]})); "
        for c in bgp.communities
    )
    for index, n in enumerate(bgp.neighbors):
        lines += [
            f"protocol bgp {peer_name(name, index)} {{",
            f"  router id {bgp.router_id};",
            f"  local as {bgp.local_as};",
            f"  neighbor {n.address} as {n.asn};",
            f"  hold time {bgp.hold_time};",
            f"  keepalive time {max(1, bgp.hold_time // 3)};",
            f"  connect retry time {CONNECT_RETRY};",
            f"  error wait time {ERROR_WAIT[0]}, {ERROR_WAIT[1]};",
            # A router that kept our routes while we restart would send flows
            # to a host that stopped serving them: a session that ends withdraws.
            "  graceful restart off;",
            *(["  bfd on;"] if bgp.bfd.enabled else []),
            *([f'  password "{n.password}";'] if n.password is not None else []),
        ]
        for version in channels(bgp, n):
            # next hop self: this host's address of the channel's family on the
            # interface toward the neighbour (BIRD's pick), unless the config names one.
            address = f" next hop address {n.ipv6_next_hop};" if version == 6 and n.ipv6_next_hop else ""
            lines.append(f"  ipv{version} {{ table {table_name(name, version)}; import none; "
                         f"export filter {{ {export}accept; }}; next hop self;{address} }};")
        lines.append("}")
    return "\n".join(lines) + "\n"


def write(path: str, text: str) -> None:
    """Replace the fragment atomically. Mode 0640, group of the directory (it
    may hold a password; BIRD, running as user bird, reads it through its group)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(fd, "w") as f:
        try:  # an owner may give a file to a group it is in; lb.service is in group bird
            os.fchown(f.fileno(), -1, os.stat(directory).st_gid)
        except PermissionError:
            pass
        os.fchmod(f.fileno(), 0o640)
        f.write(text)
    os.replace(tmp, path)


def remove(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
