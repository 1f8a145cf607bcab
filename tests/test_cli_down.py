"""`lb down` with a config that no longer loads: an operator who broke the
file can still take lb down. It removes what `lb up` recorded in
/run/lb/<name>.json (the state file names the config it ran from), says so,
and says clearly when nothing is recorded for that file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lb import config as configmod
from lb import netlink as nl
from lb.cli import cli
from lb.dataplane.pins import pin_dir
from lb.lab import VIP, Lab
from lb.runstate import RuntimeState, lock_path, state_path
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.names import name

NAME = name("dn")

BREAKAGES = {
    "syntax": lambda text: text + "\n[load_balancer\n",  # TOML that does not parse
    "bad key": lambda text: text.replace("workers = 1", "workers = 1\nwrokers = 2"),  # parses, is refused
}


def lb_down(config: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb", "down", "-c", config], capture_output=True, text=True,
                          timeout=120)


def children(pid: int) -> list[int]:
    """The processes `pid` started (the L7 workers)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.root
@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_down_with_a_broken_config_removes_what_lb_up_recorded(lab: Lab, breakage: str) -> None:
    running = RunningDaemon(lab, NAME, lab_config(lab, NAME, echo_targets=1, http=True))
    try:
        running.start()
        assert running.proc is not None
        processes = [running.proc.pid, *children(running.proc.pid)]
        assert len(processes) >= 2  # lb up and its L7 worker
        assert os.path.isdir(pin_dir(NAME))
        with nl.iproute(lab.lb_ns) as ipr:
            assert nl.find_address(ipr, VIP) is not None
            assert all(nl.xdp_info(ipr, i)[1] is not None for i in lab.lb_interfaces)

        running.write_config(BREAKAGES[breakage](Path(running.config_path).read_text()))
        # Still running: refused for that reason, not for the file's.
        out = lb_down(running.config_path)
        assert out.returncode == 1 and "is still running" in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert os.path.isdir(pin_dir(NAME))

        running.stop()  # SIGTERM, as `systemctl stop lb`: XDP, maps and the VIP stay
        out = lb_down(running.config_path)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr
        assert f"warning: {running.config_path} does not load" in out.stderr
        assert f"recorded in {state_path(NAME)}" in out.stderr
        assert "detached from: " in out.stdout and "pinned maps: removed" in out.stdout
        assert f"addresses removed: {VIP}" in out.stdout

        assert not os.path.exists(pin_dir(NAME))
        with nl.iproute(lab.lb_ns) as ipr:
            assert nl.find_address(ipr, VIP) is None
            assert all(nl.xdp_info(ipr, i) == (None, None) for i in lab.lb_interfaces)
        assert not [pid for pid in processes if alive(pid)]
        for path in (state_path(NAME), lock_path(NAME), running.socket):
            assert not os.path.exists(path), path

        # Twice is fine: nothing recorded any more, and it says so.
        out = lb_down(running.config_path)
        assert out.returncode == 2 and "nothing recorded" in out.stderr, out.stderr
    finally:
        running.cleanup()


@pytest.mark.root
def test_down_with_a_broken_config_and_nothing_recorded_says_so(tmp_path: Path) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(f'[load_balancer]\nname = "{name("nothing")}"\nwrokers = 2\n')
    result = CliRunner().invoke(cli, ["down", "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert "wrokers" in result.output  # the file's problems first
    assert f"nothing recorded for {config}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.root
def test_down_from_the_state_file_takes_the_bgp_fragment_out(tmp_path: Path) -> None:
    """The state file records where [load_balancer.bgp] put lb's BIRD
    fragment: lb down removes it with the config broken, and says that BIRD
    (absent here) did not re-read its config."""
    lb_name = name("dn-bgp")
    fragment = tmp_path / f"lb-{lb_name}.conf"
    config = tmp_path / "lb.toml"
    config.write_text(f'[load_balancer]\nname = "{lb_name}"\n\n[load_balancer.bgp]\nrouter_id = "10.0.10.2"\n'
                      f'local_as = 65001\nneighbors = [{{ address = "10.0.10.1", as = 65000 }}]\n'
                      f'bird_config = "{fragment}"\nbird_socket = "{tmp_path}/bird.ctl"\n\n'
                      f'[[listeners]]\nname = "web"\nprotocol = "HTTP"\naddress = "{VIP}"\nport = 80\n'
                      f'default_action = {{ type = "fixed-response", status_code = 200 }}\n')
    state = RuntimeState(lb_name, 0, str(config), 0.0, None, pin_dir(lb_name))
    state.record_bgp(configmod.load(str(config)))  # as lb up does
    assert (state.bgp_fragment, state.bird_socket) == (str(fragment), f"{tmp_path}/bird.ctl")
    fragment.write_text("# lb's sessions and routes\n")
    state.save()
    try:
        config.write_text(config.read_text().replace("local_as", "locl_as"))
        result = CliRunner().invoke(cli, ["down", "-c", str(config)])
        assert result.exit_code == 0, result.output
        assert f"recorded in {state_path(lb_name)}" in result.output
        assert not fragment.exists()
        assert f"BGP: load_balancer.bgp: removed {fragment}, but BIRD did not re-read its config" in result.output
        assert not os.path.exists(state_path(lb_name))
    finally:
        RuntimeState.remove(lb_name)
