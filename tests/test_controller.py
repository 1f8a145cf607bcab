"""The controller's desired state: who is in the ring and the L7 table, and slow start."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from lb import config as configmod
from lb.controller import L4_WEIGHT_SCALE, RAMP_STEP_SECONDS, Controller, desired_l4, desired_l7, group_views
from lb.l7.balancer import RoundRobin, make_balancer
from lb.model import Algorithm, LoadBalancer, Target

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
    """A HealthView with fixed answers: per group, who is live/draining and since when healthy."""

    def __init__(self, config: LoadBalancer, live: dict[str, list[int]], draining: dict[str, list[int]] | None = None,
                 since: dict[str, float] | None = None) -> None:
        self.groups = {g.name: g.targets for g in config.target_groups}
        self.live, self.drain, self.since = live, draining or {}, since or {}

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
