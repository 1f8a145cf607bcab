"""The controller's desired state: who is in the ring and the L7 table, and slow start."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from lb import config as configmod
from lb.controller import L4_WEIGHT_SCALE, RAMP_STEP_SECONDS, Controller, desired_l4, desired_l7, group_views
from lb.dataplane.dataplane import L4Service
from lb.dataplane.maps import Endpoint
from lb.l7.balancer import RoundRobin, make_balancer
from lb.model import Algorithm, LoadBalancer, Target, TargetHealth, TargetState

CONFIG = """
[load_balancer]
name = "c"
[[listeners]]
name = "tcp"
protocol = "TCP"
address = "10.0.0.100"
port = 9000
default_action = { type = "forward", target_group = "tcp" }
[[listeners]]
name = "web"
protocol = "HTTP"
address = "10.0.0.100"
port = 80
default_action = { type = "forward", target_group = "web" }
[[target_groups]]
name = "tcp"
protocol = "TCP"
port = 9000
targets = [{ id = "10.0.1.11" }, { id = "10.0.1.12", weight = 2 }, { id = "10.0.1.13" }]
[[target_groups]]
name = "web"
protocol = "HTTP"
port = 80
targets = [{ id = "10.0.1.11" }, { id = "10.0.1.12" }, { id = "10.0.1.13" }]
"""


class FakeHealth:
    """A HealthView with fixed answers: per group, who is live/draining/unhealthy
    (the rest: initial) and since when healthy."""

    def __init__(self, config: LoadBalancer, live: dict[str, list[int]], draining: dict[str, list[int]] | None = None,
                 since: dict[str, float] | None = None, unhealthy: dict[str, list[int]] | None = None) -> None:
        self.groups = {g.name: g.targets for g in config.target_groups}
        self.live, self.drain, self.since = live, draining or {}, since or {}
        self.sick = unhealthy or {}

    def target_health(self, group: str, target: Target) -> TargetHealth:
        index = self.groups[group].index(target)
        for state, table in ((TargetState.UNHEALTHY, self.sick), (TargetState.DRAINING, self.drain),
                             (TargetState.HEALTHY, self.live)):
            if index in table.get(group, []):
                return TargetHealth(state)
        return TargetHealth(TargetState.INITIAL)

    def in_service(self, group: str) -> tuple[Target, ...]:
        return tuple(self.groups[group][i] for i in self.live.get(group, []))

    def draining(self, group: str) -> tuple[Target, ...]:
        return tuple(self.groups[group][i] for i in self.drain.get(group, []))

    def registered(self, group: str) -> tuple[Target, ...]:
        return self.groups[group]

    def healthy_since(self, group: str, target: Target) -> float | None:
        return self.since.get(str(target.address), 0.0) if target in self.in_service(group) else None


@pytest.fixture()
def config() -> Iterator[LoadBalancer]:
    yield configmod.loads(CONFIG)


def members(config: LoadBalancer, health: FakeHealth, now: float = 1000.0) -> dict[str, int]:
    service = desired_l4(config, group_views(config, health, now))[0]
    return {str(e.address): w for e, w in service.members}


def test_unhealthy_and_draining_targets_leave_the_ring_but_stay_reachable(config: LoadBalancer) -> None:
    health = FakeHealth(config, live={"tcp": [0], "web": [0, 1]}, draining={"tcp": [1]})
    service = desired_l4(config, group_views(config, health))[0]
    assert [str(e.address) for e, _ in service.members] == ["10.0.1.11"]
    assert sorted(str(e.address) for e in service.draining) == ["10.0.1.12", "10.0.1.13"]  # draining + unhealthy
    table = desired_l7(config, group_views(config, health), version=7)
    web = table.group("web")
    assert web is not None and [a for a, _, _ in web.in_service] == ["10.0.1.11", "10.0.1.12"]
    assert table.version == 7 and not web.ramp


def l4_service(config: LoadBalancer, health: FakeHealth) -> L4Service:
    return desired_l4(config, group_views(config, health))[0]


def addresses(endpoints: tuple[Endpoint, ...]) -> list[str]:
    return sorted(str(e.address) for e in endpoints)


def test_an_unhealthy_target_is_terminated_by_default(config: LoadBalancer) -> None:
    """NLB: target_health_state.unhealthy.connection_termination.enabled is on
    by default: an unhealthy target's flows end; an initial one keeps its own."""
    health = FakeHealth(config, live={"tcp": [0]}, unhealthy={"tcp": [1]})
    service = l4_service(config, health)
    assert addresses(service.terminated) == ["10.0.1.12"]
    assert addresses(service.draining) == ["10.0.1.13"]  # initial: out of service, not terminated
    assert [str(e.address) for e, _ in service.members] == ["10.0.1.11"]
    assert service.end_flows_on_removal is False  # deregistration_delay.connection_termination: off


def test_connection_termination_follows_the_group(config: LoadBalancer) -> None:
    groups = tuple(replace(g, unhealthy_connection_termination=False, deregistration_connection_termination=True)
                   for g in config.target_groups)
    config = replace(config, target_groups=groups)
    service = l4_service(config, FakeHealth(config, live={"tcp": [0]}, unhealthy={"tcp": [1]}, draining={"tcp": [2]}))
    assert service.terminated == ()
    assert addresses(service.draining) == ["10.0.1.12", "10.0.1.13"]  # unhealthy and draining flows go on
    assert service.end_flows_on_removal is True


def test_fail_open_terminates_nobody(config: LoadBalancer) -> None:
    """Every target unhealthy: lb.health puts them all in service (fail open)."""
    health = FakeHealth(config, live={"tcp": [0, 1, 2]}, unhealthy={"tcp": [0, 1, 2]})
    service = l4_service(config, health)
    assert service.terminated == () and len(service.members) == 3


def test_no_slow_start_means_plain_weights(config: LoadBalancer) -> None:
    health = FakeHealth(config, live={"tcp": [0, 1, 2]}, since={"10.0.1.13": 999.0})
    assert members(config, health) == {"10.0.1.11": 1, "10.0.1.12": 2, "10.0.1.13": 1}


def with_slow_start(config: LoadBalancer, seconds: int = 100) -> LoadBalancer:
    groups = tuple(replace(g, slow_start=seconds) for g in config.target_groups)
    return replace(config, target_groups=groups)


def test_a_newly_healthy_target_ramps_linearly(config: LoadBalancer) -> None:
    config = with_slow_start(config)
    health = FakeHealth(config, live={"tcp": [0, 1, 2], "web": [0, 1, 2]}, since={"10.0.1.13": 975.0})
    assert members(config, health, now=1000.0) == {
        "10.0.1.11": L4_WEIGHT_SCALE, "10.0.1.12": 2 * L4_WEIGHT_SCALE, "10.0.1.13": 25}  # 25 s of 100
    assert members(config, health, now=1050.0)["10.0.1.13"] == 75
    assert members(config, health, now=1075.0) == {"10.0.1.11": 1, "10.0.1.12": 2, "10.0.1.13": 1}  # over
    web = desired_l7(config, group_views(config, health, 1000.0), 1).group("web")
    assert web is not None and web.ramp == (("10.0.1.13", 80, 0.25),)


def test_slow_start_needs_someone_to_spare_the_target(config: LoadBalancer) -> None:
    config = with_slow_start(config)
    alone = FakeHealth(config, live={"tcp": [2]}, since={"10.0.1.13": 990.0})
    assert members(config, alone) == {"10.0.1.13": 1}
    together = FakeHealth(config, live={"tcp": [0, 1, 2]},
                          since={"10.0.1.11": 990.0, "10.0.1.12": 990.0, "10.0.1.13": 990.0})
    assert members(config, together) == {"10.0.1.11": 1, "10.0.1.12": 2, "10.0.1.13": 1}


class Recorder:
    def __init__(self) -> None:
        self.tables: list[object] = []

    def update(self, table: object) -> None:
        self.tables.append(table)


def test_reconcile_asks_to_run_again_while_a_target_ramps(config: LoadBalancer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import lb.controller as controller_module

    monkeypatch.setattr(controller_module.time, "monotonic", lambda: 1000.0)
    config = with_slow_start(config, 30)
    sink = Recorder()
    ramping = Controller(config, FakeHealth(config, live={"web": [0, 1]}, since={"10.0.1.12": 999.0}), None, sink)
    assert ramping.reconcile() == RAMP_STEP_SECONDS
    nearly = Controller(config, FakeHealth(config, live={"web": [0, 1]}, since={"10.0.1.12": 971.0}), None, sink)
    assert nearly.reconcile() == pytest.approx(1.0)
    settled = Controller(config, FakeHealth(config, live={"web": [0, 1]}), None, sink)
    assert settled.reconcile() is None
    assert len(sink.tables) == 3


class FakePool:
    def __init__(self, name: str) -> None:
        self.name, self.outstanding = name, 0


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_l7_balancers_give_a_ramping_target_its_share(algorithm: Algorithm) -> None:
    pools = (FakePool("a"), FakePool("b"), FakePool("c"))
    balancer = make_balancer(algorithm, pools, (1, 1, 1), (1.0, 1.0, 0.25))
    picks = [balancer.pick().name for _ in range(30000)]
    share = picks.count("c") / len(picks)
    # Picked a third of the time, kept a quarter of those: a quarter of its full share.
    assert share == pytest.approx(0.25 / 3, abs=0.015)
    assert picks.count("a") == pytest.approx(picks.count("b"), rel=0.1)
    assert isinstance(make_balancer(Algorithm.ROUND_ROBIN, pools, (1, 1, 1), (1.0, 1.0, 1.0)), RoundRobin)


@pytest.mark.root
def test_reconcile_ends_an_unhealthy_targets_flows_in_the_kernel(config: LoadBalancer) -> None:
    """Controller + Dataplane + the real program: flags, entries, and where
    the next packets go when a target turns unhealthy, then healthy again."""
    from scapy.compat import raw
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether

    from lb.dataplane.structs import Counter
    from tests.xdp_fixture import MAC, TARGET_IF, packet_lab

    def frame(sport: int, flags: str) -> bytes:
        return raw(Ether(src=MAC["client"], dst=MAC["fxa"]) / IP(src="10.0.0.2", dst="10.0.0.100", ttl=64)
                   / TCP(sport=sport, dport=9000, flags=flags, seq=1, ack=1 if "A" in flags else 0))

    def synack(target: str, sport: int) -> bytes:  # ISN 0: the client's ACK (ack 1) acknowledges it
        mac = MAC["t" + target[-1]]
        return raw(Ether(src=mac, dst=MAC["fxb"]) / IP(src=target, dst="10.0.0.2", ttl=64)
                   / TCP(sport=9000, dport=sport, flags="SA", seq=0, ack=2))

    with packet_lab() as lab:
        health = FakeHealth(config, live={"tcp": [0, 1, 2]})
        controller = Controller(config, health, lab.dataplane, None)
        controller.reconcile()
        owner: dict[int, str] = {}
        for sport in range(41200, 41230):
            owner[sport] = str(Ether(lab.run(frame(sport, "S")).data)[IP].dst)
            lab.run(synack(owner[sport], sport), TARGET_IF)
            lab.run(frame(sport, "A"))  # the handshake completes: the flow is in conntrack
        on_b = [p for p, a in owner.items() if a == "10.0.1.12"]
        assert on_b and len(on_b) < 30

        health.live, health.sick = {"tcp": [0, 2]}, {"tcp": [1]}
        controller.reconcile()
        flags = {str(t.endpoint.address): (t.active, t.in_service) for t in lab.maps.targets()}
        assert flags == {"10.0.1.11": (True, True), "10.0.1.12": (False, False), "10.0.1.13": (True, True)}
        assert {f.client.port for f in lab.maps.flows()} == set(owner) - set(on_b)
        before = lab.maps.counters()
        moved = str(Ether(lab.run(frame(on_b[0], "A")).data)[IP].dst)
        after = lab.maps.counters()
        assert moved in ("10.0.1.11", "10.0.1.13")
        assert after[Counter.MISS_NO_ENTRY] - before[Counter.MISS_NO_ENTRY] == 1
        kept = next(p for p, a in owner.items() if a == "10.0.1.11")
        assert str(Ether(lab.run(frame(kept, "A")).data)[IP].dst) == "10.0.1.11"

        health.live, health.sick = {"tcp": [0, 1, 2]}, {}
        controller.reconcile()
        flags = {str(t.endpoint.address): (t.active, t.in_service) for t in lab.maps.targets()}
        assert flags["10.0.1.12"] == (True, True)


def test_the_programs_limits_come_from_the_config(config: LoadBalancer) -> None:
    from lb.dataplane.pins import limits_for

    config = replace(config, tcp_closed_timeout=5, tcp_time_wait_timeout=60, new_flow_rate_limit=0)
    limits = limits_for(config)
    assert (limits.tcp_closed_timeout, limits.tcp_time_wait_timeout, limits.new_flow_rate_limit) == (5, 60, 0)
    assert "-DTCP_CLOSED_NS=5000000000ULL" in limits.cflags() and "-DNEW_FLOW_RATE_LIMIT=0ULL" in limits.cflags()


@pytest.mark.parametrize("attributes, mode", [("", "nat"), ("preserve_client_ip = false", "full-nat"),
                                              ("direct_server_return = true", "dsr")])
def test_the_group_gives_the_vip_its_forwarding_mode(attributes: str, mode: str) -> None:
    text = CONFIG.replace('port = 9000\ntargets = [{ id = "10.0.1.11" }',
                          f'port = 9000\n{attributes}\ntargets = [{{ id = "10.0.1.11" }}')
    config = configmod.loads(text)
    health = FakeHealth(config, live={"tcp": [0, 1, 2]})
    assert l4_service(config, health).mode == mode
