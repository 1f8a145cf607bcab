"""How the config names kernel entries, and endpoints as a user types them."""

from __future__ import annotations

import collections
import ipaddress
from typing import Any

from lb.dataplane.maps import Endpoint, VipAddr
from lb.inspect.access import InspectError
from lb.model import ForwardAction, LoadBalancer, Protocol


def vip_dict(vip: VipAddr) -> dict[str, Any]:
    return {"vip": f"{vip.address}:{vip.port}", "protocol": vip.protocol, "address": str(vip.address), "port": vip.port}


def l4_listeners(config: LoadBalancer) -> dict[VipAddr, tuple[str, str | None]]:
    """VIP → (listener name, its target group)."""
    out = {}
    for li in config.listeners_of(Protocol.TCP, Protocol.UDP):
        action = li.default_action
        group = action.target_groups[0].name if isinstance(action, ForwardAction) else None
        vip = VipAddr(li.address, li.port, li.protocol.value)  # type: ignore[arg-type]  # lb.config admits only IPv4 on L4
        out[vip] = (li.name, group)
    return out


def endpoint_groups(config: LoadBalancer) -> dict[Endpoint, list[str]]:
    """L4 target endpoint → the target groups (of the config) that list it."""
    out: dict[Endpoint, list[str]] = collections.defaultdict(list)
    for group in config.target_groups:
        if group.protocol.is_l4:
            for address, port in group.endpoints():
                out[Endpoint(address, port)].append(group.name)  # type: ignore[arg-type]  # lb.config admits only IPv4 on L4
    return out


def parse_endpoint(text: str, *, port_required: bool = True) -> tuple[ipaddress.IPv4Address, int | None]:
    """"10.0.0.2:40000" → (address, port); "10.0.0.2" when the port is optional."""
    address, colon, port = text.strip().rpartition(":")
    if not colon:
        address, port = text.strip(), ""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise InspectError(f"{text!r} is not an IPv4 ADDRESS{':PORT' if port_required else '[:PORT]'}") from None
    if not port:
        if port_required:
            raise InspectError(f"{text!r}: a port is needed (ADDRESS:PORT)")
        return ip, None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise InspectError(f"{text!r}: the port must be 1..65535")
    return ip, int(port)

