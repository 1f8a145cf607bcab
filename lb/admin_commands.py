"""What the admin socket's commands do in a running daemon.

    status                  name, pid, config and load time, program, attachments, listeners,
                            L7 workers (pid, state, started, restarts), HTTPS certificates
                            (listener, file, names, expiry), BGP sessions and announcements
    targets [group]         every target with its health, as describe-target-health
    register / deregister   a target in a group (deregistered targets drain first)
    reload                  re-read the config: all or nothing (Daemon.reload)
    bgp_withdraw / _announce  out of BGP rotation (flows here go on) and back (lb.bgp.speaker)

lb.admin carries the requests over the socket; this module answers them.
Every request is first validated by lb.config (`admin_request`) exactly like
a config file: the same rules, ranges and quotas for a target, unknown keys
refused with a did-you-mean, every issue at its key path under the command
(``register.weight: -5 is outside 1..100``); a rejected request changes
nothing. It sees the daemon through `DaemonView`, the few parts a command
reads or acts on, so it never imports lb.daemon: the daemon hands itself over.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from typing import Any, Protocol

from lb import config as configmod
from lb import tls
from lb.admin import AdminError
from lb.bgp.speaker import Speaker
from lb.dataplane.loader import Program
from lb.health import HealthChecker
from lb.health.anomaly import PassiveHealth
from lb.model import LoadBalancer, Target, TargetGroup
from lb.registrations import Registrations
from lb.runstate import RuntimeState, listener_rows

COMMANDS = tuple(configmod.ADMIN_COMMANDS)


class WorkerTable(Protocol):
    """The L7 workers (lb.l7.server.L7Server), for status."""

    def workers(self) -> list[dict[str, Any]]: ...


class DaemonView(Protocol):
    """The running daemon as the commands see it."""

    @property
    def config(self) -> LoadBalancer: ...

    @property
    def config_path(self) -> str | None: ...

    @property
    def state(self) -> RuntimeState: ...

    @property
    def registrations(self) -> Registrations: ...

    @property
    def program(self) -> Program | None: ...

    @property
    def health(self) -> HealthChecker | None: ...

    @property
    def l7(self) -> WorkerTable | None: ...

    @property
    def passive(self) -> PassiveHealth | None: ...

    @property
    def bgp(self) -> Speaker | None: ...

    def schedule_reconcile(self) -> None: ...

    async def reload(self) -> dict[str, Any]: ...


class AdminCommands:
    """`handle` is the lb.admin.AdminServer handler; raises AdminError for a clean error."""

    def __init__(self, daemon: DaemonView) -> None:
        self.daemon = daemon

    async def handle(self, request: dict[str, Any]) -> Any:
        try:
            valid = configmod.admin_request(request, self.daemon.config, self._registered)
        except configmod.ConfigError as exc:
            raise AdminError("\n".join(exc.lines())) from None
        if valid.cmd == "status":
            return self.status()
        if valid.cmd == "targets":
            return self.targets(valid.group)
        if valid.cmd == "reload":
            return await self.daemon.reload()
        if valid.cmd in ("bgp_withdraw", "bgp_announce"):
            speaker = self.daemon.bgp
            if speaker is None:
                raise AdminError("this load balancer announces nothing: its config has no [load_balancer.bgp]")
            return speaker.withdraw() if valid.cmd == "bgp_withdraw" else speaker.announce()
        assert valid.group is not None and valid.target is not None  # register, deregister
        target = valid.target
        if valid.cmd == "register" and "weight" not in request:  # no weight given: keep the one it has
            target = replace(target, weight=self._current_weight(valid.group, target))
        return self.change_registration(valid.cmd, valid.group, target)

    def _current_weight(self, group: TargetGroup, target: Target) -> int:
        """The weight the endpoint has now (registered, else in the config), else 1."""
        endpoint = (target.address, target.traffic_port(group.port))
        for known in (*self._registered(group.name), *group.targets):
            if (known.address, known.traffic_port(group.port)) == endpoint:
                return known.weight
        return 1

    def _registered(self, group: str) -> tuple[Target, ...]:
        health = self.daemon.health
        return () if health is None else health.registered(group)

    def status(self) -> dict[str, Any]:
        daemon = self.daemon
        return {
            "name": daemon.config.name,
            "pid": os.getpid(),
            "config": daemon.config_path or "<embedded default>",
            "loaded_at": daemon.state.loaded_at,
            "netns": daemon.config.netns,
            "pin_dir": daemon.state.pin_dir,
            "program_id": daemon.program.prog_id if daemon.program else None,
            "attachments": daemon.state.attachments,
            "listeners": listener_rows(daemon.config),
            "l7_workers": daemon.l7.workers() if daemon.l7 is not None else [],
            "certificates": tls.certificate_rows(daemon.config),
            "bgp": daemon.bgp.status() if daemon.bgp is not None else None,
        }

    def targets(self, group: TargetGroup | None) -> list[dict[str, Any]]:
        config, health = self.daemon.config, self.daemon.health
        assert health is not None
        names = [g.name for g in config.target_groups] if group is None else [group.name]
        registrations = self.daemon.registrations
        rows = []
        for name in names:
            port = config.target_group(name).port
            check = config.target_group(name).health_check
            for target, record in health.health(name).items():
                rows.append({
                    "group": name,
                    "target": str(target.address),
                    "port": target.traffic_port(port),
                    "weight": target.weight,
                    "registration": registrations.source(name, str(target.address), target.traffic_port(port)),
                    "state": record.health.state.value,
                    "reason": record.health.reason.value if record.health.reason else None,
                    "description": record.health.description,
                    "last_latency_ms": record.last_latency_ms,
                    "last_result": None if record.last_result is None else
                    ("passed" if record.last_result.ok else "failed"),
                    "last_checked_ago_s": None if record.last_checked is None else
                    round(time.monotonic() - record.last_checked, 3),
                    # Progress toward the next state: consecutive results against the thresholds.
                    "checks": {"passes": record.consecutive_passes, "fails": record.consecutive_fails,
                               "healthy_threshold": check.healthy_threshold,
                               "unhealthy_threshold": check.unhealthy_threshold},
                    "anomaly": self._anomaly(name, f"{target.address}:{target.traffic_port(port)}"),
                })
            shown = {(row["target"], row["port"]) for row in rows if row["group"] == name}
            for entry in registrations.deregistered(name):  # drained, and held out of the config's targets
                if (entry.address, entry.port) not in shown:
                    rows.append({
                        "group": name, "target": entry.address, "port": entry.port, "weight": entry.config_weight,
                        "registration": registrations.source(name, entry.address, entry.port),
                        "state": "unused", "reason": "Target.NotRegistered",
                        "description": "Deregistered by `lb targets deregister`; the config lists it",
                        "last_latency_ms": None, "last_result": None, "last_checked_ago_s": None,
                        "checks": None, "anomaly": None,
                    })
        return rows

    def _anomaly(self, group: str, target: str) -> dict[str, Any] | None:
        """Passive health's last judgement of the target (None: off for the group, or no requests yet)."""
        passive = self.daemon.passive
        verdict = passive.verdict(group, target) if passive is not None else None
        if verdict is None:
            return None
        return {"mitigated": verdict.mitigated, "requests": verdict.requests,
                "failure_rate": round(verdict.failure_rate, 4),
                "peer_failure_rate": round(verdict.peer_failure_rate, 4)}

    def change_registration(self, cmd: str, group: TargetGroup, target: Target) -> dict[str, Any]:
        health = self.daemon.health
        assert health is not None
        address, port = target.address, target.traffic_port(group.port)
        registrations = self.daemon.registrations
        if cmd == "register":
            registrations.register(group, target)
            registrations.save()  # first: a command that was answered is never lost by a restart
            health.register(group.name, target)
        else:
            known = [t for t in health.health(group.name) if (t.address, t.traffic_port(group.port)) == (address, port)]
            held_out = registrations.source(group.name, str(address), port)
            if not known and held_out is None:
                where = f"target group {group.name!r}"
                shown = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
                raise AdminError(f"deregister.target: {shown} is not registered in {where}")
            registrations.deregister(group, target)
            registrations.save()
            if known:
                health.deregister(group.name, known[0])
        self.daemon.schedule_reconcile()
        shown = f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
        return {cmd: shown, "group": group.name, "target": str(address), "port": port,
                "weight": target.weight if cmd == "register" else None}
