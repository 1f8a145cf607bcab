"""Where a load balancer's program and maps are pinned, and with which limits.

    with open_pinned(config) as maps:       # MapsNotLoaded: nothing pinned
        ...

The config decides both the pin directory (/sys/fs/bpf/lb/<name>/) and the
limits the program was compiled with (ring size, idle timeouts). The daemon,
the metrics scrape, `lb` inspection and the demo all open the maps here, so
they all read them with the limits of the program that pinned them.
"""

from __future__ import annotations

from lb.dataplane.maps import Maps
from lb.dataplane.structs import Limits
from lb.model import LoadBalancer, Protocol

PIN_ROOT = "/sys/fs/bpf/lb"
PROGRAM_PIN = "prog"  # the program itself, beside its maps: `lb status` and `lb down` find it there


def pin_dir(name: str) -> str:
    return f"{PIN_ROOT}/{name}"


def limits_for(config: LoadBalancer) -> Limits:
    """The program's compile-time limits for `config` (the rest are Limits' defaults)."""
    return Limits(ring_size=config.ring_size, tcp_idle_timeout=config.tcp_idle_timeout,
                  udp_idle_timeout=config.udp_idle_timeout, tcp_closed_timeout=config.tcp_closed_timeout,
                  tcp_time_wait_timeout=config.tcp_time_wait_timeout, new_flow_rate_limit=config.new_flow_rate_limit,
                  tcp_syn_timeout=config.tcp_syn_timeout, max_vips=config.max_vips, max_targets=config.max_targets,
                  conntrack_size=config.conntrack_size, half_open_size=config.half_open_size,
                  fullnat_port_min=config.full_nat_port_range[0], fullnat_port_max=config.full_nat_port_range[1],
                  ipv6_flows=has_ipv6_flows(config))


def has_ipv6_flows(config: LoadBalancer) -> bool:
    """Whether `config` has an IPv6 TCP/UDP listener: the IPv6 flow tables get
    their full sizes (Limits.ipv6_flows). HTTP listeners are the L7 proxy's sockets."""
    return any(listener.address.version == 6 for listener in config.listeners_of(Protocol.TCP, Protocol.UDP))


def open_pinned(config: LoadBalancer) -> Maps:
    """The maps pinned for `config` (close them, or use `with`); MapsNotLoaded if none are."""
    return Maps(pin_dir(config.name), limits_for(config))
