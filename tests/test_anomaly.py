"""lb.health.anomaly (passive health, ALB's anomaly mitigation): the
detector's judgement, pure; then a real daemon weighting down a target that
fails requests while passing its checks, and letting it back once it
recovers; with 1 s health checks and their progress in `lb targets`."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from lb import lab as labmod
from lb import model as m
from lb.cli import cli
from lb.controller import GroupView, desired_l7
from lb.health.anomaly import MITIGATED_SHARE, AnomalyDetector, PassiveHealth, Settings, totals
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests import labclient
from tests.daemon_fixture import CHECKS, RunningDaemon, lab_config
from tests.names import name

NAME = name("an")
METRICS_PORT = 9473  # distinct from the other test daemons in the lab's lb namespace
FAST = "interval = 1, timeout = 1, healthy_threshold = 4, unhealthy_threshold = 2"
A, B, C = "10.0.1.11:80", "10.0.1.12:80", "10.0.1.13:80"


# --- the detector, pure -----------------------------------------------------------------


def feed(detector: AnomalyDetector, now: float, cumulative: dict[str, tuple[int, int]]) -> list[str]:
    return detector.observe(now, {("web", t): counts for t, counts in cumulative.items()})


def test_a_target_failing_far_more_than_its_peers_is_mitigated_then_recovers() -> None:
    d = AnomalyDetector(Settings(window=10, min_requests=20, min_failure_rate=0.2, factor=4))
    feed(d, 0, {A: (0, 0), B: (0, 0), C: (0, 0)})
    assert feed(d, 1, {A: (10, 0), B: (10, 5), C: (10, 0)}) == []  # 10 requests: not judged yet
    [line] = feed(d, 2, {A: (20, 0), B: (20, 10), C: (20, 1)})
    assert "web 10.0.1.12:80: failing 50% of requests, peers 2%: mitigated" in line
    assert d.mitigated("web") == {B} and d.verdicts[("web", B)].mitigated
    # Still failing: stays. Then good answers only; it recovers once the bad ones leave the window.
    assert feed(d, 5, {A: (40, 0), B: (21, 11), C: (40, 1)}) == [] and d.mitigated("web") == {B}
    assert feed(d, 11, {A: (60, 0), B: (23, 11), C: (60, 1)}) == []  # the window still holds failures
    [line] = feed(d, 16, {A: (80, 0), B: (25, 11), C: (80, 1)})
    assert line == "web 10.0.1.12:80: recovered, mitigation ends" and d.mitigated("web") == frozenset()


@pytest.mark.parametrize("failing", [(A, B, C), (A, B)], ids=["all", "more-than-half"])
def test_never_below_fail_open(failing: tuple[str, ...]) -> None:
    d = AnomalyDetector(Settings(window=10, min_requests=5))
    feed(d, 0, {A: (0, 0), B: (0, 0), C: (0, 0)})
    assert feed(d, 1, {t: (50, 40 if t in failing else 0) for t in (A, B, C)}) == []
    assert d.mitigated("web") == frozenset()


def test_a_lone_target_and_a_quiet_one_are_never_judged() -> None:
    d = AnomalyDetector(Settings(window=10, min_requests=5))
    feed(d, 0, {A: (0, 0)})
    assert feed(d, 1, {A: (100, 100)}) == []  # no peers to compare with
    assert feed(d, 2, {A: (100, 100), B: (3, 3)}) == []  # B: too few requests


def test_totals_count_5xx_per_target_from_the_workers_rows() -> None:
    rows = [{"requests": [("web", None, "web", A, 200, False, 7), ("web", None, "web", A, 502, True, 2),
                          ("web", None, "web", B, 503, False, 1), ("web", None, "-", "-", 503, True, 9)]},
            {"requests": [("web", 3, "web", A, 500, False, 1)]}]
    assert totals(rows) == {("web", A): (10, 3), ("web", B): (1, 1)}


def test_a_mitigated_target_takes_a_sliver_of_its_share() -> None:
    group = m.TargetGroup("web", m.Protocol.HTTP, 80, anomaly_mitigation=True)
    targets = tuple(m.Target(ipaddress.ip_address(a.split(":")[0])) for a in (A, B, C))
    lb = m.LoadBalancer(name=NAME, target_groups=(group,))
    table = desired_l7(lb, {"web": GroupView(group, targets, (), ())}, 1, lambda g: frozenset({B}))
    assert table.groups[0].ramp == (("10.0.1.12", 80, MITIGATED_SHARE),)


def test_passive_health_asks_the_workers_only_while_a_group_has_it_on() -> None:
    asked: list[int] = []
    groups: set[str] = set()
    cumulative = {"n": 0}
    changes: list[int] = []

    async def stats() -> list[dict[str, Any]]:
        asked.append(1)
        cumulative["n"] += 10
        n = cumulative["n"]
        return [{"requests": [("web", None, "web", A, 200, False, n), ("web", None, "web", B, 500, False, n),
                              ("web", None, "web", C, 200, False, n)]}]

    async def main() -> None:
        passive = PassiveHealth(stats, lambda: frozenset(groups), lambda: changes.append(1),
                                settings=Settings(window=10, min_requests=5), every=0.01)
        task = asyncio.create_task(passive.run())
        try:
            await asyncio.sleep(0.1)
            assert asked == [] and passive.mitigated("web") == frozenset()  # off: the workers are not asked
            groups.add("web")  # a reload turns it on: the first look is the baseline, the next ones judge
            for _ in range(200):
                if passive.mitigated("web"):
                    break
                await asyncio.sleep(0.01)
            assert passive.mitigated("web") == {B} and changes == [1]
            verdict = passive.verdict("web", B)
            assert verdict is not None and verdict.mitigated
            groups.clear()  # and off again: the mitigation ends at once
            await asyncio.sleep(0.1)
            assert passive.mitigated("web") == frozenset() and changes == [1, 1]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())


# --- a real daemon ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    text = lab_config(lab, NAME, echo_targets=3, http=True).replace(CHECKS, FAST)
    text = text.replace("workers = 1\n", f'workers = 1\nmetrics_address = "127.0.0.1:{METRICS_PORT}"\n', 1)
    running = RunningDaemon(lab, NAME, text + "anomaly_mitigation = true\n")  # the last group: web
    try:
        running.start()
        for backend in lab.backends:
            running.wait_for("web", backend.address, "healthy", timeout=10)
        yield running
    finally:
        running.cleanup()


def cli_targets(daemon: RunningDaemon, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["targets", *args, "-c", daemon.config_path])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout) if "--json" in args else result.stdout


def requests(lab: Lab, path: str, count: int) -> Counter[str]:
    """`count` requests through the HTTP listener: how many each backend answered (by status)."""
    answered: Counter[str] = Counter()
    for _ in range(count):
        status, headers, _ = labclient.http_get(lab.client_ns, labmod.VIP, labmod.HTTP_PORT, path, timeout=5)
        answered[f"{headers.get('x-backend')} {status}"] += 1
    return answered


def mitigated_metric(lab: Lab) -> dict[str, float]:
    text = run_in_netns(lab.lb_ns, lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).read().decode())
    return {s.labels["target"]: s.value for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == "lb_target_anomaly_mitigated"}


@pytest.mark.root
def test_a_target_failing_requests_is_weighted_down_until_it_recovers(daemon: RunningDaemon, lab: Lab) -> None:
    victim = lab.backends[1]  # 10.0.1.12: answers 500 to /status/500/backend2, passes its checks
    failing = requests(lab, f"/status/500/{victim.name}", 75)  # 25 a target: past min_requests (20)
    assert failing[f"{victim.name} 500"] >= 10, failing
    deadline = time.monotonic() + 6
    while not (daemon.targets("web")[victim.address]["anomaly"] or {}).get("mitigated"):  # None: not judged yet
        assert time.monotonic() < deadline, [(r["target"], r["anomaly"]) for r in daemon.request("targets")] + \
            [daemon.logs()]
        time.sleep(0.2)
    row = daemon.targets("web")[victim.address]
    assert row["state"] == "healthy" and row["anomaly"]["failure_rate"] >= 0.9
    assert "healthy, mitigated (100% failing, peers 0%)" in cli_targets(daemon, "web")
    assert mitigated_metric(lab) == {"10.0.1.11": 0, "10.0.1.12": 1, "10.0.1.13": 0}
    spread = requests(lab, "/", 60)
    assert spread[f"{victim.name} 200"] <= 8, spread  # about 2% of them (a third × MITIGATED_SHARE)
    # It answers well now: once the failures leave the window (10 s), it is back.
    deadline = time.monotonic() + 30
    while daemon.targets("web")[victim.address]["anomaly"]["mitigated"]:
        assert time.monotonic() < deadline, daemon.targets("web")
        requests(lab, "/", 20)
    assert mitigated_metric(lab)["10.0.1.12"] == 0
    spread = requests(lab, "/", 60)
    assert spread[f"{victim.name} 200"] >= 10, spread


@pytest.mark.root
def test_1_s_checks_and_their_progress_in_lb_targets(daemon: RunningDaemon, lab: Lab) -> None:
    victim = lab.backends[2]
    lab.stop_server(victim)
    try:
        took = daemon.wait_for("echo-tcp", victim.address, "unhealthy", timeout=6)
        assert took <= 4.5  # unhealthy_threshold 2 × interval 1 s, plus a check's worth (ELB's minimum: 10 s)
    finally:
        lab.start_server(victim)
    deadline = time.monotonic() + 6
    seen: set[str] = set()
    while len(seen) < 2:  # healthy_threshold 4: 1/4, 2/4, 3/4 passes on the way, about a second each
        assert time.monotonic() < deadline, seen
        row = next(r for r in cli_targets(daemon, "echo-tcp", "--json")["targets"]
                   if r["target"]["address"] == victim.address)
        if row["state"] == "unhealthy" and row["checks"]["passes"]:
            assert row["checks"]["healthy_threshold"] == 4
            text = cli_targets(daemon, "echo-tcp")
            seen |= {p for p in ("1/4 passes", "2/4 passes", "3/4 passes") if f"unhealthy, {p}" in text}
        time.sleep(0.05)
    daemon.wait_for("echo-tcp", victim.address, "healthy", timeout=6)
