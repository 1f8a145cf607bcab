"""lb.registrations and `lb targets register|deregister`: the precedence of
runtime registrations over the config, and, with a real daemon, that they
survive `lb reload` and a restart until the config changes the target."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lb import model as m
from lb.health import HealthChecker
from lb.lab import Lab
from lb.registrations import DEREGISTER, REGISTER, Registrations, registrations_path
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.names import name

NAME = name("reg")
GROUP = "echo-tcp"


def group(*targets: tuple[str, int]) -> m.TargetGroup:
    return m.TargetGroup("web", m.Protocol.TCP, 9000,
                         tuple(m.Target(ipaddress.ip_address(a), None, w) for a, w in targets))


def lb_with(g: m.TargetGroup) -> m.LoadBalancer:
    return m.LoadBalancer(name=NAME, target_groups=(g,))


def targets_of(regs: Registrations, lb: m.LoadBalancer) -> dict[str, int]:
    return {str(t.address): t.weight for t in regs.effective_groups(lb)[0].targets}


# --- the precedence, pure -----------------------------------------------------------


def test_deregistered_target_stays_out_until_the_config_changes_it() -> None:
    g = group(("10.0.1.11", 1), ("10.0.1.12", 1))
    regs = Registrations(NAME)
    regs.deregister(g, g.targets[0])
    assert targets_of(regs, lb_with(g)) == {"10.0.1.12": 1}
    assert regs.reconcile(lb_with(g)) == []  # the same config: kept
    assert targets_of(regs, lb_with(g)) == {"10.0.1.12": 1}
    changed = group(("10.0.1.11", 2), ("10.0.1.12", 1))  # the config's line for it changed: the config wins
    [line] = regs.reconcile(lb_with(changed))
    assert "10.0.1.11:9000 in web dropped" in line and "weight 1 → weight 2" in line
    assert targets_of(regs, lb_with(changed)) == {"10.0.1.11": 2, "10.0.1.12": 1}


def test_registered_target_stays_until_deregistered_or_listed_by_the_config() -> None:
    g = group(("10.0.1.11", 1))
    regs = Registrations(NAME)
    regs.register(g, m.Target(ipaddress.ip_address("10.0.1.13"), None, 3))
    regs.register(g, m.Target(ipaddress.ip_address("10.0.1.11"), None, 5))  # a weight over the config's
    assert targets_of(regs, lb_with(g)) == {"10.0.1.11": 5, "10.0.1.13": 3}
    assert regs.reconcile(lb_with(g)) == []
    listed = group(("10.0.1.11", 1), ("10.0.1.13", 1))  # the config lists .13 now: its line decides
    assert len(regs.reconcile(lb_with(listed))) == 1
    assert targets_of(regs, lb_with(listed)) == {"10.0.1.11": 5, "10.0.1.13": 1}
    regs.register(listed, listed.targets[0])  # back to the config's weight: no entry left
    assert list(regs.entries) == [] and targets_of(regs, lb_with(listed)) == {"10.0.1.11": 1, "10.0.1.13": 1}


def test_registering_a_deregistered_target_returns_it_to_the_config_and_groups_gone_drop() -> None:
    g = group(("10.0.1.11", 1))
    regs = Registrations(NAME)
    regs.deregister(g, g.targets[0])
    assert [e.action for e in regs.entries.values()] == [DEREGISTER]
    regs.register(g, g.targets[0])
    assert regs.entries == {}
    regs.register(g, m.Target(ipaddress.ip_address("10.0.1.14"), 80, 1))
    assert [e.action for e in regs.entries.values()] == [REGISTER]
    [line] = regs.reconcile(lb_with(replace(g, name="other")))
    assert "no longer has the target group" in line


def test_a_registration_of_the_other_family_than_the_groups_listeners_is_dropped() -> None:
    """A reload that moves the group's listener to IPv6 drops the IPv4 registrations
    (the data plane could not forward them: a flow stays within one family)."""
    g = group(("10.0.1.11", 1))
    regs = Registrations(NAME)
    regs.register(g, m.Target(ipaddress.ip_address("10.0.1.14"), None, 1))
    action = m.ForwardAction((m.WeightedTargetGroup("web"),))

    def served_from(address: str) -> m.LoadBalancer:
        listener = m.Listener("tcp", m.Protocol.TCP, ipaddress.ip_address(address), 9000, action)
        return replace(lb_with(g), listeners=(listener,))

    assert regs.reconcile(served_from("10.0.0.100")) == []
    [line] = regs.reconcile(served_from("fd00::100"))
    assert line == ("runtime register of 10.0.1.14:9000 in web dropped: its listeners are IPv6 now, and a flow "
                    "stays within one family; the config applies")
    assert targets_of(regs, served_from("fd00::100")) == {"10.0.1.11": 1}


def test_a_restart_resumes_a_drain_for_what_is_left_of_it() -> None:
    g = replace(group(("10.0.1.11", 1), ("10.0.1.12", 1)), deregistration_delay=60)
    regs = Registrations(NAME, persist=False)
    regs.deregister(g, g.targets[0])
    [entry] = regs.entries.values()
    assert entry.drain_until is not None and abs(entry.drain_until - entry.at - 60) < 1e-6
    now = [1000.0]
    health = HealthChecker(regs.effective_groups(lb_with(g)), clock=lambda: now[0])
    regs.resume(lb_with(g), health)
    target = next(t for t in health.registered("web") if str(t.address) == "10.0.1.11")
    assert health.target_health("web", target).state is m.TargetState.DRAINING
    assert health.draining("web") == (target,) and len(health.in_service("web")) == 1
    now[0] += 61
    assert [str(t.address) for t in health.registered("web")] == ["10.0.1.12"]  # its delay ended: unused
    ended = Registrations(NAME, [replace(entry, drain_until=entry.at - 1)], persist=False)
    health = HealthChecker(ended.effective_groups(lb_with(g)))
    ended.resume(lb_with(g), health)
    assert [str(t.address) for t in health.registered("web")] == ["10.0.1.12"]  # over already: not resumed


@pytest.mark.root
def test_the_file_is_0600_and_an_unreadable_one_is_set_aside() -> None:
    path = registrations_path(NAME)
    g = group(("10.0.1.11", 1))
    try:
        regs = Registrations(NAME)
        regs.deregister(g, g.targets[0])
        regs.save()
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert list(Registrations.load(NAME).entries) == list(regs.entries)
        with open(path, "w") as f:
            f.write("{not json")
        assert Registrations.load(NAME, set_aside=False).entries == {} and os.path.exists(path)
        assert Registrations.load(NAME).entries == {} and os.path.exists(path + ".bad")
        good = {"group": "web", "address": "10.0.1.11", "port": 9000, "action": "register", "weight": 1,
                "config_weight": None, "at": 0.0}
        for hostile in ({"address": "10.0.1.300"}, {"port": 0}, {"port": "80"}, {"action": "drain"},
                        {"weight": None}, {"weight": 1000}, {"extra": 1}, {"group": None}):
            with open(path, "w") as f:
                json.dump({"version": 1, "entries": [{**good, **hostile}]}, f)
            assert Registrations.load(NAME).entries == {}, hostile  # set aside: the config alone applies
        with open(path, "w") as f:
            json.dump({"version": 1, "entries": [good]}, f)
        assert list(Registrations.load(NAME).entries) == [("web", "10.0.1.11", 9000)]
    finally:
        for leftover in (path, path + ".bad"):
            if os.path.exists(leftover):
                os.unlink(leftover)


# --- with a real daemon ---------------------------------------------------------------


def lb(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", *args, "-c", daemon.config_path],
                          capture_output=True, text=True, timeout=60)


def listed(daemon: RunningDaemon) -> dict[str, dict[str, Any]]:
    """`lb targets GROUP --json`, by address."""
    out = lb(daemon, "targets", GROUP, "--json")
    assert out.returncode == 0, out.stderr
    return {row["target"]["address"]: row for row in json.loads(out.stdout)["targets"]}


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, lab_config(lab, NAME, echo_targets=2, deregistration_delay=300))
    try:
        running.start()
        yield running
    finally:
        running.cleanup()
        Registrations.remove(NAME)


def restart(daemon: RunningDaemon) -> None:
    assert daemon.stop() == 0
    daemon.start()


@pytest.mark.root
def test_deregistered_target_stays_draining_through_reload_and_out_after_restart(daemon: RunningDaemon,
                                                                                lab: Lab) -> None:
    original = Path(daemon.config_path).read_text()
    out = lb(daemon, "targets", "deregister", GROUP, "10.0.1.11")
    assert out.returncode == 0, out.stderr
    assert "deregistering 10.0.1.11:9000 in echo-tcp" in out.stdout
    assert daemon.targets(GROUP)["10.0.1.11"]["state"] == "draining"

    out = lb(daemon, "reload")  # on main, a reload undid it: the target came back as initial
    assert out.returncode == 0, out.stderr
    assert daemon.targets(GROUP)["10.0.1.11"]["state"] == "draining"
    row = listed(daemon)["10.0.1.11"]
    assert row["registration"]["action"] == "deregister" and row["state"] == "draining"

    restart(daemon)  # within its deregistration delay (300 s): it drains on, for what is left of it
    row = listed(daemon)["10.0.1.11"]
    assert (row["state"], row["reason"], row["registration"]["action"]) == (
        "draining", "Target.DeregistrationInProgress", "deregister")
    text = lb(daemon, "targets", GROUP).stdout
    assert "deregistered" in text.splitlines()[1] + text.splitlines()[2]

    # The config changes that target (a weight): the config wins, and `lb reload` says so.
    try:
        daemon.write_config(original.replace('{ id = "10.0.1.11" }', '{ id = "10.0.1.11", weight = 2 }'))
        out = lb(daemon, "reload")
        assert out.returncode == 0, out.stderr
        assert "runtime deregister of 10.0.1.11:9000 in echo-tcp dropped" in out.stdout + out.stderr
        row = listed(daemon)["10.0.1.11"]
        assert row["registration"] is None and row["state"] in ("initial", "healthy") and row["weight"] == 2
        assert not os.path.exists(registrations_path(NAME))
    finally:
        daemon.write_config(original)
        lb(daemon, "reload")


@pytest.mark.root
def test_registered_target_survives_reload_and_restart_until_deregistered(daemon: RunningDaemon) -> None:
    out = lb(daemon, "targets", "register", GROUP, "10.0.1.13:9000", "--weight", "3")
    assert out.returncode == 0, out.stderr
    assert "registered 10.0.1.13:9000 in echo-tcp (weight 3)" in out.stdout
    assert daemon.targets(GROUP)["10.0.1.13"]["state"] in ("initial", "healthy")  # its first check may be done
    assert lb(daemon, "reload").returncode == 0  # on main, a reload drained it: the config does not list it
    assert daemon.targets(GROUP)["10.0.1.13"]["state"] in ("initial", "healthy")
    restart(daemon)
    row = listed(daemon)["10.0.1.13"]
    assert row["state"] in ("initial", "healthy") and row["weight"] == 3
    assert row["registration"]["action"] == "register"

    out = lb(daemon, "targets", "deregister", GROUP, "10.0.1.13")
    assert out.returncode == 0, out.stderr
    assert daemon.targets(GROUP)["10.0.1.13"]["state"] == "draining"
    assert not os.path.exists(registrations_path(NAME))  # nothing left to hold over the config


@pytest.mark.root
def test_register_errors_are_one_line_each(daemon: RunningDaemon) -> None:
    out = lb(daemon, "targets", "register", "nope", "10.0.1.13")
    assert out.returncode == 1 and "register.group: 'nope' is not a defined target group" in out.stderr
    assert "Traceback" not in out.stderr
    out = lb(daemon, "targets", "register", GROUP, "10.0.1.13:99999")  # the command line: exit 2
    assert out.returncode == 2 and "port must be 1..65535" in out.stderr and "Traceback" not in out.stderr
    out = lb(daemon, "targets", "deregister", GROUP, "10.0.9.9")
    assert out.returncode == 1 and "10.0.9.9:9000 is not registered" in out.stderr
