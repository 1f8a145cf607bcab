"""What `lb up` needs of the host's network settings, checked before anything
is loaded or attached.

    problems = host_problems(config, interfaces)  # [] when ready, else one line each

lb refuses to start on a problem rather than change a setting that decides
what else the host does (whether it routes for everyone, how it filters
spoofed sources); each line names the setting, what goes wrong with it, and
the command that fixes it. (bpffs, which only lb's maps use, is mounted when
absent instead: `lb.dataplane.loader.ensure_bpffs`.)

- **IPv4 forwarding** (IPv6 forwarding), where IPv4 (IPv6) TCP/UDP listeners
  need it: the XDP program
  forwards a flow's packets with `bpf_fib_lookup`, which answers
  FWD_DISABLED on a receiving interface whose forwarding is off, and the
  kernel, passed the packet, drops it: new flows time out, and the only
  trace is a counter (`fib_fwd_disabled`).
- **Strict reverse-path filtering** (`rp_filter` 1, the larger of `all` and
  the interface's) on an interface lb attaches to that faces clients (no
  target is routed through it) while the default route leaves by another:
  the kernel drops every packet from a client it would not route back
  through that interface — the HTTP listeners' connections, and the L4
  packets XDP passes to it (a flow's first packet before its next hop is
  known). Loose mode (2) keeps the spoofing check without the asymmetry.

Sysctls are read in this process's network namespace (the daemon has
entered the config's by then).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lb import netlink as nl
from lb.model import LoadBalancer, Protocol

Sysctl = Callable[[str], "str | None"]  # "net/ipv4/conf/eth0/forwarding" -> its value, None if absent


def read_sysctl(path: str) -> str | None:
    """/proc/sys/`path` in this process's network namespace; None if it does not exist."""
    try:
        with open(f"/proc/sys/{path}") as f:
            return f.read().strip()
    except OSError:
        return None


def forwarding_problems(config: LoadBalancer, interfaces: Iterable[str], sysctl: Sysctl = read_sysctl) -> list[str]:
    """A line for each interface XDP attaches to whose forwarding is off, per
    family (IPv4, IPv6) that TCP/UDP listeners need it for."""
    # None for HTTP alone: the proxy's own sockets, nothing forwarded
    versions = {listener.address.version for listener in config.listeners_of(Protocol.TCP, Protocol.UDP)}
    problems = []
    for ifname in interfaces:
        if 4 in versions and sysctl(f"net/ipv4/conf/{ifname}/forwarding") == "0":
            problems.append(
                f"net.ipv4.conf.{ifname}.forwarding is 0: TCP/UDP flows arriving on {ifname} cannot be forwarded "
                "(bpf_fib_lookup answers FWD_DISABLED, the kernel drops them, new flows time out); enable IPv4 "
                "forwarding: sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d/)")
        if 6 in versions and sysctl(f"net/ipv6/conf/{ifname}/forwarding") == "0":
            problems.append(
                f"net.ipv6.conf.{ifname}.forwarding is 0: IPv6 TCP/UDP flows arriving on {ifname} cannot be "
                "forwarded (bpf_fib_lookup answers FWD_DISABLED, the kernel drops them, new flows time out); "
                "enable IPv6 forwarding: sysctl -w net.ipv6.conf.all.forwarding=1 (and persist it in "
                "/etc/sysctl.d/; an interface that takes its address from router advertisements then needs "
                "accept_ra = 2)")
    return problems


def rp_filter_problems(interfaces: Iterable[str], target_interfaces: set[str], default_interfaces: set[str],
                       sysctl: Sysctl = read_sysctl) -> list[str]:
    """A line for each client-facing interface (no target routed through it)
    with strict reverse-path filtering while the default route leaves by
    another interface (see the module's docstring)."""
    if not default_interfaces:
        return []  # no default route: clients are on routes of their own, which rp_filter follows

    def level(name: str) -> int:
        value = sysctl(f"net/ipv4/conf/{name}/rp_filter")
        return int(value) if value is not None and value.isdigit() else 0

    problems = []
    for ifname in interfaces:
        if ifname in target_interfaces or ifname in default_interfaces:
            continue
        if max(level("all"), level(ifname)) == 1:
            default = ", ".join(sorted(default_interfaces))
            problems.append(
                f"net.ipv4.conf.{ifname}.rp_filter is strict (1, the larger of 'all' and {ifname}'s) but the "
                f"default route leaves by {default}: the kernel drops packets from clients arriving on {ifname} "
                "that lb passes to it (HTTP listeners, a new flow's first packet); use loose mode: sysctl -w "
                f"net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{ifname}.rp_filter=2")
    return problems


def host_problems(config: LoadBalancer, interfaces: list[str]) -> list[str]:
    """Every problem of the host for `config` with XDP on `interfaces`, one line each."""
    with nl.iproute() as ipr:
        targets = {str(t.address) for group in config.target_groups for t in group.targets}
        target_interfaces = {ifname for address in targets
                             if (ifname := nl.interface_for_subnet(ipr, address) or nl.route_interface(ipr, address))}
        default_interfaces = nl.default_route_interfaces(ipr)
    return forwarding_problems(config, interfaces) + rp_filter_problems(interfaces, target_interfaces,
                                                                        default_interfaces)
