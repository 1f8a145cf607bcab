"""The ELB target state machine, pure: one target's health and what changes it.

Results count as lb.health describes; nothing here does I/O or knows a clock
(times are passed in).
"""

from __future__ import annotations

from dataclasses import dataclass

from lb.health.checks import CheckResult
from lb.model import HealthCheck, IPAddress, Target, TargetHealth, TargetReason, TargetState

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
