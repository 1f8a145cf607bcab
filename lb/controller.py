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
ring and not *in service*, so they get no new flows, and a SYN does not
follow an old entry to them. Connection termination, as NLB has it: with
`unhealthy_connection_termination` (default on) an unhealthy target's
flows end at once (their entries are removed, the next packet of each is
hashed onto the ring, whose target answers a mid-flow segment with a RST);
with `deregistration_connection_termination` (default off) a deregistered
target's flows end when its delay does, else they go on. At L7 the draining
set lets in-flight requests finish; new requests only go to the in-service
set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from lb.dataplane.dataplane import Dataplane, L4Service
from lb.dataplane.maps import Endpoint, VipAddr
from lb.health.anomaly import MITIGATED_SHARE
from lb.l7.table import GroupTargets, RoutingTable
from lb.model import ForwardAction, LoadBalancer, Protocol, Target, TargetGroup, TargetHealth, TargetState

log = logging.getLogger("lb.controller")


class HealthView(TypingProtocol):
    """What the controller needs from the health checker (lb.health)."""

    def in_service(self, group: str) -> tuple[Target, ...]: ...

    def draining(self, group: str) -> tuple[Target, ...]: ...

    def registered(self, group: str) -> tuple[Target, ...]: ...

    def healthy_since(self, group: str, target: Target) -> float | None: ...

    def target_health(self, group: str, target: Target) -> TargetHealth: ...


class L7Sink(TypingProtocol):
    """Where routing tables go (lb.l7.server.L7Server)."""

    def update(self, table: RoutingTable) -> None: ...


@dataclass(frozen=True)
class GroupView:
    """One target group's targets split by what traffic they may take."""

    group: TargetGroup
    in_service: tuple[Target, ...]
    draining: tuple[Target, ...]
    out_of_service: tuple[Target, ...]  # registered, neither in service nor draining (initial, unhealthy)
    # Slow start: in-service targets still ramping, with their share (0..1)
    # of a full one, and when the last of them finishes (clock time).
    ramp: tuple[tuple[Target, float], ...] = ()
    ramp_ends: float | None = None
    unhealthy: tuple[Target, ...] = ()  # of out_of_service, the unhealthy ones

    def share(self, target: Target) -> float:
        return next((s for t, s in self.ramp if t == target), 1.0)

    @property
    def terminated(self) -> tuple[Target, ...]:
        """Targets whose L4 flows end now: unhealthy ones, with unhealthy_connection_termination."""
        return self.unhealthy if self.group.unhealthy_connection_termination else ()


# A ramping target's share grows in steps: rings are rebuilt, and L7 tables
# swapped, at most this often while any target of a group ramps.
RAMP_STEP_SECONDS = 3.0
RAMP_MIN_SHARE = 0.02  # a target just healthy still gets a trickle
L4_WEIGHT_SCALE = 100  # Maglev weights are integers: full share = weight × 100


def slow_start_ramp(group: TargetGroup, live: tuple[Target, ...], health: HealthView,
                    now: float) -> tuple[tuple[tuple[Target, float], ...], float | None]:
    """ELB slow start: a target that became healthy less than `slow_start`
    seconds ago takes a linearly growing share. Not applied when it is the
    only target in service (there is nobody to spare it)."""
    if group.slow_start <= 0 or len(live) < 2:
        return (), None
    ramp = []
    ends = None
    for target in live:
        since = health.healthy_since(group.name, target)
        if since is None or now - since >= group.slow_start:
            continue
        ramp.append((target, max(RAMP_MIN_SHARE, (now - since) / group.slow_start)))
        ends = max(ends or 0.0, since + group.slow_start)
    if len(ramp) == len(live):  # all ramp together (e.g. at start): equal footing, nothing to do
        return (), None
    return tuple(ramp), ends


def group_views(config: LoadBalancer, health: HealthView, now: float | None = None) -> dict[str, GroupView]:
    now = time.monotonic() if now is None else now
    views = {}
    for group in config.target_groups:
        live = health.in_service(group.name)
        draining = health.draining(group.name)
        rest = tuple(t for t in health.registered(group.name) if t not in live and t not in draining)
        unhealthy = tuple(t for t in rest if health.target_health(group.name, t).state is TargetState.UNHEALTHY)
        ramp, ends = slow_start_ramp(group, live, health, now)
        views[group.name] = GroupView(group, live, draining, rest, ramp, ends, unhealthy)
    return views


def _endpoint(group: TargetGroup, target: Target) -> Endpoint:
    port = target.traffic_port(group.port)
    return Endpoint(target.address, port)


def desired_l4(config: LoadBalancer, views: dict[str, GroupView]) -> list[L4Service]:
    services = []
    for listener in config.listeners_of(Protocol.TCP, Protocol.UDP):
        action = listener.default_action
        assert isinstance(action, ForwardAction)  # lb.config allows nothing else on L4 listeners
        view = views[action.target_groups[0].name]
        if view.ramp:
            members = tuple((_endpoint(view.group, t), max(1, round(t.weight * L4_WEIGHT_SCALE * view.share(t))))
                            for t in view.in_service)
        else:
            members = tuple((_endpoint(view.group, t), t.weight) for t in view.in_service)
        ended = tuple(_endpoint(view.group, t) for t in view.terminated)
        keep = tuple(_endpoint(view.group, t) for t in (*view.draining, *view.out_of_service)
                     if t not in view.terminated)
        vip = VipAddr(listener.address, listener.port, listener.protocol.value)
        in_ring = {e for e, _ in members}
        services.append(L4Service(vip, members=members, draining=tuple(e for e in keep if e not in in_ring),
                                  terminated=tuple(e for e in ended if e not in in_ring),
                                  end_flows_on_removal=view.group.deregistration_connection_termination,
                                  mode=view.group.forwarding_mode))
    return services


def desired_l7(config: LoadBalancer, views: dict[str, GroupView], version: int,
               mitigated: Callable[[str], frozenset[str]] | None = None) -> RoutingTable:
    """The L7 table; a target `mitigated(group)` names ("address:port",
    lb.health.anomaly) takes MITIGATED_SHARE of its share, as a ramping one does."""
    groups = []
    for view in views.values():
        if view.group.protocol is not Protocol.HTTP:
            continue
        port = view.group.port
        down = mitigated(view.group.name) if mitigated is not None else frozenset()
        ramp = []
        for t in view.in_service:
            share = view.share(t)
            if f"{t.address}:{t.traffic_port(port)}" in down:
                share = min(share, MITIGATED_SHARE)
            if share < 1.0:
                ramp.append((str(t.address), t.traffic_port(port), share))
        groups.append(GroupTargets(
            view.group,
            in_service=tuple((str(t.address), t.traffic_port(port), t.weight) for t in view.in_service),
            draining=frozenset((str(t.address), t.traffic_port(port)) for t in view.draining),
            ramp=tuple(ramp),
        ))
    return RoutingTable(config.listeners_of(Protocol.HTTP), tuple(groups), float(config.idle_timeout), version,
                        config.access_log)


class Controller:
    """Reconciles on demand: at start, on every health change, on reload."""

    def __init__(self, config: LoadBalancer, health: HealthView, dataplane: Dataplane | None,
                 l7: L7Sink | None) -> None:
        self.config = config
        self.health = health
        self.dataplane = dataplane
        self.l7 = l7
        self.version = 0
        self.mitigated: Callable[[str], frozenset[str]] | None = None  # passive health (lb.health.anomaly)

    def set_config(self, config: LoadBalancer) -> None:
        self.config = config

    def routing_table(self) -> RoutingTable:
        return desired_l7(self.config, group_views(self.config, self.health), self.version, self.mitigated)

    def reconcile(self) -> float | None:
        """Write the desired state; returns in how many seconds to reconcile
        again (a target is in slow start), or None."""
        self.version += 1
        now = time.monotonic()
        views = group_views(self.config, self.health, now)
        if self.dataplane is not None:
            self.dataplane.apply(desired_l4(self.config, views))
        if self.l7 is not None:
            self.l7.update(desired_l7(self.config, views, self.version, self.mitigated))
        log.debug("reconciled (version %d)", self.version)
        ends = [v.ramp_ends for v in views.values() if v.ramp_ends is not None]
        return min(RAMP_STEP_SECONDS, max(0.0, min(ends) - now)) if ends else None
