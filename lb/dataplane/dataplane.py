"""The data plane's Python API: desired L4 services in, map writes out.

    dp = Dataplane(maps)
    dp = Dataplane(maps, source_of=lambda address: ...)  # lb's address toward a target (full NAT)
    dp.apply([L4Service(vip, members=((endpoint, weight), ...), draining=(endpoint, ...),
                        terminated=(endpoint, ...), end_flows_on_removal=False, mode="nat")])

apply() diffs against what the maps hold and writes only what changed:

- every endpoint in a ring, draining or terminated gets a target id
  (stable across restarts: ids are read back from the pinned `targets`
  map). Ring members are ACTIVE and IN_SERVICE; draining endpoints are
  ACTIVE only: they are not in the ring, so they get no new flows, and a
  SYN does not follow an entry to them, while their existing flows still
  find them through conntrack. Terminated endpoints (unhealthy, with
  connection termination) are neither: their flows' entries are deleted,
  and the next packet of such a flow takes the ring;
- a VIP's ring is rebuilt (Maglev) when its members change, written into
  the idle half, then made live by one update of the VIP entry;
- `replies` (target endpoint -> the VIPs it serves) and `reply_ports` are
  kept for every active endpoint, before a new VIP goes live, so the first
  reply of its first flow finds its way back;
- VIPs that are gone are deleted and their id's generation bumped, so
  their flows' conntrack entries go stale (their packets pass to the
  kernel again);
- endpoints that are in no service any more either end their flows
  (end_flows_on_removal: NLB's connection termination at the end of the
  deregistration delay) and their ids go to the back of the free list, or
  linger: still ACTIVE, so their flows go on (NLB's default), their ids
  taken back (their flows ended then) only when no free id is left.

- each VIP has a forwarding mode (`nat`, `full-nat`, `dsr`); a VIP whose
  mode changes is removed and added again (its flows go stale: a flow
  cannot change how it is rewritten half-way). Only `nat` VIPs need
  `replies`; every target of a `full-nat` or `dsr` VIP gets lb's own
  address toward it (`source_of`, the route's preferred source; it also
  resolves the target's neighbour) in `fullnat_sources`.

Everything is checked (limits, protocols, a DSR target's port) before the
first write, so an apply that cannot fit changes nothing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lb import maglev
from lb.dataplane.maps import (
    Endpoint,
    Flow,
    IPAddress,
    Maps,
    ReplyVipEntry,
    RouteEntry,
    TargetEntry,
    Traffic,
    VipAddr,
    VipEntry,
)
from lb.dataplane.structs import MAX_REPLY_VIPS, MODE_NUMBERS, NO_TARGET, PROTO_NUMBERS, Counter

log = logging.getLogger("lb.dataplane")


class DataplaneError(ValueError):
    """The desired state does not fit the program's limits; nothing was written."""


@dataclass(frozen=True)
class L4Service:
    """What one TCP/UDP VIP should do."""

    vip: VipAddr
    members: tuple[tuple[Endpoint, int], ...] = ()  # in the ring, with weights
    draining: tuple[Endpoint, ...] = ()  # no new flows; existing ones continue
    terminated: tuple[Endpoint, ...] = ()  # registered, but their flows end now (NLB: unhealthy, termination on)
    # An endpoint that leaves every service: its flows end (NLB's connection
    # termination at the end of the deregistration delay), or go on (default).
    end_flows_on_removal: bool = False
    mode: str = "nat"  # "nat", "full-nat" or "dsr" (structs.MODE_NAMES)


@dataclass
class ApplyReport:
    vips_added: list[VipAddr] = field(default_factory=list)
    vips_removed: list[VipAddr] = field(default_factory=list)
    rings_rebuilt: list[VipAddr] = field(default_factory=list)
    targets_added: list[Endpoint] = field(default_factory=list)
    targets_retired: list[Endpoint] = field(default_factory=list)  # left every service, flows ended
    targets_lingering: list[Endpoint] = field(default_factory=list)  # left every service, flows go on
    targets_terminated: list[Endpoint] = field(default_factory=list)  # still registered, flows ended
    flows_ended: int = 0  # conntrack entries deleted

    def __str__(self) -> str:
        parts = [f"{label} {', '.join(map(str, items))}" for label, items in (
            ("VIPs added:", self.vips_added), ("VIPs removed:", self.vips_removed),
            ("rings rebuilt:", self.rings_rebuilt), ("targets added:", self.targets_added),
            ("targets retired:", self.targets_retired), ("targets lingering:", self.targets_lingering),
            ("targets terminated:", self.targets_terminated)) if items]
        if self.flows_ended:
            parts.append(f"flows ended: {self.flows_ended}")
        return "; ".join(parts) or "no change"

    @property
    def changed(self) -> bool:
        return any((self.vips_added, self.vips_removed, self.rings_rebuilt, self.targets_added, self.targets_retired,
                    self.targets_lingering, self.targets_terminated, self.flows_ended))


def ring_seed(vip: VipAddr) -> bytes:
    """Per-VIP Maglev seed: rings of different VIPs are unrelated, and every
    host with the same config builds the same ring (ECMP)."""
    return f"{vip.protocol}/{vip.address}:{vip.port}".encode()


def build_ring(vip: VipAddr, members: tuple[tuple[Endpoint, int], ...], ids: dict[Endpoint, int],
               size: int) -> list[int]:
    """The Maglev table of target ids for one VIP (NO_TARGET everywhere when empty)."""
    backends = [(str(endpoint), weight) for endpoint, weight in members]
    table = maglev.build_table(backends, size, seed=ring_seed(vip))
    by_index = [ids[endpoint] for endpoint, _ in members]
    return [NO_TARGET if i < 0 else by_index[i] for i in table]


def endpoints_of(services: Iterable[L4Service]) -> set[Endpoint]:
    """Every endpoint the services need a target id for: ring members, draining and terminated ones."""
    return ({e for s in services for e, _ in s.members} | {e for s in services for e in s.draining}
            | {e for s in services for e in s.terminated})


# Target flags as Dataplane writes them: (active, in service).
IN_SERVICE, ACTIVE_ONLY, INACTIVE = (True, True), (True, False), (False, False)


def wanted_flags(services: Iterable[L4Service]) -> dict[Endpoint, tuple[bool, bool]]:
    """Each endpoint's flags: in a ring anywhere, in service; else draining
    anywhere, active; else (terminated) neither."""
    flags: dict[Endpoint, tuple[bool, bool]] = {}
    for service in services:
        for endpoint in service.terminated:
            flags.setdefault(endpoint, INACTIVE)
    for service in services:
        for endpoint in service.draining:
            if flags.get(endpoint) != IN_SERVICE:
                flags[endpoint] = ACTIVE_ONLY
        for endpoint, _ in service.members:
            flags[endpoint] = IN_SERVICE
    return flags


class Dataplane:
    """The one writer of the maps (the controller calls it)."""

    def __init__(self, maps: Maps,
                 source_of: Callable[[IPAddress], IPAddress | None] | None = None) -> None:
        self.maps = maps
        self.limits = maps.limits
        # lb's own address toward a target (full NAT's source); None: unknown.
        self._source_of = source_of or (lambda address: None)
        # fullnat_sources as written: target id -> (its endpoint's address, the source).
        self._sources: dict[int, tuple[IPAddress, IPAddress | None]] = {}
        # Adopt what the maps hold: a restarted daemon keeps ids, so flows
        # in conntrack keep pointing at the right targets.
        self._vips: dict[VipAddr, VipEntry] = {e.vip: e for e in maps.vips()}
        known = maps.targets()
        self._target_ids: dict[Endpoint, int] = {t.endpoint: t.target_id for t in known if t.active}
        self._flags: dict[Endpoint, tuple[bool, bool]] = {t.endpoint: (t.active, t.in_service) for t in known
                                                          if t.active}
        used = set(self._target_ids.values())
        retired = [t.target_id for t in known if not t.active and t.target_id not in used]
        # Inactive slots by endpoint: retired, or terminated (still registered).
        # An endpoint wanted again takes its own id back, when it is free.
        self._inactive_ids: dict[Endpoint, int] = {t.endpoint: t.target_id for t in known
                                                   if not t.active and t.target_id in retired}
        taken = used | set(retired)
        never = [i for i in range(self.limits.max_targets) if i not in taken]
        self._free_target_ids: deque[int] = deque(never + retired)
        vip_ids = {e.vip_id for e in self._vips.values()}
        self._free_vip_ids = deque(i for i in range(self.limits.max_vips) if i not in vip_ids)
        # Ring membership last written per VIP; empty after a restart, so the
        # first apply rewrites every ring once (same table: Maglev is deterministic).
        self._members: dict[VipAddr, tuple[tuple[Endpoint, int], ...]] = {}
        # Reply routes as written, by (endpoint, protocol).
        self._routes: dict[tuple[Endpoint, str], RouteEntry] = {(r.endpoint, r.protocol): r for r in maps.routes()}
        self._reply_ports: set[int] | None = None  # unknown after a restart: written at the first apply
        # Endpoints in no service whose flows go on, oldest first; and, for
        # each endpoint in a service, whether its flows end when it leaves
        # (unknown after a restart: they go on).
        self._lingering: dict[Endpoint, None] = {}
        self._end_on_removal: dict[Endpoint, bool] = {}

    # --- writing -------------------------------------------------------------

    def apply(self, services: Iterable[L4Service]) -> ApplyReport:
        wanted = {s.vip: s for s in services}
        self._check(wanted)
        report = ApplyReport()
        flags = wanted_flags(wanted.values())
        ends: dict[Endpoint, bool] = {}
        for service in wanted.values():  # an endpoint's flows end on removal only if every service says so
            for endpoint in endpoints_of([service]):
                ends[endpoint] = ends.get(endpoint, True) and service.end_flows_on_removal
        self._end_on_removal.update(ends)
        ended: set[int] = set()  # target ids whose flows end (deleted last, once nothing can name them)

        # A VIP whose mode changes goes, and comes back below as a new one.
        for vip in sorted(v for v in wanted if v in self._vips and self._vips[v].mode != wanted[v].mode):
            self._remove_vip(vip, report)

        # Endpoints that left every service: retired (their ids free), or lingering.
        for endpoint in sorted(self._target_ids.keys() - flags.keys() - self._lingering.keys()):
            if self._end_on_removal.pop(endpoint, False):
                self._retire(endpoint, report, ended)
            else:
                self._lingering[endpoint] = None
                if self._flags.get(endpoint) != ACTIVE_ONLY:
                    self._write_target(endpoint, ACTIVE_ONLY)
                report.targets_lingering.append(endpoint)

        # Target ids and flags: a ring never names a target not yet written.
        for endpoint in sorted(flags):
            self._lingering.pop(endpoint, None)
            if endpoint not in self._target_ids:
                self._target_ids[endpoint] = self._take_target_id(endpoint, report, ended)
                report.targets_added.append(endpoint)
            if self._flags.get(endpoint) != flags[endpoint]:
                if flags[endpoint] == INACTIVE:
                    ended.add(self._target_ids[endpoint])
                    report.targets_terminated.append(endpoint)
                self._write_target(endpoint, flags[endpoint])
        self._write_sources(wanted.values())

        # VIP ids of new VIPs first, so their routes are written before they go live.
        entries: dict[VipAddr, VipEntry] = {}
        for vip in sorted(wanted):
            entry = self._vips.get(vip)
            if entry is None:
                vip_id = self._free_vip_ids.popleft()
                gen = self.maps.bump_vip_gen(vip_id)  # flows of an earlier VIP with this id are stale
                entry = VipEntry(vip, vip_id, 0, gen, wanted[vip].mode)
            entries[vip] = entry
        self._write_routes(wanted, entries)

        for vip, service in sorted(wanted.items()):
            members = tuple(sorted(service.members))
            entry = self._vips.get(vip)
            if entry is not None and self._members.get(vip) == members:
                continue
            ring = build_ring(vip, members, self._target_ids, self.limits.ring_size)
            if entry is None:
                entry = entries[vip]
                self.maps.write_ring(entry.vip_id, 0, ring)
                self.maps.put_vip(vip, entry.vip_id, 0, entry.gen, entry.mode)
                self._vips[vip] = entry
                report.vips_added.append(vip)
            else:
                idle = entry.ring ^ 1
                self.maps.write_ring(entry.vip_id, idle, ring)
                self.maps.put_vip(vip, entry.vip_id, idle, entry.gen, entry.mode)  # the flip: one map update
                self._vips[vip] = VipEntry(vip, entry.vip_id, idle, entry.gen, entry.mode)
                report.rings_rebuilt.append(vip)
            self._members[vip] = members

        for vip in sorted(self._vips.keys() - wanted.keys()):
            self._remove_vip(vip, report)

        # Last: every target whose flows end is inactive by now, so no new entry names it.
        report.flows_ended += self.maps.delete_flows(ended)
        if report.changed:
            log.info("dataplane: %s", report)
        return report

    def _remove_vip(self, vip: VipAddr, report: ApplyReport) -> None:
        entry = self._vips.pop(vip)
        self.maps.delete_vip(vip)
        self.maps.bump_vip_gen(entry.vip_id)  # its flows go stale: their packets pass again
        self._members.pop(vip, None)
        self._free_vip_ids.append(entry.vip_id)
        report.vips_removed.append(vip)

    def _write_sources(self, services: Iterable[L4Service]) -> None:
        """fullnat_sources for every target of a full-NAT or DSR VIP, before a
        ring can name it. `source_of` also resolves the target's neighbour:
        XDP must send these modes' packets itself (the kernel could not
        forward them), so it needs one (DSR reads no source; it is written all the same)."""
        for endpoint in sorted(endpoints_of(s for s in services if s.mode in ("full-nat", "dsr"))):
            target_id = self._target_ids[endpoint]
            known = self._sources.get(target_id)
            if known is not None and known[0] == endpoint.address and known[1] is not None:
                continue
            source = self._source_of(endpoint.address)
            if known != (endpoint.address, source):
                self.maps.put_fullnat_source(target_id, source)
                self._sources[target_id] = (endpoint.address, source)
            if source is None:
                log.warning("dataplane: no route to %s: its full-NAT and DSR flows are dropped", endpoint.address)

    def _write_target(self, endpoint: Endpoint, flags: tuple[bool, bool]) -> None:
        active, in_service = flags
        self.maps.put_target(self._target_ids[endpoint], endpoint, active, in_service)
        self._flags[endpoint] = flags

    def _retire(self, endpoint: Endpoint, report: ApplyReport, ended: set[int]) -> None:
        """Take an endpoint out: inactive, no route, its flows to end, its id to the back of the free list."""
        target_id = self._target_ids.pop(endpoint)
        self.maps.put_target(target_id, endpoint, active=False)
        self._flags.pop(endpoint, None)
        self._lingering.pop(endpoint, None)
        self._end_on_removal.pop(endpoint, None)
        for key in [k for k in self._routes if k[0] == endpoint]:
            self.maps.delete_route(*key)
            del self._routes[key]
        ended.add(target_id)
        self._free_target_ids.append(target_id)
        self._inactive_ids[endpoint] = target_id
        report.targets_retired.append(endpoint)

    def _take_target_id(self, endpoint: Endpoint, report: ApplyReport, ended: set[int]) -> int:
        """The endpoint's own former id if it is free, else the next free one;
        with none left, the oldest lingering endpoint's (its flows end)."""
        own = self._inactive_ids.pop(endpoint, None)
        if own is not None and own in self._free_target_ids:
            self._free_target_ids.remove(own)
            self._flags[endpoint] = INACTIVE  # as the map has it
            target_id = own
        else:
            if not self._free_target_ids:
                self._retire(next(iter(self._lingering)), report, ended)  # _check: one is lingering
            target_id = self._free_target_ids.popleft()
        for other, former in list(self._inactive_ids.items()):
            if former == target_id:
                del self._inactive_ids[other]
        if target_id in ended and own != target_id:  # an old flow must not find the new endpoint
            report.flows_ended += self.maps.delete_flows({target_id})
            ended.discard(target_id)
        if own != target_id:  # its counters start from zero, not from the former endpoint's
            self.maps.reset_target_stats(target_id)
        return target_id

    def _write_routes(self, wanted: dict[VipAddr, L4Service], entries: dict[VipAddr, VipEntry]) -> None:
        """replies and reply_ports for every active endpoint: the VIPs whose
        service lists it (ring or draining); a lingering one keeps the VIPs
        it had that still exist, under the same generation."""
        routes: dict[tuple[Endpoint, str], list[ReplyVipEntry]] = {}
        for vip, service in sorted(wanted.items()):
            if service.mode != "nat":  # full NAT's replies are addressed to lb; DSR's never cross it
                continue
            entry = entries[vip]
            for endpoint in sorted({e for e, _ in service.members} | set(service.draining)):
                routes.setdefault((endpoint, vip.protocol), []).append(ReplyVipEntry(vip, entry.vip_id, entry.gen))
        live = {(e.vip, e.vip_id, e.gen) for e in entries.values()}
        for key, route in self._routes.items():
            if key[0] in self._lingering and key not in routes:
                kept = [v for v in route.vips if (v.vip, v.vip_id, v.gen) in live]
                if kept:
                    routes[key] = kept
        for key in sorted(self._routes.keys() - routes.keys()):
            self.maps.delete_route(*key)
            del self._routes[key]
        for key, vips in sorted(routes.items()):
            endpoint, protocol = key
            route = RouteEntry(endpoint, protocol, self._target_ids[endpoint], tuple(vips))
            if self._routes.get(key) != route:
                self.maps.put_route(route)
                self._routes[key] = route
        ports = {endpoint.port for endpoint, _ in self._routes}
        if ports != self._reply_ports:
            self.maps.write_reply_ports(ports)
            self._reply_ports = ports

    def _check(self, wanted: dict[VipAddr, L4Service]) -> None:
        problems = []
        for vip, service in wanted.items():
            if vip.protocol not in PROTO_NUMBERS:
                problems.append(f"{vip}: protocol must be TCP or UDP")
            others = sorted(e for e in endpoints_of([service]) if e.address.version != vip.address.version)
            if others:
                problems.append(f"{vip}: a flow stays within one family; targets of the other: "
                                f"{', '.join(map(str, others))}")
            endpoints = [e for e, _ in service.members]
            if len(set(endpoints)) != len(endpoints):
                problems.append(f"{vip}: an endpoint is listed twice in the ring")
            if any(w < 0 for _, w in service.members):
                problems.append(f"{vip}: negative weight")
            if service.mode not in MODE_NUMBERS:
                problems.append(f"{vip}: mode must be one of {', '.join(MODE_NUMBERS)}, got {service.mode!r}")
            if service.mode == "dsr":
                moved = sorted({e for e in endpoints_of([service]) if e.port != vip.port})
                if moved:
                    problems.append(f"{vip}: DSR cannot translate ports; targets on another port: "
                                    f"{', '.join(map(str, moved))}")
        if len(wanted) > self.limits.max_vips:
            problems.append(f"{len(wanted)} VIPs, the program holds at most {self.limits.max_vips} (max_vips)")
        all_endpoints = endpoints_of(wanted.values())
        if len(all_endpoints) > self.limits.max_targets:
            most = f"the program holds at most {self.limits.max_targets} (max_targets)"
            problems.append(f"{len(all_endpoints)} targets, {most}")
        serving: dict[tuple[Endpoint, str], int] = {}
        for vip, service in wanted.items():
            if service.mode != "nat":
                continue
            for endpoint in {e for e, _ in service.members} | set(service.draining):
                serving[(endpoint, vip.protocol)] = serving.get((endpoint, vip.protocol), 0) + 1
        for (endpoint, protocol), n in sorted(serving.items()):
            if n > MAX_REPLY_VIPS:
                problems.append(f"{protocol} {endpoint} serves {n} VIPs; its replies can be told apart among at "
                                f"most {MAX_REPLY_VIPS}")
        if problems:
            raise DataplaneError("; ".join(problems))

    # --- reading (for the CLI and tests) ---------------------------------------

    def vips(self) -> list[VipEntry]:
        return self.maps.vips()

    def targets(self) -> list[TargetEntry]:
        return self.maps.targets()

    def target_id(self, endpoint: Endpoint) -> int | None:
        return self._target_ids.get(endpoint)

    def lingering(self) -> list[Endpoint]:
        """Endpoints in no service whose flows go on (oldest first)."""
        return list(self._lingering)

    def ring(self, vip: VipAddr) -> list[int]:
        entry = next((e for e in self.maps.vips() if e.vip == vip), None)
        if entry is None:
            raise KeyError(str(vip))
        return self.maps.read_ring(entry.vip_id, entry.ring)

    def flows(self, limit: int | None = None) -> list[Flow]:
        return list(self.maps.flows(limit))

    def vip_traffic(self, vip: VipAddr) -> Traffic:
        return self.maps.vip_traffic(self._vips[vip].vip_id)

    def target_traffic(self, endpoint: Endpoint) -> Traffic:
        target_id = self._target_ids.get(endpoint)
        return Traffic() if target_id is None else self.maps.target_traffic(target_id)

    def counters(self) -> dict[Counter, int]:
        return self.maps.counters()
