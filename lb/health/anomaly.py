"""Passive health: ALB's anomaly mitigation ("automatic target weights"), pure.

Active checks see a target that answers `/health` but fails real requests as
healthy. The L7 workers count every request's outcome per target; the daemon
(lb.passive) hands their cumulative counts to `AnomalyDetector.observe`
every few seconds. Over the last `window` seconds a target is *anomalous*
when it

- answered at least `min_requests` requests,
- failed at least `min_failure_rate` of them: lb's own 502/504 for it
  (connect refused or reset, timeout) and its own 5xx,
- and failed at least `factor` times as often as its peers (the group's
  other targets together, over the same window).

An anomalous target is *mitigated*: the controller gives it
`MITIGATED_SHARE` of its share of new requests (through the slow-start
mechanism, lb.l7.balancer.SlowStart). It is never taken out entirely: the
requests it still gets show when it has recovered, which is when over the
window its failure rate falls below half of `min_failure_rate`, or below
`factor` times its peers'. Never below fail-open: when more than half of a
group's targets that served requests would be anomalous, the group is left
alone (the failures are the group's, not a target's), as ALB does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

Key = tuple[str, str]  # group, "address:port"
Counts = tuple[int, int]  # requests, failures

log = logging.getLogger("lb.health.anomaly")

MITIGATED_SHARE = 0.05
OBSERVE_EVERY = 1.0  # seconds between two looks at the workers' counts


@dataclass(frozen=True)
class Settings:
    window: float = 10.0  # seconds of outcomes each judgement looks at
    min_requests: int = 20  # in the window, before a target is judged
    min_failure_rate: float = 0.2
    factor: float = 4.0  # times its peers' failure rate


@dataclass(frozen=True)
class Verdict:
    """One target's last judgement, for `lb targets` and the metrics."""

    mitigated: bool
    requests: int  # in the window
    failure_rate: float
    peer_failure_rate: float


def failed(status: int) -> bool:
    """A request outcome that counts against its target: any 5xx that names it,
    the target's own or lb's (502/504 there: connect errors, resets, timeouts)."""
    return status >= 500


def totals(snapshots: Iterable[Mapping[str, Any]]) -> dict[Key, Counts]:
    """Cumulative (requests, failures) per (group, target) from the L7 workers'
    stats rows (lb.l7.stats.WorkerStats.snapshot, summed over workers)."""
    out: dict[Key, list[int]] = {}
    for snapshot in snapshots:
        for _listener, _rule, group, target, status, _by_lb, count in snapshot.get("requests", ()):
            if target == "-":  # no target was chosen (lb's 503, a redirect, ...)
                continue
            row = out.setdefault((group, target), [0, 0])
            row[0] += count
            if failed(status):
                row[1] += count
    return {key: (row[0], row[1]) for key, row in out.items()}


class AnomalyDetector:
    """Keeps the last `window` seconds of counts and the set of mitigated targets."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self._history: deque[tuple[float, dict[Key, Counts]]] = deque()
        self._mitigated: set[Key] = set()
        self.verdicts: dict[Key, Verdict] = {}

    def mitigated(self, group: str) -> frozenset[str]:
        """The group's mitigated targets, as "address:port"."""
        return frozenset(target for g, target in self._mitigated if g == group)

    @property
    def looked(self) -> bool:
        return bool(self._history)

    @property
    def any_mitigated(self) -> bool:
        return bool(self._mitigated)

    def observe(self, now: float, counts: Mapping[Key, Counts], groups: frozenset[str] | None = None) -> list[str]:
        """Take the cumulative counts at `now` and judge the targets of `groups`
        (None: of all); one line per target whose mitigation starts or ends
        (empty: nothing changed). The first look is only the baseline."""
        history = self._history
        first = not history
        history.append((now, dict(counts)))
        while len(history) > 2 and history[1][0] <= now - self.settings.window:
            history.popleft()
        base = history[0][1]
        window = {key: (requests - base.get(key, (0, 0))[0], fails - base.get(key, (0, 0))[1])
                  for key, (requests, fails) in counts.items()}
        if first and counts:  # counts since before we looked: no window to judge them by
            return []
        by_group: dict[str, dict[str, Counts]] = {}
        for (group, target), delta in window.items():
            if groups is None or group in groups:
                by_group.setdefault(group, {})[target] = delta
        wanted: set[Key] = set()
        self.verdicts = {}
        for group, targets in by_group.items():
            wanted |= self._judge(group, targets)
        # Targets no longer reported (gone from the config or the table), or of groups no longer judged, are forgotten.
        wanted &= {key for key in window if groups is None or key[0] in groups}
        changes = [f"{g} {t}: failing {self.verdicts[(g, t)].failure_rate:.0%} of requests, peers "
                   f"{self.verdicts[(g, t)].peer_failure_rate:.0%}: mitigated (share {MITIGATED_SHARE:g})"
                   for g, t in sorted(wanted - self._mitigated)]
        changes += [f"{g} {t}: recovered, mitigation ends" for g, t in sorted(self._mitigated - wanted)]
        self._mitigated = wanted
        return changes

    def _judge(self, group: str, targets: Mapping[str, Counts]) -> set[Key]:
        s = self.settings
        total_requests = sum(r for r, _ in targets.values())
        total_fails = sum(f for _, f in targets.values())
        anomalous = set()
        for target, (requests, fails) in targets.items():
            peer_requests, peer_fails = total_requests - requests, total_fails - fails
            rate = fails / requests if requests else 0.0
            peer_rate = peer_fails / peer_requests if peer_requests else 0.0
            key = (group, target)
            if key in self._mitigated:  # stays until the evidence says it recovered
                recovered = requests > 0 and (rate < s.min_failure_rate / 2 or rate < s.factor * peer_rate)
                bad = not recovered
            else:
                bad = (requests >= s.min_requests and peer_requests > 0 and rate >= s.min_failure_rate
                       and rate >= s.factor * peer_rate)
            if bad:
                anomalous.add(target)
            self.verdicts[key] = Verdict(False, requests, rate, peer_rate)
        serving = sum(1 for requests, _ in targets.values() if requests > 0)
        if len(anomalous) * 2 > serving or len(anomalous) >= len(targets):  # fail-open: the group's problem
            anomalous = set()
        for target in anomalous:
            v = self.verdicts[(group, target)]
            self.verdicts[(group, target)] = Verdict(True, v.requests, v.failure_rate, v.peer_failure_rate)
        return {(group, target) for target in anomalous}


class PassiveHealth:
    """The daemon's side: every `every` seconds, the L7 workers' counts
    (`stats`, lb.l7.server.L7Server.stats) to the detector; `on_change` when
    the mitigated set changes (the daemon reconciles). Only the groups that
    `groups()` names (anomaly_mitigation on) are judged; with none, the
    workers are not even asked."""

    def __init__(self, stats: Callable[[], Awaitable[list[dict[str, Any]]]], groups: Callable[[], frozenset[str]],
                 on_change: Callable[[], None], *, settings: Settings | None = None,
                 every: float = OBSERVE_EVERY) -> None:
        self.settings = settings
        self.detector = AnomalyDetector(settings)
        self._stats = stats
        self._groups = groups
        self._on_change = on_change
        self._every = every

    def mitigated(self, group: str) -> frozenset[str]:
        return self.detector.mitigated(group) if group in self._groups() else frozenset()

    def verdict(self, group: str, target: str) -> Verdict | None:
        """The last judgement of "address:port" in `group` (None: no requests seen, or off)."""
        return self.detector.verdicts.get((group, target)) if group in self._groups() else None

    async def run(self) -> None:
        """Until cancelled."""
        if self._groups():  # the workers' counts start at zero with them: requests before the next look count
            self.detector.observe(time.monotonic(), {}, frozenset())
        while True:
            await asyncio.sleep(self._every)
            groups = self._groups()
            if not groups:  # off everywhere (a reload may turn it on: the next look is the baseline then)
                if self.detector.looked:
                    was = self.detector.any_mitigated
                    self.detector = AnomalyDetector(self.settings)
                    if was:
                        self._on_change()
                continue
            try:
                counts = totals(await self._stats())
            except Exception:  # a bug, not the targets': keep the last judgement
                log.exception("passive health: reading the workers' counts failed")
                continue
            changes = self.detector.observe(time.monotonic(), counts, groups)
            for line in changes:
                log.warning("anomaly mitigation: %s", line)
            if changes:
                self._on_change()
