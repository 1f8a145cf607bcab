"""How the config names kernel entries, and endpoints as a user types them."""

from __future__ import annotations

import collections
import ipaddress
from typing import Any

from lb.dataplane.maps import Endpoint, IPAddress, VipAddr, endpoint_text
from lb.inspect.access import InspectError
from lb.model import ForwardAction, LoadBalancer, Protocol


def vip_dict(vip: VipAddr) -> dict[str, Any]:
    return {"vip": endpoint_text(vip.address, vip.port), "protocol": vip.protocol, "address": str(vip.address),
            "port": vip.port}


def l4_listeners(config: LoadBalancer) -> dict[VipAddr, tuple[str, str | None]]:
    """VIP → (listener name, its target group)."""
    out = {}
    for li in config.listeners_of(Protocol.TCP, Protocol.UDP):
        action = li.default_action
        group = action.target_groups[0].name if isinstance(action, ForwardAction) else None
        vip = VipAddr(li.address, li.port, li.protocol.value)
        out[vip] = (li.name, group)
    return out


def endpoint_groups(config: LoadBalancer) -> dict[Endpoint, list[str]]:
    """L4 target endpoint → the target groups (of the config) that list it."""
    out: dict[Endpoint, list[str]] = collections.defaultdict(list)
    for group in config.target_groups:
        if group.protocol.is_l4:
            for address, port in group.endpoints():
                out[Endpoint(address, port)].append(group.name)
    return out


def parse_endpoint(text: str, *, port_required: bool = True) -> tuple[IPAddress, int | None]:
    """"10.0.0.2:40000" or "[fd00::2]:40000" → (address, port); "10.0.0.2" or
    "fd00::2" (no brackets needed) when the port is optional."""
    form = "ADDRESS:PORT or [IPV6]:PORT" if port_required else "ADDRESS[:PORT] or IPV6 or [IPV6]:PORT"
    stripped = text.strip()
    if stripped.startswith("["):
        inside, bracket, rest = stripped[1:].partition("]")
        address, port = inside, rest.removeprefix(":")
        if not bracket or (rest and not rest.startswith(":")) or rest == ":":
            raise InspectError(f"{text!r} is not {form}")
        try:
            ip: IPAddress = ipaddress.IPv6Address(address)
        except ValueError:
            raise InspectError(f"{text!r}: {address!r} is not an IPv6 address") from None
    elif stripped.count(":") > 1:  # an IPv6 address alone (a port needs the brackets)
        try:
            ip, port = ipaddress.IPv6Address(stripped), ""
        except ValueError:
            raise InspectError(f"{text!r} is not {form}") from None
    else:
        address, colon, port = stripped.rpartition(":")
        if not colon:
            address, port = stripped, ""
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            raise InspectError(f"{text!r} is not {form}") from None
    if not port:
        if port_required:
            raise InspectError(f"{text!r}: a port is needed ({form})")
        return ip, None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise InspectError(f"{text!r}: the port must be 1..65535")
    return ip, int(port)
