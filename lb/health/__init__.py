"""Health checks and the ELB target state machine; never touches BPF maps.

One task per (target group, target) on the daemon's loop: HTTP checks send a
minimal ``Connection: close`` request and read only the status line, TCP
checks only connect. Each target's first check fires at a random offset
within the first second (or the interval, if shorter) and later ones every
interval ±10 %, so hundreds of targets do not fire together, yet a start or
restart learns every target's state at once. Addresses are IP literals, so connecting never
resolves anything.

States and reason codes are ELB's (docs/elb-reference.md, target groups):

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

Pure parts (Matcher, next_health, TargetRecord, the status-line protocol)
need no sockets; HealthChecker runs them on the loop. Settings are taken as
given (fractional seconds work), lb.config enforces ELB's limits.

Modules: :mod:`~lb.health.checks` (one check: Matcher, CheckResult, the
status-line protocol), :mod:`~lb.health.states` (the state machine:
next_health, TargetRecord, ELB's fixed TargetHealth values) and
:mod:`~lb.health.checker` (HealthChecker: schedules, registers, drains).
"""

from lb.health.checker import HealthChecker
from lb.health.checks import CheckResult, Matcher, check_http, check_target, check_tcp
from lb.health.states import StateChange, TargetRecord, next_health

__all__ = [
    "CheckResult", "HealthChecker", "Matcher", "StateChange", "TargetRecord",
    "check_http", "check_tcp", "check_target", "next_health",
]
