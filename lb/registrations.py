"""Runtime registrations: what `lb targets register|deregister` changed, kept
across `lb reload` and a restart of the daemon.

    /run/lb/<name>.registrations.json   (0600) one entry per endpoint an
                                        operator registered or deregistered

Precedence. The config is the base; an entry overrides the config's entry
for the same endpoint (group, address, traffic port) for as long as the
config says about that endpoint what it said when the command ran. Each
entry records that (`config_weight`: the endpoint's weight in the config
then, None when the config did not list it). When a start or a reload reads
a config that says something else about the endpoint (lists it now, no
longer lists it, gives it another weight) or no longer has the group, the
config wins: the entry is dropped and the drop is logged and reported by
`lb reload`. An entry of a TCP/UDP group is dropped too when the
listeners that forward to the group are now of the other family (a flow
stays within one family: lb.config refuses such a registration). So:

- deregister a target the config lists: it drains and stays out through
  reloads and restarts (a restart during its deregistration delay resumes
  the drain for what is left of it), until the config's line for it
  changes (or `lb targets register` brings it back, which removes the entry);
- register a target the config does not list: it stays registered until
  deregistered, or until the config lists the endpoint itself;
- register a listed target with another weight: that weight holds until the
  config's weight for it changes.

The file lives in /run/lb, next to the state file: a host reboot starts
from the config alone, like the pinned maps and their flows. `lb down`
removes it (`--keep-maps` keeps it with the maps).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from lb import model as m
from lb.model import ForwardAction, LoadBalancer, Target, TargetGroup
from lb.runstate import RUN_DIR

log = logging.getLogger("lb.registrations")

REGISTER, DEREGISTER = "register", "deregister"

Key = tuple[str, str, int]  # group, address, traffic port


class Draining(Protocol):
    """What `resume` needs of the health checker (lb.health.HealthChecker)."""

    def resume_draining(self, group: str, target: Target, remaining: float) -> None: ...


def registrations_path(name: str) -> str:
    return os.path.join(RUN_DIR, f"{name}.registrations.json")


@dataclass(frozen=True)
class Registration:
    """One operator command that still overrides the config."""

    group: str
    address: str
    port: int  # the traffic port
    action: str  # REGISTER | DEREGISTER
    weight: int | None  # REGISTER: the weight given; DEREGISTER: None
    config_weight: int | None  # the config's weight for the endpoint when the command ran; None: not listed
    at: float  # epoch seconds of the command
    drain_until: float | None = None  # DEREGISTER: epoch seconds its deregistration delay ends

    @property
    def key(self) -> Key:
        return self.group, self.address, self.port


def checked(entry: Registration) -> Registration:
    """`entry` as read from the file, or ValueError naming what is wrong with it
    (the file is root's, but may have been edited by hand)."""
    ipaddress.ip_address(entry.address)
    ints = (entry.port, entry.weight or 1, entry.config_weight or 1)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or not 0 < entry.port <= 65535:
        raise ValueError(f"{entry.address}: port and weights must be integers, the port 1..65535")
    if entry.action not in (REGISTER, DEREGISTER) or not isinstance(entry.group, str):
        raise ValueError(f"{entry.address}: action {entry.action!r} is not register or deregister")
    if entry.drain_until is not None and not isinstance(entry.drain_until, (int, float)):
        raise ValueError(f"{entry.address}: drain_until {entry.drain_until!r} is not a time")
    if (entry.action == REGISTER) != (entry.weight is not None) or not 0 < (entry.weight or 1) <= 100:
        raise ValueError(f"{entry.address}: a registration has a weight 1..100, a deregistration none")
    return entry


def config_weight(group: TargetGroup, address: str, port: int) -> int | None:
    """The weight the config gives this endpoint in `group`, or None if it does not list it."""
    for target in group.targets:
        if str(target.address) == address and target.traffic_port(group.port) == port:
            return target.weight
    return None


def l4_families(config: LoadBalancer) -> dict[str, int]:
    """Target group → the IP version of the TCP/UDP listeners that forward to it."""
    return {listener.default_action.target_groups[0].name: listener.address.version
            for listener in config.listeners_of(m.Protocol.TCP, m.Protocol.UDP)
            if isinstance(listener.default_action, ForwardAction)}


class Registrations:
    """The entries of one load balancer, by endpoint; `save` writes them."""

    def __init__(self, name: str, entries: list[Registration] | None = None, *, persist: bool = True) -> None:
        self.name = name
        self.entries: dict[Key, Registration] = {e.key: e for e in entries or []}
        self.persist = persist  # False: kept in memory only (save and remove do nothing)

    # --- the file ---

    @classmethod
    def load(cls, name: str, *, set_aside: bool = True) -> Registrations:
        """The saved entries; none when there is no file. A file that cannot
        be read is set aside (`.bad`, unless set_aside is False: a reader
        that only looks) with a warning: the config applies."""
        path = registrations_path(name)
        try:
            with open(path) as f:
                data = json.load(f)
            entries = [checked(Registration(**e)) for e in data["entries"]]
        except FileNotFoundError:
            return cls(name)
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            log.warning("%s: unreadable (%s); the config alone applies", path, exc)
            if set_aside:
                os.replace(path, path + ".bad")
            return cls(name)
        return cls(name, entries)

    def save(self) -> None:
        if not self.persist:
            return
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        path = registrations_path(self.name)
        if not self.entries:
            self.remove(self.name)
            return
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "entries": [asdict(e) for e in self.entries.values()]}, f, indent=2)
        os.replace(tmp, path)

    @staticmethod
    def remove(name: str) -> None:
        try:
            os.unlink(registrations_path(name))
        except FileNotFoundError:
            pass

    # --- commands ---

    def register(self, group: TargetGroup, target: Target) -> None:
        port = target.traffic_port(group.port)
        key = (group.name, str(target.address), port)
        self.entries.pop(key, None)
        listed = config_weight(group, key[1], port)
        if listed != target.weight:  # else the config says just this: no override left
            self.entries[key] = Registration(*key, REGISTER, target.weight, listed, time.time())

    def deregister(self, group: TargetGroup, target: Target) -> None:
        port = target.traffic_port(group.port)
        key = (group.name, str(target.address), port)
        self.entries.pop(key, None)
        listed = config_weight(group, key[1], port)
        if listed is not None:  # a runtime-only target just goes; a listed one is held out
            now = time.time()
            self.entries[key] = Registration(*key, DEREGISTER, None, listed, now, now + group.deregistration_delay)

    # --- against a config ---

    def reconcile(self, config: LoadBalancer) -> list[str]:
        """Drop the entries this config overrules (see the module's docstring);
        one line per drop, also logged."""
        groups = {g.name: g for g in config.target_groups}
        families = l4_families(config)
        dropped = []
        for key, entry in list(self.entries.items()):
            group = groups.get(entry.group)
            where = f"{entry.address}:{entry.port} in {entry.group}"
            version = ipaddress.ip_address(entry.address).version
            if group is None:
                why = "the config no longer has the target group"
            elif entry.action == REGISTER and families.get(entry.group, version) != version:
                why = f"its listeners are IPv{families[entry.group]} now, and a flow stays within one family"
            elif (now := config_weight(group, entry.address, entry.port)) != entry.config_weight:
                then = "not listed" if entry.config_weight is None else f"weight {entry.config_weight}"
                why = f"the config changed it ({then} → {'not listed' if now is None else f'weight {now}'})"
            else:
                continue
            del self.entries[key]
            line = f"runtime {entry.action} of {where} dropped: {why}; the config applies"
            log.info("%s", line)
            dropped.append(line)
        return dropped

    def effective_groups(self, config: LoadBalancer) -> tuple[TargetGroup, ...]:
        """The config's target groups with the entries applied: the targets the daemon registers."""
        out = []
        for group in config.target_groups:
            targets = []
            for target in group.targets:
                entry = self.entries.get((group.name, str(target.address), target.traffic_port(group.port)))
                if entry is None:
                    targets.append(target)
                elif entry.action == REGISTER and entry.weight is not None:
                    targets.append(replace(target, weight=entry.weight))
            listed = {(str(t.address), t.traffic_port(group.port)) for t in group.targets}
            for entry in self.entries.values():
                if entry.group == group.name and entry.action == REGISTER and \
                        (entry.address, entry.port) not in listed:
                    targets.append(Target(ipaddress.ip_address(entry.address), entry.port, entry.weight or 1))
            out.append(replace(group, targets=tuple(targets)))
        return tuple(out)

    def source(self, group: str, address: str, port: int) -> dict[str, Any] | None:
        """The entry overriding this endpoint, as `lb targets` shows it, or None (the config's)."""
        entry = self.entries.get((group, address, port))
        if entry is None:
            return None
        return {"action": entry.action, "weight": entry.weight, "at": entry.at}

    def deregistered(self, group: str) -> list[Registration]:
        return [e for e in self.entries.values() if e.group == group and e.action == DEREGISTER]

    def resume(self, config: LoadBalancer, health: Draining) -> None:
        """At a start: the deregistered targets whose delay has not ended drain
        again for what is left of it (registered as draining, not checked)."""
        now = time.time()
        for group in config.target_groups:
            for entry in self.deregistered(group.name):
                if entry.drain_until is not None and entry.drain_until > now:
                    target = Target(ipaddress.ip_address(entry.address), entry.port, entry.config_weight or 1)
                    health.resume_draining(group.name, target, entry.drain_until - now)
