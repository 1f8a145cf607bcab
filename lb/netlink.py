"""pyroute2 helpers: namespaces, interfaces, addresses, sysctls, ethtool features.

Everything here talks to the kernel through netlink or ioctl (pyroute2), never
by running `ip`. Work that must happen *inside* a network namespace (sysctls,
ethtool ioctls, creating a socket there) runs in a short-lived thread that
has called setns(2): setns changes only the calling thread's namespace, so
the rest of the process stays where it was.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns
from pyroute2.ethtool import Ethtool
from pyroute2.netlink.exceptions import NetlinkError

T = TypeVar("T")

NETNS_DIR = "/run/netns"


class NetlinkLookupError(LookupError):
    """An interface or namespace the caller named does not exist."""


# --- namespaces --------------------------------------------------------------


def netns_exists(name: str) -> bool:
    return name in netns.listnetns()


def netns_inode(name: str) -> int | None:
    """Inode of a named namespace, the identity /proc/PID/ns/net links to."""
    try:
        return os.stat(os.path.join(NETNS_DIR, name)).st_ino
    except FileNotFoundError:
        return None


def create_netns(name: str) -> None:
    if not netns_exists(name):
        netns.create(name)


def remove_netns(name: str) -> None:
    """Remove a namespace (its veths go with it); absent is fine."""
    try:
        netns.remove(name)
    except FileNotFoundError:
        pass


def pids_in_netns(name: str) -> list[int]:
    """Every process whose network namespace is the named one."""
    inode = netns_inode(name)
    if inode is None:
        return []
    target = f"net:[{inode}]"
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/net") == target:
                pids.append(int(entry))
        except OSError:  # gone meanwhile, or a kernel thread
            continue
    return pids


def run_in_netns(name: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call fn(*args, **kwargs) in a thread that has entered namespace `name`.

    Sockets created there stay in that namespace for their whole life, so this
    is also how tests open client sockets "from" a lab host.
    """
    if name is None:
        return fn(*args, **kwargs)
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            netns.setns(name, flags=0)
            result.append(fn(*args, **kwargs))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{name}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@contextmanager
def iproute(ns: str | None = None) -> Iterator[IPRoute]:
    """An IPRoute bound to a namespace (None: the caller's)."""
    ipr = IPRoute(netns=ns) if ns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


# --- interfaces --------------------------------------------------------------


def ifindex(ipr: IPRoute, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise NetlinkLookupError(f"no interface named {ifname!r}")
    return int(found[0])


def link_is_up(ipr: IPRoute, ifname: str) -> bool:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        return False
    link = ipr.get_links(found[0])[0]
    return bool(link["flags"] & 1)  # IFF_UP


def add_veth(ipr: IPRoute, ifname: str, peer: str, peer_netns: str) -> None:
    """Create a veth pair with `ifname` here and `peer` inside `peer_netns`."""
    ipr.link("add", ifname=ifname, kind="veth", peer={"ifname": peer, "net_ns_fd": peer_netns})


def add_bridge(ipr: IPRoute, ifname: str) -> None:
    ipr.link("add", ifname=ifname, kind="bridge")


def set_master(ipr: IPRoute, ifname: str, bridge: str) -> None:
    """Make `ifname` a port of `bridge`."""
    ipr.link("set", index=ifindex(ipr, ifname), master=ifindex(ipr, bridge))


def set_up(ipr: IPRoute, ifname: str) -> None:
    ipr.link("set", index=ifindex(ipr, ifname), state="up")


IFA_F_NODAD = 0x02  # uapi/linux/if_addr.h: no duplicate address detection (IPv6)


def add_address(ipr: IPRoute, ifname: str, address: str, prefixlen: int, proto: int | None = None,
                *, nodad: bool = False) -> None:
    """Add an address; already present is fine. `proto` (IFA_PROTO, Linux
    5.18+) marks who placed it; `ip address` shows it as `proto N`. `nodad`:
    an IPv6 address usable at once, not tentative while DAD runs."""
    spec: dict[str, Any] = {"proto": proto} if proto is not None else {}
    if nodad:
        spec["flags"] = IFA_F_NODAD
    try:
        ipr.addr("add", index=ifindex(ipr, ifname), address=address, prefixlen=prefixlen, **spec)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def remove_address(ipr: IPRoute, ifname: str, address: str, prefixlen: int) -> None:
    """Remove an address; already absent is fine."""
    try:
        ipr.addr("del", index=ifindex(ipr, ifname), address=address, prefixlen=prefixlen)
    except NetlinkError as exc:
        if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
            raise


def addresses(ipr: IPRoute, ifname: str) -> list[str]:
    return [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=ifindex(ipr, ifname))]


def add_route(ipr: IPRoute, dst: str, *, gateway: str | None = None, oif: str | None = None) -> None:
    """Add a route (dst "default" or a CIDR); already present is fine."""
    spec: dict[str, Any] = {"dst": dst}
    if gateway:
        spec["gateway"] = gateway
    if oif:
        spec["oif"] = ifindex(ipr, oif)
    try:
        ipr.route("add", **spec)
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


# --- sysctl and ethtool (inside a namespace) --------------------------------


def remove_route(ipr: IPRoute, dst: str) -> None:
    """Remove the route to `dst` ("default" or a CIDR); none there is not an error."""
    try:
        ipr.route("del", dst="0.0.0.0/0" if dst == "default" else dst)
    except NetlinkError as exc:
        if exc.code != errno.ESRCH:
            raise


def set_sysctl(ns: str | None, key: str, value: str) -> None:
    """Write net sysctl `key` (dotted, e.g. net.ipv4.ip_forward) in namespace ns."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    run_in_netns(ns, write)


def get_sysctl(ns: str | None, key: str) -> str:
    path = "/proc/sys/" + key.replace(".", "/")

    def read() -> str:
        with open(path) as f:
            return f.read().strip()

    return run_in_netns(ns, read)


def set_features(ns: str | None, ifname: str, features: Mapping[str, bool]) -> None:
    """`ethtool -K` by the kernel's feature names, e.g. {"rx-gro": True}."""

    def apply() -> None:
        with Ethtool() as eth:
            current = eth.get_features(ifname)
            for name, enable in features.items():
                current.features[name].enable = enable
            eth.set_features(ifname, current)

    run_in_netns(ns, apply)


def get_features(ns: str | None, ifname: str) -> dict[str, bool]:
    def read() -> dict[str, bool]:
        with Ethtool() as eth:
            return {name: f.enable for name, f in eth.get_features(ifname).features.items()}

    return run_in_netns(ns, read)


# --- XDP attachment ----------------------------------------------------------

XDP_FLAGS_UPDATE_IF_NOEXIST = 1 << 0
XDP_FLAGS_SKB_MODE = 1 << 1  # generic
XDP_FLAGS_DRV_MODE = 1 << 2  # native
XDP_MODE_FLAGS = {"generic": XDP_FLAGS_SKB_MODE, "native": XDP_FLAGS_DRV_MODE}
# IFLA_XDP_ATTACHED as pyroute2 decodes it.
_ATTACHED_MODE = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}


def attach_xdp(ipr: IPRoute, ifname: str, prog_fd: int, mode: str, *, replace: bool = True) -> None:
    """Attach the program `prog_fd` on `ifname` in mode "native" or "generic".

    With replace=False an interface that already has a program is an error
    (EEXIST/EBUSY) instead of being taken over.
    """
    flags = XDP_MODE_FLAGS[mode] | (0 if replace else XDP_FLAGS_UPDATE_IF_NOEXIST)
    ipr.link(
        "set",
        index=ifindex(ipr, ifname),
        xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]},
    )


def detach_xdp(ipr: IPRoute, ifname: str, mode: str) -> None:
    """Remove the XDP program attached in `mode`; nothing attached, or no such
    interface any more, is fine."""
    try:
        attach_xdp(ipr, ifname, -1, mode)
    except (NetlinkError, NetlinkLookupError) as exc:
        if isinstance(exc, NetlinkError) and exc.code not in (errno.ENODEV, errno.ENOENT):
            raise


def xdp_info(ipr: IPRoute, ifname: str) -> tuple[str | None, int | None]:
    """(mode, program id) of the XDP program on `ifname`; (None, None) if none."""
    link = ipr.get_links(ifindex(ipr, ifname))[0]
    xdp = link.get_attr("IFLA_XDP")
    if xdp is None:
        return None, None
    mode = _ATTACHED_MODE.get(xdp.get_attr("IFLA_XDP_ATTACHED"))
    prog_id = xdp.get_attr("IFLA_XDP_PROG_ID")
    return mode, prog_id


# --- neighbours and MACs (the packet-fixture namespace uses these) ------------

NUD_PERMANENT = 0x80


def set_mac(ipr: IPRoute, ifname: str, mac: str) -> None:
    ipr.link("set", index=ifindex(ipr, ifname), address=mac)


def add_neighbor(ipr: IPRoute, ifname: str, address: str, mac: str) -> None:
    """A permanent neighbour entry (replaces an existing one)."""
    ipr.neigh("replace", dst=address, lladdr=mac, ifindex=ifindex(ipr, ifname), state=NUD_PERMANENT)


# --- where addresses live ----------------------------------------------------


def interface_for_subnet(ipr: IPRoute, address: str) -> str | None:
    """The interface with a connected subnet containing `address`, if any."""
    ip = ipaddress.ip_address(address)
    for entry in ipr.get_addr(family=2 if ip.version == 4 else 10):
        network = ipaddress.ip_network(f"{entry.get_attr('IFA_ADDRESS')}/{entry['prefixlen']}", strict=False)
        if entry["prefixlen"] < network.max_prefixlen and ip in network:
            return str(ipr.get_links(entry["index"])[0].get_attr("IFLA_IFNAME"))
    return None


def route_interface(ipr: IPRoute, address: str) -> str | None:
    """The interface the kernel would send a packet for `address` out of."""
    try:
        routes = ipr.route("get", dst=address)
    except NetlinkError:
        return None
    for route in routes:
        oif = route.get_attr("RTA_OIF")
        if oif:
            return str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME"))
    return None


def default_route_interfaces(ipr: IPRoute) -> set[str]:
    """The interfaces the IPv4 default route leaves by (every path of a multipath one); empty without one."""
    names: set[str] = set()
    for route in ipr.get_default_routes(family=2):
        oifs = [route.get_attr("RTA_OIF"), *(hop["oif"] for hop in route.get_attr("RTA_MULTIPATH") or [])]
        for oif in oifs:
            if oif:
                names.add(str(ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")))
    return names


def route_source(ipr: IPRoute, address: str) -> str | None:
    """The source address the kernel would give a packet for `address` (the
    route's preferred source), if it has a route."""
    try:
        routes = ipr.route("get", dst=address)
    except NetlinkError:
        return None
    for route in routes:
        source = route.get_attr("RTA_PREFSRC")
        if source:
            return str(source)
    return None


NTF_USE = 0x01  # <linux/neighbour.h>: "use" the entry, which starts resolving it


def resolve_neighbor(ipr: IPRoute, address: str) -> None:
    """Start resolving the neighbour entry of the next hop toward `address`
    (`ip neigh add ... use`); without a route, nothing."""
    try:
        routes = ipr.route("get", dst=address)
    except NetlinkError:
        return
    for route in routes:
        oif = route.get_attr("RTA_OIF")
        if oif:
            hop = route.get_attr("RTA_GATEWAY") or address
            try:
                ipr.neigh("add", dst=hop, ifindex=oif, flags=NTF_USE, state=0)
            except NetlinkError:
                pass  # EEXIST: it has one already ("replace" would reset a permanent one)
            return


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def source_toward(address: IPAddress, ns: str | None = None) -> IPAddress | None:
    """lb's own address toward `address` (route_source; of its family), in namespace `ns`; the
    next hop's neighbour entry is resolved on the way, as XDP needs one to
    send full-NAT and DSR packets (it cannot pass them to the kernel).

    Runs in a thread of its own: the daemon calls it from its event loop
    (Dataplane.apply in a reconcile), and pyroute2's IPRoute runs a loop of
    its own, which it cannot do inside a running one."""

    def lookup() -> str | None:
        with iproute(ns) as ipr:
            found = route_source(ipr, str(address))
            resolve_neighbor(ipr, str(address))
        return found

    result: list[str | None] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(lookup())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=body, name="source-toward")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    source = result[0]
    return None if source is None else ipaddress.ip_address(source)


def find_address(ipr: IPRoute, address: str) -> tuple[str, int, int] | None:
    """Where `address` is: (ifname, prefixlen, IFA_PROTO, 0 when unset), or None."""
    for entry in ipr.get_addr():
        if entry.get_attr("IFA_ADDRESS") == address:
            ifname = str(ipr.get_links(entry["index"])[0].get_attr("IFLA_IFNAME"))
            return ifname, int(entry["prefixlen"]), int(entry.get_attr("IFA_PROTO") or 0)
    return None
