"""The data plane's Python API: desired L4 services in, map writes out.

    dp = Dataplane(maps)
    dp.apply([L4Service(vip, members=((endpoint, weight), ...), draining=(endpoint, ...))])

apply() diffs against what the maps hold and writes only what changed:

- every endpoint in a ring or draining gets a target id (stable across
  restarts: ids are read back from the pinned `targets` map) and is ACTIVE;
  draining endpoints are not in the ring, so they get no new flows, while
  their existing flows still find them through conntrack;
- a VIP's ring is rebuilt (Maglev) when its members change, written into
  the idle half, then made live by one update of the VIP entry;
- VIPs that are gone are deleted and their id's generation bumped, so
  their flows' conntrack entries go stale (their packets pass to the
  kernel again);
  endpoints that are gone are marked inactive, so a flow still pointing at
  one is re-hashed, and their ids go to the back of the free list so a
  recently freed id is the last to be reused.

Everything is checked (limits, protocols) before the first write, so an
apply that cannot fit changes nothing.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from lb import maglev
from lb.dataplane.maps import Endpoint, Flow, Maps, TargetEntry, Traffic, VipAddr, VipEntry
from lb.dataplane.structs import NO_TARGET, PROTO_NUMBERS, Counter

log = logging.getLogger("lb.dataplane")


class DataplaneError(ValueError):
    """The desired state does not fit the program's limits; nothing was written."""


@dataclass(frozen=True)
class L4Service:
    """What one TCP/UDP VIP should do."""

    vip: VipAddr
    members: tuple[tuple[Endpoint, int], ...] = ()  # in the ring, with weights
    draining: tuple[Endpoint, ...] = ()  # no new flows; existing ones continue


@dataclass
class ApplyReport:
    vips_added: list[VipAddr] = field(default_factory=list)
    vips_removed: list[VipAddr] = field(default_factory=list)
    rings_rebuilt: list[VipAddr] = field(default_factory=list)
    targets_added: list[Endpoint] = field(default_factory=list)
    targets_retired: list[Endpoint] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{label} {', '.join(map(str, items))}" for label, items in (
            ("VIPs added:", self.vips_added), ("VIPs removed:", self.vips_removed),
            ("rings rebuilt:", self.rings_rebuilt), ("targets added:", self.targets_added),
            ("targets retired:", self.targets_retired)) if items]
        return "; ".join(parts) or "no change"

    @property
    def changed(self) -> bool:
        return any((self.vips_added, self.vips_removed, self.rings_rebuilt, self.targets_added, self.targets_retired))


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
    """Every endpoint the services need a target id for: ring members and draining ones."""
    return {e for s in services for e, _ in s.members} | {e for s in services for e in s.draining}


class Dataplane:
    """The one writer of the maps (the controller calls it)."""

    def __init__(self, maps: Maps) -> None:
        self.maps = maps
        self.limits = maps.limits
        # Adopt what the maps hold: a restarted daemon keeps ids, so flows
        # in conntrack keep pointing at the right targets.
        self._vips: dict[VipAddr, VipEntry] = {e.vip: e for e in maps.vips()}
        known = maps.targets()
        self._target_ids: dict[Endpoint, int] = {t.endpoint: t.target_id for t in known if t.active}
        used = set(self._target_ids.values())
        retired = [t.target_id for t in known if not t.active and t.target_id not in used]
        taken = used | set(retired)
        never = [i for i in range(self.limits.max_targets) if i not in taken]
        self._free_target_ids: deque[int] = deque(never + retired)
        vip_ids = {e.vip_id for e in self._vips.values()}
        self._free_vip_ids = deque(i for i in range(self.limits.max_vips) if i not in vip_ids)
        # Ring membership last written per VIP; empty after a restart, so the
        # first apply rewrites every ring once (same table: Maglev is deterministic).
        self._members: dict[VipAddr, tuple[tuple[Endpoint, int], ...]] = {}

    # --- writing -------------------------------------------------------------

    def apply(self, services: Iterable[L4Service]) -> ApplyReport:
        wanted = {s.vip: s for s in services}
        self._check(wanted)
        report = ApplyReport()

        endpoints = endpoints_of(wanted.values())
        for endpoint in sorted(endpoints - self._target_ids.keys()):
            target_id = self._free_target_ids.popleft()
            self._target_ids[endpoint] = target_id
            self.maps.put_target(target_id, endpoint, active=True)
            report.targets_added.append(endpoint)

        for vip, service in sorted(wanted.items()):
            members = tuple(sorted(service.members))
            entry = self._vips.get(vip)
            if entry is not None and self._members.get(vip) == members:
                continue
            ring = build_ring(vip, members, self._target_ids, self.limits.ring_size)
            if entry is None:
                vip_id = self._free_vip_ids.popleft()
                gen = self.maps.bump_vip_gen(vip_id)  # flows of an earlier VIP with this id are stale
                self.maps.write_ring(vip_id, 0, ring)
                self.maps.put_vip(vip, vip_id, 0, gen)
                self._vips[vip] = VipEntry(vip, vip_id, 0, gen)
                report.vips_added.append(vip)
            else:
                idle = entry.ring ^ 1
                self.maps.write_ring(entry.vip_id, idle, ring)
                self.maps.put_vip(vip, entry.vip_id, idle, entry.gen)  # the flip: one map update
                self._vips[vip] = VipEntry(vip, entry.vip_id, idle, entry.gen)
                report.rings_rebuilt.append(vip)
            self._members[vip] = members

        for vip in sorted(self._vips.keys() - wanted.keys()):
            entry = self._vips.pop(vip)
            self.maps.delete_vip(vip)
            self.maps.bump_vip_gen(entry.vip_id)  # its flows go stale: their packets pass again
            self._members.pop(vip, None)
            self._free_vip_ids.append(entry.vip_id)
            report.vips_removed.append(vip)

        for endpoint in sorted(self._target_ids.keys() - endpoints):
            target_id = self._target_ids.pop(endpoint)
            self.maps.put_target(target_id, endpoint, active=False)
            self._free_target_ids.append(target_id)
            report.targets_retired.append(endpoint)

        if report.changed:
            log.info("dataplane: %s", report)
        return report

    def _check(self, wanted: dict[VipAddr, L4Service]) -> None:
        problems = []
        for vip, service in wanted.items():
            if vip.protocol not in PROTO_NUMBERS:
                problems.append(f"{vip}: protocol must be TCP or UDP")
            if vip.address.version != 4:
                problems.append(f"{vip}: the XDP path is IPv4 only")
            endpoints = [e for e, _ in service.members]
            if len(set(endpoints)) != len(endpoints):
                problems.append(f"{vip}: an endpoint is listed twice in the ring")
            if any(w < 0 for _, w in service.members):
                problems.append(f"{vip}: negative weight")
        if len(wanted) > self.limits.max_vips:
            problems.append(f"{len(wanted)} VIPs, the program holds at most {self.limits.max_vips} (max_vips)")
        all_endpoints = endpoints_of(wanted.values())
        if len(all_endpoints) > self.limits.max_targets:
            most = f"the program holds at most {self.limits.max_targets} (max_targets)"
            problems.append(f"{len(all_endpoints)} targets, {most}")
        if problems:
            raise DataplaneError("; ".join(problems))

    # --- reading (for the CLI and tests) ---------------------------------------

    def vips(self) -> list[VipEntry]:
        return self.maps.vips()

    def targets(self) -> list[TargetEntry]:
        return self.maps.targets()

    def target_id(self, endpoint: Endpoint) -> int | None:
        return self._target_ids.get(endpoint)

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
