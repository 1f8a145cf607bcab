"""`lb up` checks the host first: IPv4 forwarding where TCP/UDP listeners
need it, strict rp_filter on a client-facing interface, bpffs (mounted when
absent). The rules on fake sysctls; then a real `lb up` on a lab whose lb
namespace has forwarding off, and bpffs mounted in a private mount namespace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lb import config
from lb import lab as labmod
from lb import netlink as nl
from lb.hostcheck import Sysctl, forwarding_problems, rp_filter_problems
from lb.lab import Lab
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.names import name

REPO = Path(__file__).resolve().parents[1]


def sysctls(values: dict[str, str]) -> Sysctl:
    return values.get


def test_forwarding_off_on_an_interface_is_one_line_naming_it() -> None:
    lb = config.load_default()  # TCP and UDP listeners
    read = sysctls({"net/ipv4/conf/to-client/forwarding": "0", "net/ipv4/conf/to-backend1/forwarding": "1"})
    problems = forwarding_problems(lb, ["to-client", "to-backend1"], read)
    assert problems == [
        "net.ipv4.conf.to-client.forwarding is 0: TCP/UDP flows arriving on to-client cannot be forwarded "
        "(bpf_fib_lookup answers FWD_DISABLED, the kernel drops them, new flows time out); enable IPv4 "
        "forwarding: sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d/)"]


IPV6_TCP = """
[load_balancer]
name = "six"
[[listeners]]
name = "tcp6"
protocol = "TCP"
address = "fd00::100"
port = 9000
default_action = { type = "forward", target_group = "tcp6" }
[[target_groups]]
name = "tcp6"
protocol = "TCP"
port = 9000
targets = [{ id = "fd00:1::11" }]
"""


def test_ipv6_listeners_need_ipv6_forwarding_and_ipv4_forwarding_does_not_matter_to_them() -> None:
    lb = config.loads(IPV6_TCP)
    read = sysctls({"net/ipv4/conf/to-client/forwarding": "0", "net/ipv6/conf/to-client/forwarding": "0",
                    "net/ipv6/conf/to-backend1/forwarding": "1"})
    problems = forwarding_problems(lb, ["to-client", "to-backend1"], read)
    assert problems == [
        "net.ipv6.conf.to-client.forwarding is 0: IPv6 TCP/UDP flows arriving on to-client cannot be forwarded "
        "(bpf_fib_lookup answers FWD_DISABLED, the kernel drops them, new flows time out); enable IPv6 "
        "forwarding: sysctl -w net.ipv6.conf.all.forwarding=1 (and persist it in /etc/sysctl.d/; an interface "
        "that takes its address from router advertisements then needs accept_ra = 2)"]
    both = config.loads(config.default_config_text())  # IPv4 listeners only: IPv6 forwarding does not matter
    assert forwarding_problems(both, ["to-client"], sysctls({"net/ipv6/conf/to-client/forwarding": "0"})) == []


def test_forwarding_does_not_matter_to_http_alone() -> None:
    lb = config.load_default()
    http_only = lb.__class__(**{**lb.__dict__, "listeners": tuple(x for x in lb.listeners if not x.protocol.is_l4)})
    read = sysctls({"net/ipv4/conf/eth0/forwarding": "0"})
    assert forwarding_problems(http_only, ["eth0"], read) == []


@pytest.mark.parametrize(("values", "defaults", "expected"), [
    pytest.param({"net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/eth1/rp_filter": "1"}, {"eth0"}, ["eth1"],
                 id="strict-on-the-interface"),
    pytest.param({"net/ipv4/conf/all/rp_filter": "1", "net/ipv4/conf/eth1/rp_filter": "0"}, {"eth0"}, ["eth1"],
                 id="strict-by-all"),
    pytest.param({"net/ipv4/conf/all/rp_filter": "2", "net/ipv4/conf/eth1/rp_filter": "1"}, {"eth0"}, [],
                 id="loose-wins-over-strict"),  # the larger of the two: 2
    pytest.param({"net/ipv4/conf/all/rp_filter": "1"}, set(), [], id="no-default-route"),
    pytest.param({"net/ipv4/conf/all/rp_filter": "1"}, {"eth1"}, ["eth0"], id="default-route-on-it"),  # eth0 not
])  # fmt: skip
def test_strict_rp_filter_on_a_client_facing_interface(values: dict[str, str], defaults: set[str],
                                                       expected: list[str]) -> None:
    # eth0: the uplink (default route); eth1: clients; eth2: targets (strict there is harmless)
    read = sysctls({**values, "net/ipv4/conf/eth2/rp_filter": "1"})
    problems = rp_filter_problems(["eth0", "eth1", "eth2"], {"eth2"}, defaults, read)
    assert [p.split(".")[3] for p in problems] == expected
    for problem, ifname in zip(problems, expected):
        default = defaults.pop()
        assert problem.startswith(f"net.ipv4.conf.{ifname}.rp_filter is strict (1, the larger of 'all' and "
                                  f"{ifname}'s) but the default route leaves by {default}")
        assert problem.endswith(f"sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{ifname}.rp_filter=2")


@pytest.mark.root
def test_lb_up_refuses_a_host_without_ip_forwarding_with_one_clear_line(lab: Lab) -> None:
    lb_name = name("nofwd")
    daemon = RunningDaemon(lab, lb_name, lab_config(lab, lb_name))
    nl.set_sysctl(lab.lb_ns, "net.ipv4.ip_forward", "0")
    try:
        with pytest.raises(AssertionError, match="lb up exited with 1") as failed:
            daemon.start()
        logs = str(failed.value)
        lines = [line for line in logs.splitlines() if "forwarding is 0" in line]
        assert len(lines) == len(lab.lb_interfaces), logs  # one line for each interface XDP would attach to
        assert f"net.ipv4.conf.{labmod.LB_CLIENT_IF}.forwarding is 0" in logs
        assert "sysctl -w net.ipv4.ip_forward=1" in logs and "Traceback" not in logs
        assert not os.path.exists(f"/sys/fs/bpf/lb/{lb_name}"), "refused before anything was loaded"
    finally:
        nl.set_sysctl(lab.lb_ns, "net.ipv4.ip_forward", "1")
        daemon.cleanup()


@pytest.mark.root
def test_bpffs_is_mounted_when_absent() -> None:
    """In a private mount namespace (the host's bpffs is untouched): unmounted,
    then ensure_bpffs mounts it again, and says so."""
    script = ("import logging, os; logging.basicConfig(); from lb.dataplane.loader import ensure_bpffs; "
              "assert not os.path.ismount('/sys/fs/bpf'); ensure_bpffs(); print(os.path.ismount('/sys/fs/bpf'))")
    shell = f"while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf; done; exec {sys.executable} -c \"{script}\""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert "bpffs was not mounted on /sys/fs/bpf: mounted it (mount -t bpf bpf /sys/fs/bpf)" in done.stderr
