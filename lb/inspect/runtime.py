"""What runs: the daemon, where XDP is attached, the pinned program (`lb status`),
and the targets' health as the daemon checks it (`lb targets`)."""

from __future__ import annotations

import os
import time
from typing import Any

from lb import netlink as nl
from lb.bgp.speaker import read_bird
from lb.dataplane import libbpf
from lb.dataplane.pins import PROGRAM_PIN, pin_dir
from lb.dataplane.structs import MapName
from lb.hostnet import xdp_interfaces
from lb.inspect.access import InspectError, ask_daemon, require_root
from lb.model import LoadBalancer
from lb.registrations import Registrations
from lb.runstate import RuntimeState, listener_rows


def attached_interfaces(config: LoadBalancer) -> list[str]:
    """Interfaces the last `lb up` attached to (its state file), else the config's."""
    return _attached_interfaces(config, RuntimeState.load(config.name))


def _attached_interfaces(config: LoadBalancer, state: RuntimeState | None) -> list[str]:
    if state is not None and state.attachments:
        return [a["ifname"] for a in state.attachments]
    if config.interfaces:
        return list(config.interfaces)
    if config.netns is None:
        return xdp_interfaces(config)
    return []


def pinned_program(config: LoadBalancer) -> dict[str, Any] | None:
    """The program pinned at <pin dir>/prog: {"id", "name", "loaded_at" (epoch s)}, or None."""
    path = os.path.join(pin_dir(config.name), PROGRAM_PIN)
    if not os.path.exists(path):
        return None
    fd = libbpf.obj_get(path)
    try:
        info = libbpf.prog_info(fd)
    finally:
        os.close(fd)
    since_load = time.clock_gettime(time.CLOCK_BOOTTIME) - info.load_time_ns / 1e9
    return {"id": info.prog_id, "name": info.name, "loaded_at": time.time() - since_load}


def status(config: LoadBalancer) -> dict[str, Any]:
    """Is the daemon up, where is XDP attached, what is pinned, which config.

    {"name", "daemon": {"running": bool, "reason": str|None, "pid"?, ...the
    admin "status" answer when running}, "config": {"path", "loaded_at"}
    (from the daemon, else its state file; None when unknown), "xdp":
    [{"interface", "mode" (native|generic|None|"no such interface"),
    "program_id", "ours" (the pinned program is the one attached)}],
    "program": pinned_program(), "pin_dir", "maps_pinned", "metrics_address",
    "listeners": [{"name", "protocol", "address", "port"}], "bgp": None or
    {"sessions": [{"neighbor", "as", "protocol", "state", "info", "since"}],
    "announced": [prefix], "in_rotation", "error", ...} (read from BIRD)}
    """
    require_root("lb status")
    running, reason = ask_daemon(config, "status")
    daemon: dict[str, Any] = {"running": False, "reason": reason}
    if running:
        daemon = {"running": True, "reason": None, **running}
    state = RuntimeState.load(config.name)
    if running:
        loaded = {"path": running["config"], "loaded_at": running["loaded_at"]}
    elif state is not None:
        loaded = {"path": state.config_path or "<embedded default>", "loaded_at": state.loaded_at}
    else:
        loaded = {"path": None, "loaded_at": None}
    program = pinned_program(config)
    interfaces = _attached_interfaces(config, state)  # the state file, read once above
    xdp: list[dict[str, Any]] = []
    if config.netns is not None and not nl.netns_exists(config.netns):
        xdp = [{"interface": ifname, "mode": f"no namespace {config.netns}", "program_id": None, "ours": False}
               for ifname in interfaces]
    else:
        with nl.iproute(config.netns) as ipr:
            for ifname in interfaces:
                try:
                    mode, prog_id = nl.xdp_info(ipr, ifname)
                except nl.NetlinkLookupError:
                    mode, prog_id = "no such interface", None
                ours = program is not None and prog_id == program["id"]
                xdp.append({"interface": ifname, "mode": mode, "program_id": prog_id, "ours": ours})
    directory = pin_dir(config.name)
    return {
        "name": config.name,
        "daemon": daemon,
        "config": loaded,
        "xdp": xdp,
        "program": program,
        "pin_dir": directory,
        "maps_pinned": os.path.exists(os.path.join(directory, MapName.VIPS.value)),
        "metrics_address": config.metrics_address,
        "listeners": listener_rows(config),
        "bgp": _bgp(config, running),
    }


def _bgp(config: LoadBalancer, running: dict[str, Any] | None) -> dict[str, Any] | None:
    """The daemon's BGP view, or (daemon down) what BIRD still has of lb's."""
    if config.bgp is None:
        return None
    if running and running.get("bgp") is not None:
        return dict(running["bgp"])
    return {"in_rotation": None, **read_bird(config.bgp, config.name)}


def targets(config: LoadBalancer, group: str | None = None) -> dict[str, Any]:
    """Every registered target with its health, as describe-target-health.

    {"daemon": {"running": bool, "reason": str|None}, "targets": [{"group",
    "target" (address), "port", "weight", "state", "reason", "description",
    "last_latency_ms", "last_result" ("passed"|"failed"|None),
    "last_checked_ago_s", "registration" (None: as the config says, else
    {"action": "register"|"deregister", "weight", "at" (epoch s)}),
    "checks" (None, or {"passes", "fails" (consecutive), "healthy_threshold",
    "unhealthy_threshold"}: the progress toward the next state), "anomaly"
    (None: passive health off for the group or no requests yet, else
    {"mitigated", "requests", "failure_rate", "peer_failure_rate"} over its
    window)}]}.
    last_result and last_checked_ago_s are None unless the daemon reports
    them. With the daemon down: the config's targets with the saved
    registrations applied (lb.registrations), state "unknown".
    """
    require_root("lb targets")
    names = [g.name for g in config.target_groups]
    if group is not None and group not in names:
        raise InspectError(f"no target group {group!r} (groups: {', '.join(names) or 'none'})")
    rows, reason = ask_daemon(config, "targets", group=group)
    if rows is None and reason is not None and reason.startswith("no target group"):
        raise InspectError(f"the running daemon: {reason} (reload it after changing the config)")
    if rows is not None:
        fields = ("group", "target", "port", "weight", "state", "reason", "description", "last_latency_ms",
                  "last_result", "last_checked_ago_s", "registration", "checks", "anomaly")
        return {"daemon": {"running": True, "reason": None},
                "targets": [{key: row.get(key) for key in fields} for row in rows]}
    out = []
    registrations = Registrations.load(config.name, set_aside=False)
    registrations.reconcile(config)  # what the next start would keep (the file is left as it is)
    for g in registrations.effective_groups(config):
        if group is None or g.name == group:
            for t in g.targets:
                address, port = str(t.address), t.traffic_port(g.port)
                out.append({"group": g.name, "target": address, "port": port, "weight": t.weight,
                            "state": "unknown", "reason": None, "description": "the daemon is not running",
                            "last_latency_ms": None, "last_result": None, "last_checked_ago_s": None,
                            "registration": registrations.source(g.name, address, port), "checks": None,
                            "anomaly": None})
            for entry in registrations.deregistered(g.name):
                out.append({"group": g.name, "target": entry.address, "port": entry.port,
                            "weight": entry.config_weight, "state": "unused", "reason": "Target.NotRegistered",
                            "description": "Deregistered by `lb targets deregister`; the config lists it",
                            "last_latency_ms": None, "last_result": None, "last_checked_ago_s": None,
                            "registration": registrations.source(g.name, entry.address, entry.port),
                            "checks": None, "anomaly": None})
    return {"daemon": {"running": False, "reason": reason}, "targets": out}
