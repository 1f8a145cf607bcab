"""The one reconciler: config + health in, BPF maps and L7 routing tables out.

Desired state is computed from the model and the health checker's view;
the data plane diffs it against the maps (Dataplane.apply) and the L7
server swaps in a new routing table. Nothing else writes maps.

Per target group the health view gives three sets:

- in service: gets new flows and requests (healthy ones, or every
  registered one when none is healthy: fail open, decided by lb.health);
- draining: deregistered, finishing within deregistration_delay;
- the rest of the registered targets (initial, unhealthy): out of the ring
  and the L7 table.

At L4, draining and out-of-service targets stay *active* in the maps (their
established flows still find them through conntrack) but are not in the
ring, so they get no new flows. At L7 the draining set lets in-flight
requests finish; new requests only go to the in-service set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.maps import Endpoint, VipAddr
from lb.l7.table import GroupTargets, RoutingTable
from lb.model import ForwardAction, LoadBalancer, Protocol, Target, TargetGroup

log = logging.getLogger("lb.controller")


class HealthView(TypingProtocol):
    """What the controller needs from the health checker (lb.health)."""

    def in_service(self, group: str) -> tuple[Target, ...]: ...

    def draining(self, group: str) -> tuple[Target, ...]: ...

    def registered(self, group: str) -> tuple[Target, ...]: ...


class L7Sink(TypingProtocol):
    """Where routing tables go (lb.l7.server.L7Server)."""

    def update(self, table: RoutingTable) -> None: ...


@dataclass(frozen=True)
class GroupView:
    """One target group's targets split by what traffic they may take."""

    group: TargetGroup
    in_service: tuple[Target, ...]
    draining: tuple[Target, ...]
    out_of_service: tuple[Target, ...]


def group_views(config: LoadBalancer, health: HealthView) -> dict[str, GroupView]:
    views = {}
    for group in config.target_groups:
        live = health.in_service(group.name)
        draining = health.draining(group.name)
        rest = tuple(t for t in health.registered(group.name) if t not in live and t not in draining)
        views[group.name] = GroupView(group, live, draining, rest)
    return views


def _endpoint(group: TargetGroup, target: Target) -> Endpoint:
    return Endpoint(target.address, target.traffic_port(group.port))  # type: ignore[arg-type]


def desired_l4(config: LoadBalancer, views: dict[str, GroupView]) -> list[L4Service]:
    services = []
    for listener in config.listeners_of(Protocol.TCP, Protocol.UDP):
        action = listener.default_action
        assert isinstance(action, ForwardAction)  # config.py allows nothing else on L4 listeners
        view = views[action.target_groups[0].name]
        members = tuple((_endpoint(view.group, t), t.weight) for t in view.in_service)
        keep = tuple(_endpoint(view.group, t) for t in (*view.draining, *view.out_of_service))
        vip = VipAddr(listener.address, listener.port, listener.protocol.value)  # type: ignore[arg-type]
        in_ring = {e for e, _ in members}
        services.append(L4Service(vip, members=members, draining=tuple(e for e in keep if e not in in_ring)))
    return services


def desired_l7(config: LoadBalancer, views: dict[str, GroupView], version: int) -> RoutingTable:
    groups = []
    for view in views.values():
        if view.group.protocol is not Protocol.HTTP:
            continue
        port = view.group.port
        groups.append(GroupTargets(
            view.group,
            in_service=tuple((str(t.address), t.traffic_port(port), t.weight) for t in view.in_service),
            draining=frozenset((str(t.address), t.traffic_port(port)) for t in view.draining),
        ))
    return RoutingTable(config.listeners_of(Protocol.HTTP), tuple(groups), float(config.idle_timeout), version)


class Controller:
    """Reconciles on demand: at start, on every health change, on reload."""

    def __init__(self, config: LoadBalancer, health: HealthView, dataplane: Dataplane | None,
                 l7: L7Sink | None, on_reconcile: Callable[[], None] | None = None) -> None:
        self.config = config
        self.health = health
        self.dataplane = dataplane
        self.l7 = l7
        self.version = 0
        self._on_reconcile = on_reconcile

    def set_config(self, config: LoadBalancer) -> None:
        self.config = config

    def routing_table(self) -> RoutingTable:
        return desired_l7(self.config, group_views(self.config, self.health), self.version)

    def reconcile(self) -> None:
        self.version += 1
        views = group_views(self.config, self.health)
        if self.dataplane is not None:
            self.dataplane.apply(desired_l4(self.config, views))
        if self.l7 is not None:
            self.l7.update(desired_l7(self.config, views, self.version))
        if self._on_reconcile is not None:
            self._on_reconcile()
        log.debug("reconciled (version %d)", self.version)
