"""L4 flows that follow TCP's life, as real `lb up` runs on the lab.

- kill -9, `lb up` again, `lb down`: the VIP address lb placed goes, an
  address the operator placed stays;
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.lab import Lab
from tests.daemon_fixture import CHECKS, RunningDaemon, forwarded, lab_config, target_list
from tests.labclient import read_line, tcp_connect
from tests.names import name

pytestmark = pytest.mark.root

OPERATOR_ADDR = "10.0.0.101"  # inside the client subnet: lb would place it on to-client


def lb_ns_addresses(lab: Lab) -> set[str]:
    with nl.iproute(lab.lb_ns) as ipr:
        return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr()}


def banner_through(lab: Lab, address: str = labmod.VIP) -> str:
    with tcp_connect(lab.client_ns, address, labmod.ECHO_PORT, timeout=3) as sock:
        return read_line(sock)


@pytest.fixture
def operator_address(lab: Lab) -> Iterator[str]:
    """An address the operator put on the lb host before lb started."""
    with nl.iproute(lab.lb_ns) as ipr:
        nl.add_address(ipr, labmod.LB_CLIENT_IF, OPERATOR_ADDR, 32)
    try:
        yield OPERATOR_ADDR
    finally:
        with nl.iproute(lab.lb_ns) as ipr:
            nl.remove_address(ipr, labmod.LB_CLIENT_IF, OPERATOR_ADDR, 32)


def test_kill_9_restart_and_down_remove_the_vip_but_not_the_operators_address(lab: Lab,
                                                                              operator_address: str) -> None:
    lb_name = name("own")
    text = lab_config(lab, lb_name) + forwarded("operator-tcp", "TCP", labmod.ECHO_PORT, target_list(lab.backends),
                                                f"{{ {CHECKS} }}", address=operator_address)
    daemon = RunningDaemon(lab, lb_name, text)
    try:
        assert labmod.VIP not in lb_ns_addresses(lab)
        daemon.start()
        assert {labmod.VIP, operator_address} <= lb_ns_addresses(lab)
        daemon.stop(signal.SIGKILL)
        daemon.start()  # finds both addresses present: one is its own
        assert banner_through(lab) and banner_through(lab, operator_address)
        assert daemon.stop() == 0
        down = subprocess.run([sys.executable, "-m", "lb", "down", "-c", daemon.config_path, "--json"],
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0, down.stderr
        assert json.loads(down.stdout)["addresses_removed"] == [labmod.VIP]
        left = lb_ns_addresses(lab)
        assert labmod.VIP not in left  # else the host answers the VIP itself, with RSTs
        assert operator_address in left
    finally:
        daemon.cleanup()
        with nl.iproute(lab.lb_ns) as ipr:  # what a failed run left: the lab is shared by the session
            nl.remove_address(ipr, labmod.LB_CLIENT_IF, labmod.VIP, 32)
