"""Health checks and the ELB target state machine; never touches BPF maps.

One task per (target group, target) on the daemon's loop: HTTP checks send a
minimal ``Connection: close`` request and read only the status line, TCP
checks only connect. Each target's first check fires at a random offset
within the interval and later ones every interval ±10 %, so hundreds of
targets do not fire together. Addresses are IP literals, so connecting never
resolves anything.

States and reason codes are ELB's (shared/REFERENCE.md, target groups):

- a registered target is ``initial`` (Elb.RegistrationInProgress, then
  Elb.InitialHealthChecking once its first check started); one passing check
  makes it ``healthy``, ``unhealthy_threshold`` consecutive failures
  ``unhealthy``;
- ``healthy`` → ``unhealthy`` after ``unhealthy_threshold`` consecutive
  failures, with the reason of the last one (Target.ResponseCodeMismatch,
  Target.Timeout, Target.FailedHealthChecks); back after
  ``healthy_threshold`` consecutive passes;
- checks disabled: ``unavailable`` (Target.HealthCheckDisabled), which takes
  traffic as if healthy;
- deregistered: ``draining`` for ``deregistration_delay``, unchecked, then
  forgotten (``unused``, Target.NotRegistered).

Only a change of *state* is logged and reported to ``on_change`` (after the
call that caused it has finished, so the callback may query the checker); a
new reason or description within a state (the latest failure while
unhealthy, RegistrationInProgress → InitialHealthChecking) only updates the
record.

Pure parts (Matcher, next_health, TargetRecord, the status-line protocol)
need no sockets; HealthChecker runs them on the loop. Settings are taken as
given (fractional seconds work), config.py enforces ELB's limits.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import cast

from lb.model import (
    HealthCheck,
    HealthCheckProtocol,
    IPAddress,
    Target,
    TargetGroup,
    TargetHealth,
    TargetReason,
    TargetState,
)

__all__ = [
    "CheckResult", "HealthChecker", "Matcher", "StateChange", "TargetRecord",
    "check_http", "check_tcp", "check_target", "next_health",
]

log = logging.getLogger("lb.health")

JITTER = 0.1  # later checks every interval × uniform(1 - JITTER, 1 + JITTER)
USER_AGENT = "lb-health/1"
MAX_STATUS_LINE = 8192  # bytes read looking for the status line

# TargetHealth values that do not depend on a check result (ELB's descriptions).
REGISTERING = TargetHealth(TargetState.INITIAL, TargetReason.REGISTRATION_IN_PROGRESS,
                           "Target registration is in progress")
INITIAL_CHECKING = TargetHealth(TargetState.INITIAL, TargetReason.INITIAL_HEALTH_CHECKING,
                                "Initial health checks in progress")
HEALTHY = TargetHealth(TargetState.HEALTHY)
DISABLED = TargetHealth(TargetState.UNAVAILABLE, TargetReason.HEALTH_CHECK_DISABLED, "Health checks disabled")
DRAINING = TargetHealth(TargetState.DRAINING, TargetReason.DEREGISTRATION_IN_PROGRESS,
                        "Target deregistration is in progress")
NOT_REGISTERED = TargetHealth(TargetState.UNUSED, TargetReason.NOT_REGISTERED,
                              "Target is not registered to the target group")

Endpoint = tuple[IPAddress, int]  # a target's identity in its group: address, traffic port


# --- matcher -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """Success codes: "200", "200,202", "200-299", or a comma list of those."""

    ranges: tuple[tuple[int, int], ...]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def parse(spec: str) -> Matcher:
        ranges = []
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise ValueError(f"{spec!r} is not a valid matcher: use '200', '200,202' or '200-299'")
            first, last = int(lo), int(hi) if dash else int(lo)
            if not 100 <= first <= last <= 599:
                raise ValueError(f"{spec!r} is not a valid matcher: {part.strip()!r} is not within 100..599")
            ranges.append((first, last))
        return Matcher(tuple(ranges))

    def __contains__(self, code: object) -> bool:
        return isinstance(code, int) and any(lo <= code <= hi for lo, hi in self.ranges)


# --- one check -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check; reason is None when it passed."""

    ok: bool
    description: str
    latency_ms: float
    reason: TargetReason | None = None
    status: int | None = None  # HTTP status code, when one was read

    @classmethod
    def failed(cls, reason: TargetReason, description: str, latency_ms: float = 0.0,
               status: int | None = None) -> CheckResult:
        return cls(False, description, latency_ms, reason, status)


class MalformedResponse(Exception):
    """The target did not answer with an HTTP status line."""


class StatusLineProtocol(asyncio.Protocol):
    """Sends the request on connect; resolves `status` with the status code."""

    def __init__(self, request: bytes, status: asyncio.Future[int]) -> None:
        self.request = request
        self.status = status
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)  # uvloop's are no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return  # the body: ignored
        self.buffer += data
        line, newline, _ = self.buffer.partition(b"\n")
        if not newline:
            if len(self.buffer) > MAX_STATUS_LINE:
                self.status.set_exception(MalformedResponse("Status line too long"))
            return
        match = re.fullmatch(rb"HTTP/1\.[01] ([1-5]\d\d)(?: [^\r\n]*)?\r?", line)
        if match is None:
            self.status.set_exception(MalformedResponse("Invalid HTTP response"))
        else:
            self.status.set_result(int(match[1]))

    def eof_received(self) -> bool:
        self._fail(MalformedResponse("Connection closed before a response"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or MalformedResponse("Connection closed before a response"))

    def _fail(self, exc: BaseException) -> None:
        if not self.status.done():
            self.status.set_exception(exc)


def _failure(exc: Exception) -> tuple[TargetReason, str]:
    if isinstance(exc, TimeoutError):
        return TargetReason.TIMEOUT, "Request timed out"
    if isinstance(exc, ConnectionRefusedError):
        return TargetReason.FAILED_HEALTH_CHECKS, "Connection refused"
    if isinstance(exc, ConnectionResetError):
        return TargetReason.FAILED_HEALTH_CHECKS, "Connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return TargetReason.FAILED_HEALTH_CHECKS, exc.strerror
    return TargetReason.FAILED_HEALTH_CHECKS, str(exc) or type(exc).__name__


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def _hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def check_http(address: IPAddress, port: int, *, timeout: float, matcher: Matcher,
                     method: str = "GET", path: str = "/") -> CheckResult:
    """One HTTP check: pass when the status code is in `matcher`."""
    loop = asyncio.get_running_loop()
    request = (f"{method} {path} HTTP/1.1\r\nHost: {_hostport(address, port)}\r\n"
               f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode("ascii")
    start = time.perf_counter()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            status: asyncio.Future[int] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda: StatusLineProtocol(request, status), str(address), port, family=_family(address))
            code = await status
    except Exception as exc:  # noqa: BLE001 - every failure is a failed check
        return CheckResult.failed(*_failure(exc), (time.perf_counter() - start) * 1000)
    finally:
        if transport is not None:
            transport.close()
    latency_ms = (time.perf_counter() - start) * 1000
    if code in matcher:
        return CheckResult(True, f"HTTP {code}", latency_ms, status=code)
    return CheckResult.failed(TargetReason.RESPONSE_CODE_MISMATCH,
                              f"Health checks failed with these codes: [{code}]", latency_ms, code)


async def check_tcp(address: IPAddress, port: int, *, timeout: float) -> CheckResult:
    """One TCP check: pass when the connection is established."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(asyncio.Protocol, str(address), port,
                                                        family=_family(address))
    except Exception as exc:  # noqa: BLE001 - every failure is a failed check
        return CheckResult.failed(*_failure(exc), (time.perf_counter() - start) * 1000)
    transport.close()
    return CheckResult(True, "Connected", (time.perf_counter() - start) * 1000)


async def check_target(check: HealthCheck, address: IPAddress, traffic_port: int) -> CheckResult:
    """Run `check` once against a target listening on `traffic_port`."""
    port = check.port if check.port is not None else traffic_port
    if check.protocol is HealthCheckProtocol.TCP:
        return await check_tcp(address, port, timeout=check.timeout)
    return await check_http(address, port, timeout=check.timeout, matcher=Matcher.parse(check.matcher),
                            method=check.method, path=check.path)


# --- the state machine ---------------------------------------------------------


def next_health(health: TargetHealth, result: CheckResult, passes: int, fails: int,
                check: HealthCheck) -> TargetHealth:
    """The health after `result`; passes/fails are the consecutive counts including it."""
    state = health.state
    if state not in (TargetState.INITIAL, TargetState.HEALTHY, TargetState.UNHEALTHY):
        return health  # draining, unavailable, unused: results do not count
    if result.ok:
        if state is TargetState.INITIAL or passes >= check.healthy_threshold:
            return HEALTHY
        return health
    if state is TargetState.UNHEALTHY or fails >= check.unhealthy_threshold:
        assert result.reason is not None
        return TargetHealth(TargetState.UNHEALTHY, result.reason, result.description)
    return INITIAL_CHECKING if state is TargetState.INITIAL else health


class TargetRecord:
    """One target's health in one group, and what its checks found. Read-only to callers."""

    __slots__ = ("target", "port", "health", "consecutive_passes", "consecutive_fails",
                 "last_checked", "last_result", "last_change", "drain_deadline")

    def __init__(self, target: Target, port: int, health: TargetHealth, now: float) -> None:
        self.target = target
        self.port = port  # traffic port, resolved against the group's
        self.health = health
        self.consecutive_passes = 0
        self.consecutive_fails = 0
        self.last_checked: float | None = None  # clock time the last result arrived
        self.last_result: CheckResult | None = None
        self.last_change = now  # clock time of the last change of state
        self.drain_deadline: float | None = None  # while draining: when it is forgotten

    @property
    def state(self) -> TargetState:
        return self.health.state

    @property
    def description(self) -> str:
        return self.health.description

    @property
    def last_latency_ms(self) -> float | None:
        return self.last_result.latency_ms if self.last_result is not None else None

    @property
    def endpoint(self) -> Endpoint:
        return self.target.address, self.port

    def set_health(self, health: TargetHealth, now: float) -> TargetHealth | None:
        """Apply `health`; returns the previous health if the state changed."""
        old, self.health = self.health, health
        if old.state is health.state:
            return None
        self.last_change = now
        return old

    def observe(self, result: CheckResult, check: HealthCheck, now: float) -> TargetHealth | None:
        """Count one result; returns the previous health if the state changed."""
        if result.ok:
            self.consecutive_passes, self.consecutive_fails = self.consecutive_passes + 1, 0
        else:
            self.consecutive_passes, self.consecutive_fails = 0, self.consecutive_fails + 1
        self.last_checked, self.last_result = now, result
        return self.set_health(
            next_health(self.health, result, self.consecutive_passes, self.consecutive_fails, check), now)


@dataclass(frozen=True, slots=True)
class StateChange:
    group: str
    target: Target
    old: TargetHealth
    new: TargetHealth
    at: float  # the checker's clock


# --- the checker ---------------------------------------------------------------


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
        if check.protocol is HealthCheckProtocol.HTTP:
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
            for key, target in keys.items():
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
        name = f"health {group.spec.name} {_hostport(*record.endpoint)}"
        group.tasks[record.endpoint] = self._loop.create_task(self._watch(group, record), name=name)

    def _cancel(self, group: _Group, record: TargetRecord) -> None:
        task = group.tasks.pop(record.endpoint, None)
        if task is not None:
            task.cancel()

    async def _watch(self, group: _Group, record: TargetRecord) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + self._rng.uniform(0, group.spec.health_check.interval)
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            check = group.spec.health_check  # the latest settings
            if record.health.reason is TargetReason.REGISTRATION_IN_PROGRESS:
                record.health = INITIAL_CHECKING
            try:
                result = await check_target(check, record.target.address, record.port)
            except Exception as exc:  # a bug, not a target failure: keep checking
                log.exception("%s %s: health check failed", group.spec.name, _hostport(*record.endpoint))
                result = CheckResult.failed(TargetReason.FAILED_HEALTH_CHECKS, str(exc) or type(exc).__name__)
            self._observe(group, record, result)
            self._deliver()
            due = max(due + check.interval * self._rng.uniform(1 - JITTER, 1 + JITTER), loop.time())

    def _observe(self, group: _Group, record: TargetRecord, result: CheckResult) -> None:
        log.debug("%s %s: %s (%.1f ms)", group.spec.name, _hostport(*record.endpoint),
                  result.description, result.latency_ms)
        self._changed(group, record, record.observe(result, group.spec.health_check, self._clock()))

    def _changed(self, group: _Group, record: TargetRecord, old: TargetHealth | None) -> None:
        if old is None:
            return
        new = record.health
        where = f"{group.spec.name} {_hostport(*record.endpoint)}"
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
