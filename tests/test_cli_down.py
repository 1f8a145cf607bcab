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

from lb import netlink as nl
from lb.cli import cli
from lb.dataplane.pins import pin_dir
from lb.lab import VIP, Lab
from lb.runstate import lock_path, state_path
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
