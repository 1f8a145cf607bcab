"""`lb up` with a full-NAT target group: the daemon finds lb's own address
toward each target in its namespace, and `lb vips` / `lb conntrack` show the
mode and the source each flow was given."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb.lab import Lab
from tests import labclient
from tests.daemon_fixture import CHECKS, RunningDaemon, lab_config, target_list
from tests.test_inspect import lb_json
from tests.labclient import read_line
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("modes")
FULL_NAT_PORT = 9001  # the listener; the targets are the lab's echo servers on 9000


def config(lab: Lab) -> str:
    return lab_config(lab, NAME) + f"""
[[listeners]]
name = "echo-fn"
protocol = "TCP"
address = "{labmod.VIP}"
port = {FULL_NAT_PORT}
default_action = {{ type = "forward", target_group = "echo-fn" }}

[[target_groups]]
name = "echo-fn"
protocol = "TCP"
port = {labmod.ECHO_PORT}
preserve_client_ip = false
targets = {target_list(lab.backends)}
health_check = {{ {CHECKS} }}
"""


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, config(lab))
    try:
        running.start()
        for backend in lab.backends:
            running.wait_for("echo-fn", backend.address, "healthy", timeout=12)
        yield running
    finally:
        running.cleanup()


def test_a_full_nat_listener_through_the_daemon(daemon: RunningDaemon, lab: Lab) -> None:
    with labclient.tcp_connect(lab.client_ns, labmod.VIP, FULL_NAT_PORT) as sock:
        assert read_line(sock) in {b.name for b in lab.backends}
        client_port = sock.getsockname()[1]
        flows = lb_json(daemon, "conntrack", "--vip", f"{labmod.VIP}:{FULL_NAT_PORT}")["flows"]
    ours = [f for f in flows if f["client_port"] == client_port]
    assert len(ours) == 1 and ours[0]["mode"] == "full-nat"
    assert ours[0]["source"].startswith(f"{labmod.BACKEND_GATEWAY}:")  # lb's address on the target's link
    modes = {(v["vip"], v["protocol"]): v["mode"] for v in lb_json(daemon, "vips")["vips"]}
    assert modes[(f"{labmod.VIP}:{FULL_NAT_PORT}", "TCP")] == "full-nat"
    assert modes[(f"{labmod.VIP}:{labmod.ECHO_PORT}", "TCP")] == "nat"
