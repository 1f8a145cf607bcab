"""HealthChecker: runs every registered target's checks on the loop and keeps
their states; registration, reloads and draining (see lb.health)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from lb.health.checks import CheckResult, Matcher, check_target, hostport
from lb.health.states import (
    DISABLED,
    DRAINING,
    INITIAL_CHECKING,
    NOT_REGISTERED,
    REGISTERING,
    Endpoint,
    StateChange,
    TargetRecord,
)
from lb.model import Target, TargetGroup, TargetHealth, TargetReason, TargetState

log = logging.getLogger("lb.health")

JITTER = 0.1  # later checks every interval × uniform(1 - JITTER, 1 + JITTER)
# The first check of each target comes at a random point in the first
# FIRST_ROUND_SPREAD seconds (or its interval, if shorter): spread, yet quick,
# so that after a start or restart every target has a result within about a
# second plus its timeout, and the controller never builds a ring from the
# one target that happened to be checked first (see first_round()).
FIRST_ROUND_SPREAD = 1.0


class _Group:
    __slots__ = ("spec", "records", "tasks", "removed")

    def __init__(self, spec: TargetGroup) -> None:
        self.spec = spec  # latest settings; check tasks read them before every check
        self.records: dict[Endpoint, TargetRecord] = {}  # registration order
        self.tasks: dict[Endpoint, asyncio.Task[None]] = {}
        self.removed = False  # gone from the config: forgotten once its targets drained


def _validate(groups: Sequence[TargetGroup]) -> None:
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate target group names in {names}")
    for group in groups:
        check = group.health_check
        if check.protocol.is_http:
            Matcher.parse(check.matcher)
            if not check.path.startswith("/") or any(c in check.path for c in " \r\n"):
                raise ValueError(f"target group {group.name!r}: health check path {check.path!r} is invalid")
            if not check.method.isalpha():
                raise ValueError(f"target group {group.name!r}: health check method {check.method!r} is invalid")


class HealthChecker:
    """Checks every registered target of every group and keeps ELB's states."""

    def __init__(self, groups: Sequence[TargetGroup], *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[StateChange], None] | None = None,
                 rng: random.Random | None = None) -> None:
        # Collaborators, for the checker's lifetime.
        self._clock = clock
        self._on_change = on_change
        self._rng = rng or random.Random()
        # Groups by name, changed by update_groups/register/deregister.
        self._groups: dict[str, _Group] = {}
        # Only while run() runs.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False
        self._reaper: asyncio.TimerHandle | None = None  # calls expire() when the next drain ends
        self._reaper_at: float | None = None
        # Changes not yet given to on_change: delivered once a mutation is complete, in order,
        # so a callback that queries the checker sees a consistent state.
        self._pending: deque[StateChange] = deque()
        self._delivering = False
        _validate(groups)
        for spec in groups:
            group = self._groups[spec.name] = _Group(spec)
            for target in spec.targets:
                self._add(group, target, notify=False)

    # --- queries (an unknown group has no targets) ---

    def health(self, group: str) -> dict[Target, TargetRecord]:
        self.expire()
        g = self._groups.get(group)
        return {r.target: r for r in g.records.values()} if g else {}

    def target_health(self, group: str, target: Target) -> TargetHealth:
        self.expire()
        g = self._groups.get(group)
        record = g.records.get(self._key(g, target)) if g else None
        return record.health if record else NOT_REGISTERED

    def in_service(self, group: str) -> tuple[Target, ...]:
        """Targets for new traffic: healthy (or unavailable); if none, every non-draining one (fail open)."""
        records = self._records(group)
        live = tuple(r.target for r in records if r.state in (TargetState.HEALTHY, TargetState.UNAVAILABLE))
        return live or tuple(r.target for r in records if r.state is not TargetState.DRAINING)

    def draining(self, group: str) -> tuple[Target, ...]:
        return tuple(r.target for r in self._records(group) if r.state is TargetState.DRAINING)

    def healthy_since(self, group: str, target: Target) -> float | None:
        """Clock time the target last became healthy; None unless it is healthy now."""
        g = self._groups.get(group)
        record = g.records.get(self._key(g, target)) if g else None
        if record is None or record.state is not TargetState.HEALTHY:
            return None
        return record.last_change

    def registered(self, group: str) -> tuple[Target, ...]:
        """Every target the group has, draining ones included."""
        return tuple(r.target for r in self._records(group))

    # --- changes ---

    def update_groups(self, groups: Sequence[TargetGroup]) -> None:
        """Reload: new groups and targets register, missing ones drain, settings apply at the next check."""
        _validate(groups)
        wanted = {spec.name: spec for spec in groups}
        for name, group in list(self._groups.items()):
            if name not in wanted and not group.removed:
                group.removed = True
                for record in list(group.records.values()):
                    self._drain(group, record)
        for spec in groups:
            group = self._groups.get(spec.name) or self._groups.setdefault(spec.name, _Group(spec))
            was_enabled = group.spec.health_check.enabled
            group.spec, group.removed = spec, False
            for record in group.records.values():
                if record.target.port is None and record.port != spec.port:  # the group's port changed:
                    record.target = replace(record.target, port=record.port)  # keep the old endpoint
            keys = {self._key(group, t): t for t in spec.targets}
            for key, record in list(group.records.items()):
                if key not in keys:
                    self._drain(group, record)
            for target in keys.values():
                self._add(group, target, notify=True)
            if was_enabled != spec.health_check.enabled:
                self._check_toggled(group)
        self.expire()

    def register(self, group: str, target: Target) -> None:
        """Register `target` (initial); a draining one starts over. No-op if already registered."""
        self._add(self._groups[group], target, notify=True)
        self._deliver()

    def deregister(self, group: str, target: Target) -> None:
        """Start draining `target`; no-op if it is not registered or already draining."""
        g = self._groups[group]
        record = g.records.get(self._key(g, target))
        if record is not None:
            self._drain(g, record)
            self.expire()

    def resume_draining(self, group: str, target: Target, remaining: float) -> None:
        """Register `target` as draining for `remaining` seconds: a target that
        was deregistered before a restart finishes its delay. No-op when the
        group does not exist or already has the target."""
        g = self._groups.get(group)
        if g is None or self._key(g, target) in g.records or remaining <= 0:
            return
        now = self._clock()
        record = g.records[self._key(g, target)] = TargetRecord(target, self._key(g, target)[1], DRAINING, now)
        record.drain_deadline = now + remaining
        self._arm_reaper()

    def observe(self, group: str, target: Target, result: CheckResult) -> None:
        """Count one check result, as the check tasks do (and tests, and passive checks later)."""
        g = self._groups[group]
        record = g.records.get(self._key(g, target))
        if record is not None:
            self._observe(g, record, result)
            self._deliver()

    def expire(self) -> None:
        """Forget draining targets whose deregistration delay has passed."""
        now = self._clock()
        for name, group in list(self._groups.items()):
            for key, record in list(group.records.items()):
                if record.drain_deadline is not None and record.drain_deadline <= now:
                    del group.records[key]
                    self._changed(group, record, record.set_health(NOT_REGISTERED, now))
            if group.removed and not group.records:
                del self._groups[name]
        self._arm_reaper()
        self._deliver()

    # --- running ---

    async def run(self) -> None:
        """Check until stop() (or cancellation); every check task ends before this returns."""
        if self._loop is not None:
            raise RuntimeError("HealthChecker.run() is already running")
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        try:
            for group in self._groups.values():
                for record in group.records.values():
                    self._start(group, record)
            self._arm_reaper()
            await self._stop.wait()
        finally:
            tasks = [t for g in self._groups.values() for t in g.tasks.values()]
            for group in self._groups.values():
                group.tasks.clear()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._reaper is not None:
                self._reaper.cancel()
            self._loop = self._stop = self._reaper = self._reaper_at = None
            self._stop_requested = False

    async def first_round(self, timeout: float) -> bool:
        """Wait until every registered target has had one check (or `timeout`
        seconds); True when all have. The daemon waits for this before its
        first reconcile, so a restart keeps the old ring until it knows."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(r.last_checked is not None or r.health.state.value in ("draining", "unavailable")
                   for g in self._groups.values() for r in g.records.values()):
                return True
            await asyncio.sleep(0.05)
        return False

    def stop(self) -> None:
        """Make run() return (call from the loop's thread)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    # --- internals ---

    def _records(self, group: str) -> Iterable[TargetRecord]:
        self.expire()
        g = self._groups.get(group)
        return list(g.records.values()) if g else []

    @staticmethod
    def _key(group: _Group, target: Target) -> Endpoint:
        return target.address, target.traffic_port(group.spec.port)

    def _add(self, group: _Group, target: Target, *, notify: bool) -> None:
        key = self._key(group, target)
        record = group.records.get(key)
        if record is not None and record.state is not TargetState.DRAINING:
            record.target = target  # same endpoint, maybe a new weight
            return
        now = self._clock()
        health = REGISTERING if group.spec.health_check.enabled else DISABLED
        old = record.health if record is not None else NOT_REGISTERED
        record = group.records[key] = TargetRecord(target, key[1], health, now)
        if notify:
            self._changed(group, record, old)
        self._start(group, record)

    def _drain(self, group: _Group, record: TargetRecord) -> None:
        if record.state is TargetState.DRAINING:
            return
        self._cancel(group, record)
        now = self._clock()
        record.drain_deadline = now + group.spec.deregistration_delay
        self._changed(group, record, record.set_health(DRAINING, now))

    def _check_toggled(self, group: _Group) -> None:
        enabled = group.spec.health_check.enabled
        now = self._clock()
        for record in list(group.records.values()):
            if record.state is TargetState.DRAINING:
                continue
            self._cancel(group, record)
            record.consecutive_passes = record.consecutive_fails = 0
            self._changed(group, record, record.set_health(REGISTERING if enabled else DISABLED, now))
            self._start(group, record)

    def _start(self, group: _Group, record: TargetRecord) -> None:
        if self._loop is None or not group.spec.health_check.enabled or record.drain_deadline is not None:
            return
        self._cancel(group, record)
        name = f"health {group.spec.name} {hostport(*record.endpoint)}"
        group.tasks[record.endpoint] = self._loop.create_task(self._watch(group, record), name=name)

    def _cancel(self, group: _Group, record: TargetRecord) -> None:
        task = group.tasks.pop(record.endpoint, None)
        if task is not None:
            task.cancel()

    async def _watch(self, group: _Group, record: TargetRecord) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._rng.uniform(0, min(group.spec.health_check.interval, FIRST_ROUND_SPREAD))
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            check = group.spec.health_check  # the latest settings
            if record.health.reason is TargetReason.REGISTRATION_IN_PROGRESS:
                record.health = INITIAL_CHECKING
            try:
                result = await check_target(check, record.target.address, record.port, group.spec.tls)
            except Exception as exc:  # a bug, not a target failure: keep checking
                log.exception("%s %s: health check failed", group.spec.name, hostport(*record.endpoint))
                result = CheckResult.failed(TargetReason.FAILED_HEALTH_CHECKS, str(exc) or type(exc).__name__)
            self._observe(group, record, result)
            self._deliver()
            due = max(due + check.interval * self._rng.uniform(1 - JITTER, 1 + JITTER), loop.time())

    def _observe(self, group: _Group, record: TargetRecord, result: CheckResult) -> None:
        log.debug("%s %s: %s (%.1f ms)", group.spec.name, hostport(*record.endpoint),
                  result.description, result.latency_ms)
        self._changed(group, record, record.observe(result, group.spec.health_check, self._clock()))

    def _changed(self, group: _Group, record: TargetRecord, old: TargetHealth | None) -> None:
        if old is None:
            return
        new = record.health
        where = f"{group.spec.name} {hostport(*record.endpoint)}"
        why = f" ({new.reason.value}: {new.description})" if new.reason else ""
        log.info("%s: %s -> %s%s", where, old.state.value, new.state.value, why)
        if self._on_change is not None:
            self._pending.append(StateChange(group.spec.name, record.target, old, new, record.last_change))

    def _deliver(self) -> None:
        if self._delivering or self._on_change is None:
            return  # a callback's own queries end here; the loop below goes on
        self._delivering = True
        try:
            while self._pending:
                change = self._pending.popleft()
                try:
                    self._on_change(change)
                except Exception:
                    log.exception("%s %s: on_change failed", change.group, change.target.address)
        finally:
            self._delivering = False

    def _arm_reaper(self) -> None:
        """Run expire() when the next drain ends (only while run() runs)."""
        if self._loop is None:
            return
        deadline = min((r.drain_deadline for g in self._groups.values() for r in g.records.values()
                        if r.drain_deadline is not None), default=None)
        if self._reaper is not None:
            if deadline == self._reaper_at:
                return
            self._reaper.cancel()
            self._reaper = None
        self._reaper_at = deadline
        if deadline is not None:  # 1 ms late: asyncio may run a timer up to its clock resolution early
            self._reaper = self._loop.call_later(max(0.0, deadline - self._clock()) + 0.001, self._reap)

    def _reap(self) -> None:
        self._reaper = self._reaper_at = None
        self.expire()
