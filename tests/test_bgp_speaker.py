"""lb.bgp against a real BIRD 2: the fragment it parses, the control socket,
announce / withdraw / remove, and the clear errors when BIRD cannot carry
lb's routes (nothing left behind).

Each BIRD runs in a namespace of its own with only a loopback, so the BGP
sessions it is given never send a packet anywhere.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import pytest

from lb import config as configmod
from lb import netlink as nl
from lb.bgp import bird, fragment, speaker
from lb.labbird import LabBird
from lb.model import Bfd, BgpNeighbor, LoadBalancer, Target, TargetHealth, TargetState
from tests.daemon_fixture import unit_capabilities
from tests.names import PREFIX, name

pytestmark = pytest.mark.root

VIP = ipaddress.IPv4Address("10.0.0.100")
OTHER = ipaddress.IPv4Address("10.0.0.101")
VIP6 = ipaddress.IPv6Address("fd00::100")
RUN_DIR = f"/run/lb-test/{PREFIX}/bgp-speaker"


def config_for(bird_proc: LabBird, **bgp: object) -> LoadBalancer:
    text = f"""
[load_balancer]
name = "{name('spk')}"
[load_balancer.bgp]
router_id = "10.255.0.2"
local_as = 65001
neighbors = [{{ address = "10.255.9.1", as = 65000, password = "pw" }}, {{ address = "10.255.9.2", as = 65000 }}]
bird_socket = "{bird_proc.socket}"
bird_config = "{bird_proc.fragment_dir}/lb.conf"
[[listeners]]
name = "echo"
protocol = "TCP"
address = "{VIP}"
port = 9000
default_action = {{ type = "forward", target_group = "echo" }}
[[listeners]]
name = "web"
protocol = "HTTP"
address = "{OTHER}"
port = 80
default_action = {{ type = "fixed-response", status_code = 200 }}
[[target_groups]]
name = "echo"
protocol = "TCP"
port = 9000
targets = [{{ id = "10.0.1.11" }}]
"""
    lb = configmod.loads(text)
    assert lb.bgp is not None
    return replace(lb, bgp=replace(lb.bgp, **bgp)) if bgp else lb


@pytest.fixture
def bird_proc() -> Iterator[LabBird]:
    ns = name("bgp-spk")
    if nl.netns_exists(ns):
        nl.remove_netns(ns)
    nl.create_netns(ns)
    proc = LabBird(RUN_DIR, "host", ns)
    try:
        with nl.iproute(ns) as ipr:
            nl.set_up(ipr, "lo")
        proc.start(f"router id 10.255.0.1;\nprotocol device {{ }}\n{proc.include_line()}\n")
        yield proc
    finally:
        proc.stop()
        nl.remove_netns(ns)
        shutil.rmtree(RUN_DIR, ignore_errors=True)


def test_every_fragment_option_is_valid_bird(tmp_path: os.PathLike[str]) -> None:
    """bird -p parses the main config with the fragment included: passwords,
    BFD, standard and large communities, several neighbours, no VIP at all;
    IPv6 VIPs over an IPv6 session, over an IPv4 one (BIRD's next hop or the
    config's), and IPv6 alone."""
    lb = config_for(LabBird(str(tmp_path), "x", "-"))
    assert lb.bgp is not None
    v4, v6 = BgpNeighbor(ipaddress.IPv4Address("10.9.9.9"), 65000), BgpNeighbor(ipaddress.IPv6Address("fd00:9::9"), 1)
    dual = replace(lb.bgp, announce=(VIP, OTHER, VIP6), communities=((65001, 100), (4200000000, 1, 2)),
                   bfd=Bfd(True, 50, 4))
    variants = [
        lb.bgp,
        replace(lb.bgp, bfd=Bfd(True, 50, 4), communities=((65001, 100), (4200000000, 1, 2)), hold_time=3),
        replace(lb.bgp, neighbors=(BgpNeighbor(ipaddress.IPv4Address("10.9.9.9"), 4200000000, "a#b!c"),)),
        dual,
        replace(dual, neighbors=(v6, replace(v4, address=ipaddress.IPv4Address("10.9.9.8"), ipv6_next_hop=ipaddress.IPv6Address("fd00:9::2")), v4)),
        replace(dual, announce=(VIP6,), neighbors=(replace(v6, password="pw"),)),
    ]
    for index, bgp in enumerate(variants):
        for announced in ((), (VIP, OTHER), (VIP, OTHER, VIP6)):
            if VIP6 in announced and VIP6 not in bgp.announce:
                continue
            frag = os.path.join(tmp_path, f"f{index}.conf")
            text = fragment.render(bgp, "a-b", announced)
            assert ("route fd00::100/128 blackhole;" in text) == (VIP6 in announced)
            with open(frag, "w") as f:
                f.write(text)
            main = os.path.join(tmp_path, "main.conf")
            with open(main, "w") as f:
                f.write(f'router id 1.1.1.1;\nprotocol device {{ }}\ninclude "{frag}";\n')
            result = subprocess.run(["bird", "-p", "-c", main], capture_output=True, text=True)
            assert result.returncode == 0, (result.stderr, open(frag).read())


def test_announce_withdraw_and_remove(bird_proc: LabBird) -> None:
    lb = config_for(bird_proc)
    assert lb.bgp is not None and lb.bgp.announce == (VIP, OTHER)
    s = speaker.Speaker(lb)
    s.start()
    table = fragment.table_name(lb.name)
    assert bird.routes(bird_proc.socket, table) == []  # sessions set up, nothing announced yet
    sessions = s.status()["sessions"]
    assert [x["neighbor"] for x in sessions] == ["10.255.9.1", "10.255.9.2"]
    assert all(x["state"] in ("start", "up") for x in sessions), sessions
    assert os.stat(s.path).st_mode & 0o777 == 0o640  # it holds a password: BIRD's group only

    s.update({VIP})
    assert bird.routes(bird_proc.socket, table) == ["10.0.0.100/32"]
    s.update({VIP, OTHER})
    assert sorted(bird.routes(bird_proc.socket, table)) == ["10.0.0.100/32", "10.0.0.101/32"]
    status = s.withdraw()
    assert status["announced"] == [] and status["in_rotation"] is False
    s.update({VIP})  # a health change while withdrawn announces nothing
    assert bird.routes(bird_proc.socket, table) == []
    assert s.announce()["announced"] == ["10.0.0.100/32"]

    assert speaker.remove(lb.bgp, lb.name) is True  # lb down
    assert bird.protocols(bird_proc.socket, f"{fragment.symbol_prefix(lb.name)}*") == []
    assert speaker.remove(lb.bgp, lb.name) is False  # twice is fine


def test_bird_gone_and_back(bird_proc: LabBird) -> None:
    """BIRD restarted under a running lb: the speaker says so once, retries,
    and tells the new BIRD what it announces."""
    lb = config_for(bird_proc)
    s = speaker.Speaker(lb)
    s.start()
    s.update({VIP})
    bird_proc.stop()
    s.update(set())
    assert s.dirty and not s.sync()
    bird_proc.start(f"router id 10.255.0.1;\nprotocol device {{ }}\n{bird_proc.include_line()}\n")
    assert s.sync() and not s.dirty
    assert bird.routes(bird_proc.socket, fragment.table_name(lb.name)) == []
    s.update({VIP})
    assert bird.routes(bird_proc.socket, fragment.table_name(lb.name)) == ["10.0.0.100/32"]


def test_no_bird_is_a_clear_error_and_leaves_nothing(tmp_path: os.PathLike[str]) -> None:
    ghost = LabBird(str(tmp_path), "ghost", "-")
    lb = config_for(ghost)
    with pytest.raises(speaker.SpeakerError, match="does not exist: is BIRD running"):
        speaker.Speaker(lb).start()
    assert os.listdir(ghost.fragment_dir if os.path.isdir(ghost.fragment_dir) else tmp_path) == []


def test_bird_that_does_not_include_the_fragment(bird_proc: LabBird, tmp_path: os.PathLike[str]) -> None:
    lb = config_for(bird_proc, bird_config=os.path.join(tmp_path, "elsewhere", "lb.conf"))
    with pytest.raises(speaker.SpeakerError, match=r'does not read .*elsewhere/lb.conf: add include ".*/elsewhere/\*.conf";'):
        speaker.Speaker(lb).start()
    assert not os.path.exists(os.path.join(tmp_path, "elsewhere", "lb.conf"))


class Health:
    """A fixed health view: group → [(target, state)]."""

    def __init__(self, states: dict[str, list[TargetState]]) -> None:
        self.records = {g: [(Target(ipaddress.ip_address(f"10.0.1.{i + 1}")), s) for i, s in enumerate(v)]
                        for g, v in states.items()}

    def registered(self, group: str) -> tuple[Target, ...]:
        return tuple(t for t, _ in self.records.get(group, []))

    def in_service(self, group: str) -> tuple[Target, ...]:  # fail open, as lb.health
        live = tuple(t for t, s in self.records.get(group, []) if s is TargetState.HEALTHY)
        return live or self.registered(group)

    def target_health(self, group: str, target: Target) -> TargetHealth:
        return TargetHealth(dict(self.records[group])[target])


def test_what_is_served() -> None:
    lb = config_for(LabBird("/nonexistent", "x", "-"))
    H, U = TargetState.HEALTHY, TargetState.UNHEALTHY  # noqa: N806
    # The fixed-response listener needs no target; the echo one a healthy target.
    assert speaker.served(lb, Health({"echo": [U, H]}), True, True) == {VIP, OTHER}
    assert speaker.served(lb, Health({"echo": [U, U]}), True, True) == {OTHER}
    # Not ready: the XDP program not attached, the L7 workers not listening.
    assert speaker.served(lb, Health({"echo": [H]}), False, True) == {OTHER}
    assert speaker.served(lb, Health({"echo": [H]}), True, False) == {VIP}
    # withdraw_when_unhealthy = false: fail open announces an all-unhealthy group.
    assert lb.bgp is not None
    lenient = replace(lb, bgp=replace(lb.bgp, withdraw_when_unhealthy=False))
    assert speaker.served(lenient, Health({"echo": [U, U]}), True, True) == {VIP, OTHER}
    assert speaker.served(lenient, Health({"echo": []}), True, True) == {OTHER}


def test_under_the_units_restrictions() -> None:
    """As deploy/lb.service runs lb (its capability bounding set, no
    CAP_DAC_OVERRIDE, group bird) against BIRD as Debian runs it (user bird, a
    bird:bird 0775 run directory): lb reaches the socket and BIRD reads the
    fragment. Without the group: a clear 'permission denied'."""
    bird_gid = grp.getgrnam("bird").gr_gid
    run_dir = f"/run/lb-test/{PREFIX}/bgp-unit"  # not under /tmp/pytest-of-root (0700): BIRD runs as user bird
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir, 0o775)
    os.chmod(run_dir, 0o775)
    os.chown(run_dir, int(subprocess.check_output(["id", "-u", "bird"])), bird_gid)
    ns = name("bgp-unit")
    if nl.netns_exists(ns):
        nl.remove_netns(ns)
    nl.create_netns(ns)
    proc = LabBird(run_dir, "bird", ns)
    try:
        main = os.path.join(run_dir, "bird.bird.conf")
        with open(main, "w") as f:
            f.write(f'router id 10.255.0.1;\nprotocol device {{ }}\ninclude "{run_dir}/lb-*.conf";\n')
        os.chmod(main, 0o644)
        subprocess.run(["ip", "netns", "exec", ns, "bird", "-u", "bird", "-g", "bird", "-c", main,
                        "-s", proc.socket, "-P", proc.pid_path], check=True)
        text = config_for(proc, bird_config=os.path.join(run_dir, "lb-spk.conf"))
        code = ("from lb.bgp import speaker; import pickle, sys; lb = pickle.load(sys.stdin.buffer); "
                "s = speaker.Speaker(lb); s.start(); s.update(set(lb.bgp.announce)); "
                "print(','.join(sorted(s.status()['announced']))); speaker.remove(lb.bgp, lb.name)")
        caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in unit_capabilities())
        confined = ["setpriv", f"--bounding-set=-all,{caps}"]
        for groups, expect in (([f"--groups={bird_gid}"], "10.0.0.100/32,10.0.0.101/32"), (["--clear-groups"], None)):
            result = subprocess.run([*confined, *groups, "--", sys.executable, "-c", code], input=pickle.dumps(text),
                                    capture_output=True, cwd=os.path.dirname(os.path.dirname(__file__)))
            if expect is not None:
                assert result.returncode == 0, result.stderr.decode()
                assert result.stdout.decode().strip() == expect
            else:
                assert result.returncode != 0
                assert "bird.ctl: permission denied" in result.stderr.decode()
    finally:
        proc.stop()
        nl.remove_netns(ns)
        shutil.rmtree(run_dir, ignore_errors=True)


def test_reload_to_another_fragment_path_leaves_nothing_behind(bird_proc: LabBird) -> None:
    lb = config_for(bird_proc)
    assert lb.bgp is not None
    s = speaker.Speaker(lb)
    s.start()
    s.update({VIP})
    old = s.path
    s.set_config(replace(lb, bgp=replace(lb.bgp, bird_config=f"{bird_proc.fragment_dir}/other.conf")))
    assert not os.path.exists(old)
    assert s.sync()
    assert os.path.exists(f"{bird_proc.fragment_dir}/other.conf")
    assert bird.routes(bird_proc.socket, fragment.table_name(lb.name)) == ["10.0.0.100/32"]


def test_an_operators_withdrawal_outlives_a_restart(bird_proc: LabBird, tmp_path: os.PathLike[str]) -> None:
    """`lb bgp withdraw`, then the daemon restarts (systemctl restart, a crash):
    the new speaker stays out of rotation until `lb bgp announce`."""
    lb = config_for(bird_proc)
    table = fragment.table_name(lb.name)
    held = os.path.join(tmp_path, "withdrawn")
    first = speaker.Speaker(lb, held)
    first.start()
    first.update({VIP})
    assert bird.routes(bird_proc.socket, table) == ["10.0.0.100/32"]
    withdrawn_at = first.withdraw()["withdrawn_at"]

    second = speaker.Speaker(lb, held)  # the restarted daemon's
    second.start()
    second.update({VIP})
    assert bird.routes(bird_proc.socket, table) == []
    assert second.status()["in_rotation"] is False and second.withdrawn_at == withdrawn_at
    second.announce()
    assert bird.routes(bird_proc.socket, table) == ["10.0.0.100/32"] and not os.path.exists(held)
    assert speaker.Speaker(lb, held).withdrawn_at is None
    assert lb.bgp is not None and speaker.remove(lb.bgp, lb.name) is True
