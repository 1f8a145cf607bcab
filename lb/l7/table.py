"""The routing table the controller pushes to the L7 workers.

Pure, frozen, picklable data: the controller builds one in its own process
(from the model and the targets' health) and :class:`lb.l7.server.L7Server`
sends it to every worker, which compiles it (:mod:`lb.l7.routing`) and swaps
it in atomically. Nothing here does I/O or keeps state.

Fail-open (every target unhealthy → all in service) is the controller's
decision, made before the table is built; an empty ``in_service`` tuple here
means "no registered targets" and the proxy answers 503.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from lb.model import AccessLog, Listener, LoadBalancer, Protocol, TargetGroup

Endpoint = tuple[str, int, int]  # (address, port, weight)


@dataclass(frozen=True)
class GroupTargets:
    """One target group: its config and which of its endpoints take traffic."""

    group: TargetGroup
    in_service: tuple[Endpoint, ...] = ()  # new requests go to these
    draining: frozenset[tuple[str, int]] = frozenset()  # (address, port): in-flight only
    # (address, port, share): endpoints in slow start, taking `share` (0..1)
    # of what they will take once it is over.
    ramp: tuple[tuple[str, int, float], ...] = ()


@dataclass(frozen=True)
class RoutingTable:
    """Everything a worker needs to route: listeners, groups, idle timeout;
    and where its access log goes (so that a reload can change it)."""

    listeners: tuple[Listener, ...]  # HTTP listeners only
    groups: tuple[GroupTargets, ...] = ()
    idle_timeout: float = 60.0  # LoadBalancer.idle_timeout, seconds
    version: int = 0  # the controller's counter, for logs
    access_log: AccessLog = AccessLog()  # LoadBalancer.access_log

    def group(self, name: str) -> GroupTargets | None:
        for entry in self.groups:
            if entry.group.name == name:
                return entry
        return None

    @classmethod
    def build(
        cls,
        lb: LoadBalancer,
        in_service: Mapping[str, Iterable[Endpoint]] | None = None,
        draining: Mapping[str, Iterable[tuple[str, int]]] | None = None,
        version: int = 0,
    ) -> RoutingTable:
        """The table for ``lb``'s HTTP listeners.

        ``in_service`` maps a group name to its endpoints in service; a group
        it does not name has all of its registered targets in service (what a
        controller without health results, or a test, wants).
        """
        entries = []
        for group in lb.target_groups:
            if group.protocol is not Protocol.HTTP:
                continue
            if in_service is not None and group.name in in_service:
                live = tuple(in_service[group.name])
            else:
                live = all_endpoints(group)
            gone = frozenset((draining or {}).get(group.name, ()))
            entries.append(GroupTargets(group, live, gone))
        return cls(
            listeners=lb.listeners_of(Protocol.HTTP),
            groups=tuple(entries),
            idle_timeout=float(lb.idle_timeout),
            version=version,
            access_log=lb.access_log,
        )


def all_endpoints(group: TargetGroup) -> tuple[Endpoint, ...]:
    """Every registered target of ``group`` as (address, port, weight)."""
    return tuple((str(t.address), t.traffic_port(group.port), t.weight) for t in group.targets)
