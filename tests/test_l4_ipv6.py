"""IPv6 VIPs end to end: a real `lb up` on the lab with IPv6 TCP and UDP
listeners (fd00::100) whose targets are the backends' IPv6 addresses
(fd00:1::11..13), beside the lab's IPv4 TCP VIP in the same program, in nat
and full-nat mode. Real TCP and UDP from the client's fd00::2; what the
target sees of its peer; a target deregistered while a long-lived connection
goes on; what `lb vips`, `lb conntrack`, `lb explain flow` and the metrics
say of it; a restart that adopts the IPv6 maps; `lb down` that removes the
address.

Full NAT takes the backends' IPv6 default route away for its module's
duration: a backend can then answer only lb's own address on its link
(fd00:1::1), which is what full NAT gives it as the source.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections import Counter as Tally
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from lb import lab as labmod
from lb import netlink as nl
from lb.cli import cli
from lb.dataplane.pins import pin_dir
from lb.hostnet import ADDRESS_PROTO
from lb.lab import Backend, Lab
from tests import labclient
from tests.daemon_fixture import CHECKS, RunningDaemon, StreamPump, forwarded, lab_config
from tests.names import name

pytestmark = pytest.mark.root

VIP6 = "fd00::100"  # in the client link's fd00::/64: lb places it on to-client
PORT = labmod.ECHO_PORT
PEER_PORT = 9301  # the test's own servers on every backend: what the target sees of its peer
METRICS = "127.0.0.1:9476"
INTERVAL = 5  # CHECKS: the fastest lb.config allows


def targets6(lab: Lab, port: int | None = None) -> str:
    extra = f", port = {port}" if port else ""
    return "[" + ", ".join(f'{{ id = "{b.address6}"{extra} }}' for b in lab.backends) + "]"


def config(lab: Lab, lb_name: str, mode: str) -> str:
    """The lab's IPv4 TCP echo VIP, and on VIP6: TCP and UDP echo and the
    peer listener, their groups in `mode`."""
    group = {"nat": "", "full-nat": "preserve_client_ip = false\n", "dsr": "direct_server_return = true\n"}[mode]
    text = lab_config(lab, lb_name).replace('workers = 1\n', f'workers = 1\nmetrics_address = "{METRICS}"\n')
    check = f'{{ protocol = "TCP", port = {PORT}, {CHECKS} }}'
    for listener, protocol, port in (("echo6-tcp", "TCP", PORT), ("echo6-udp", "UDP", PORT),
                                     ("peer6", "TCP", PEER_PORT)):
        text += forwarded(listener, protocol, port, targets6(lab), check, address=VIP6) + group
    return text


@dataclass
class Six:
    """The running daemon and the mode of its IPv6 groups."""

    daemon: RunningDaemon
    mode: str


@pytest.fixture(scope="module", params=["nat", "full-nat"])
def six(request: pytest.FixtureRequest, lab: Lab) -> Iterator[Six]:
    mode = request.param
    lb_name = name("v6" + mode.replace("-", ""))
    running = RunningDaemon(lab, lb_name, config(lab, lb_name, mode))
    if mode == "full-nat":  # the backends answer lb's address on their link, nothing else
        for backend in lab.backends:
            with nl.iproute(backend.netns) as ipr:
                nl.remove_route(ipr, "::/0")
    try:
        running.start()
        for backend in lab.backends:
            running.wait_for("echo6-tcp", backend.address6, "healthy", timeout=INTERVAL * 2 + 3)
        with ExitStack() as servers:  # what each backend sees of its peer
            for backend in lab.backends:
                servers.enter_context(labclient.peer_server(backend.netns, backend.address6, PEER_PORT))
            yield Six(running, mode)
    finally:
        running.cleanup()
        if mode == "full-nat":
            for backend in lab.backends:
                with nl.iproute(backend.netns) as ipr:
                    nl.add_route(ipr, "::/0", gateway=labmod.BACKEND_GATEWAY6)


def connect(lab: Lab, port: int = PORT, source_port: int = 0) -> socket.socket:
    """A TCP connection from the client's fd00::2 to VIP6; RST on close (no TIME_WAIT)."""

    def open_() -> socket.socket:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.settimeout(5)
            if source_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((labmod.CLIENT_ADDR6, source_port))
            sock.connect((VIP6, port))
        except BaseException:
            sock.close()
            raise
        return sock

    return nl.run_in_netns(lab.client_ns, open_)


def backend_named(lab: Lab, banner: str) -> Backend:
    return next(b for b in lab.backends if b.name == banner)


def lb(daemon: RunningDaemon, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "-c", daemon.config_path])
    assert result.exit_code == 0, result.output
    return result.output


def lb_json(daemon: RunningDaemon, *args: str) -> Any:
    out = json.loads(lb(daemon, *args, "--json"))
    assert out["schema"] == 2
    return out


def test_300_connections_spread_over_the_three_targets(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    seen: Tally[str] = Tally()
    for _ in range(300):
        with connect(lab) as sock:
            seen[labclient.read_line(sock)] += 1
    assert set(seen) == {b.name for b in lab.backends} and sum(seen.values()) == 300
    for count in seen.values():
        assert 75 <= count <= 125, seen  # within ±25 % of 100
    counters = {c["reason"]: c["packets"] for c in lb_json(daemon, "stats")["counters"]}
    assert counters["ipv6_forwarded"] >= 300 * 3, counters  # SYN, ACK, RST at least, to the targets


def test_the_target_sees_the_client_or_lb(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    with connect(lab, PEER_PORT) as sock:
        seen = labclient.read_line(sock)
        client = f"[{labmod.CLIENT_ADDR6}]:{sock.getsockname()[1]}"
        flows = lb_json(daemon, "conntrack", "--vip", f"[{VIP6}]:{PEER_PORT}")["flows"]
        flow = next(f for f in flows if f["client"] == client)
    assert flow["vip"] == f"[{VIP6}]:{PEER_PORT}" and flow["client_address"] == labmod.CLIENT_ADDR6
    assert flow["mode"] == six.mode
    if six.mode == "nat":
        assert seen == client  # the client's own address and port
        assert flow["source"] is None
    else:
        assert seen == flow["source"]  # lb's address on the backend's link, the port it allocated
        assert seen.startswith(f"[{labmod.BACKEND_GATEWAY6}]:")


def test_udp_through_the_vip(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    def exchange() -> set[str]:
        names = set()
        for i in range(30):
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                sock.settimeout(5)
                sock.sendto(f"ping {i}".encode(), (VIP6, PORT))
                data, sender = sock.recvfrom(128)
                assert sender[:2] == (VIP6, PORT)  # the reply comes from the VIP
                name_, _, echoed = data.decode().partition(" ")
                assert echoed == f"ping {i}"
                names.add(name_)
        return names

    names = nl.run_in_netns(lab.client_ns, exchange)
    assert names <= {b.name for b in lab.backends} and len(names) >= 2  # 30 flows over the ring


def test_ipv4_and_ipv6_vips_in_one_program(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    with labclient.tcp_connect(lab.client_ns, labmod.VIP, PORT) as v4, connect(lab) as v6:
        assert labclient.read_line(v4) in {b.name for b in lab.backends}
        assert labclient.read_line(v6) in {b.name for b in lab.backends}


def test_a_deregistered_target_drains_its_long_lived_connection(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    stream = connect(lab)
    owner = backend_named(lab, labclient.read_line(stream))
    pump = StreamPump(stream)
    pump.start()
    try:
        answer = daemon.request("deregister", group="echo6-tcp", target=owner.address6)
        assert answer["deregister"] == f"[{owner.address6}]:{PORT}"
        assert daemon.targets("echo6-tcp")[owner.address6]["state"] == "draining"
        deadline = time.monotonic() + 5
        while True:  # the reconcile that takes it out of the ring runs after the answer
            row = next(r for r in lb_json(daemon, "vips")["vips"] if r["vip"] == f"[{VIP6}]:{PORT}"
                       and r["protocol"] == "TCP")
            if owner.address6 not in {t["target"]["address"] for t in row["targets"]}:
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        new: Tally[str] = Tally()
        for _ in range(60):
            with connect(lab) as sock:
                new[labclient.read_line(sock)] += 1
        exchanged = pump.exchanged
        time.sleep(0.5)
        assert pump.exchanged > exchanged and not pump.errors  # the drained target's connection goes on
        assert owner.name not in new and sum(new.values()) == 60
    finally:
        pump.stop()
        stream.close()
        daemon.request("register", group="echo6-tcp", target=owner.address6)
    assert not pump.errors
    daemon.wait_for("echo6-tcp", owner.address6, "healthy", timeout=INTERVAL * 2 + 3)


def test_vips_targets_conntrack_and_explain_show_ipv6(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    rows = {(r["protocol"], r["vip"]): r for r in lb_json(daemon, "vips")["vips"]}
    row = rows[("TCP", f"[{VIP6}]:{PORT}")]
    assert row["address"] == VIP6 and row["listener"] == "echo6-tcp" and row["mode"] == six.mode
    assert {(t["target"]["address"], t["target"]["port"]) for t in row["targets"]} == \
        {(b.address6, PORT) for b in lab.backends}
    assert ("TCP", f"{labmod.VIP}:{PORT}") in rows  # the IPv4 VIP beside it
    assert f"TCP [{VIP6}]:{PORT}" in lb(daemon, "vips")

    targets = {(t["group"], t["target"]["address"]): t for t in lb_json(daemon, "targets")["targets"]}
    assert all(targets[("echo6-tcp", b.address6)]["state"] == "healthy" for b in lab.backends)

    with connect(lab) as sock:
        backend = backend_named(lab, labclient.read_line(sock))
        client = f"[{labmod.CLIENT_ADDR6}]:{sock.getsockname()[1]}"
        info = lb_json(daemon, "explain", "flow", "tcp", client, f"[{VIP6}]:{PORT}")
        assert info["decision"] == "conntrack" and info["listener"] == "echo6-tcp"
        assert info["conntrack"]["state"] == "live" and info["conntrack"]["tcp_state"] == "established"
        assert info["target"] == info["ring"]["target"] == {"address": backend.address6, "port": PORT}
        if six.mode == "nat":
            assert info["reply"]["vips"] == [f"[{VIP6}]:{PORT}"] and info["reply"]["by"] == "entry"
        else:
            assert info["full_nat"]["source"].startswith(f"[{labmod.BACKEND_GATEWAY6}]:")
        text = lb(daemon, "conntrack")
        assert client in text and f"[{VIP6}]:{PORT}" in text

    for port in range(23100, 23106):  # the Python flow hash (flow_hash6) picks the kernel's ring slot
        info = lb_json(daemon, "explain", "flow", "tcp", f"[{labmod.CLIENT_ADDR6}]:{port}", f"[{VIP6}]:{PORT}")
        assert info["conntrack"] is None and info["decision"] == "ring"
        with connect(lab, source_port=port) as sock:
            owner = backend_named(lab, labclient.read_line(sock))
        assert info["target"] == {"address": owner.address6, "port": PORT}, port


def test_metrics_label_ipv6_vips_and_targets(six: Six, lab: Lab) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as response:
            return str(response.read().decode())

    samples = [sample for family in text_string_to_metric_families(nl.run_in_netns(lab.lb_ns, scrape))
               for sample in family.samples]
    info = [x.labels for x in samples if x.name == "lb_vip_info" and x.labels["vip"] == f"[{VIP6}]:{PORT}"]
    assert {(x["protocol"], x["listener"], x["mode"]) for x in info} == {("TCP", "echo6-tcp", six.mode),
                                                                           ("UDP", "echo6-udp", six.mode)}
    sent = {x.labels["target"]: x.value for x in samples if x.name == "lb_target_packets_total"}
    assert all(sent[f"[{b.address6}]:{PORT}"] > 0 for b in lab.backends), sent


def test_kill_9_and_restart_adopt_the_ipv6_maps(six: Six, lab: Lab) -> None:
    daemon = six.daemon
    stream = connect(lab)
    labclient.read_line(stream)
    before = {(r["protocol"], r["vip"]): r["vip_id"] for r in lb_json(daemon, "vips")["vips"]}
    pump = StreamPump(stream)
    pump.start()
    try:
        time.sleep(0.3)
        daemon.stop(signal.SIGKILL)
        gap = pump.exchanged
        time.sleep(1.0)  # no control plane: the kernel forwards on its own
        assert pump.exchanged > gap
        restarting = threading.Thread(target=daemon.start)
        restarting.start()
        restarting.join()
        for backend in lab.backends:
            daemon.wait_for("echo6-tcp", backend.address6, "healthy", timeout=INTERVAL * 2 + 3)
        time.sleep(0.3)
    finally:
        pump.stop()
        stream.close()
    assert not pump.errors
    assert {(r["protocol"], r["vip"]): r["vip_id"] for r in lb_json(daemon, "vips")["vips"]} == before


def test_lb_down_removes_the_ipv6_vip_address_and_the_maps(six: Six, lab: Lab) -> None:
    """Last in the module: the fixture's daemon goes."""
    daemon = six.daemon
    with nl.iproute(lab.lb_ns) as ipr:
        assert nl.find_address(ipr, VIP6) == (labmod.LB_CLIENT_IF, 128, ADDRESS_PROTO)
    daemon.stop()
    daemon.down()
    with nl.iproute(lab.lb_ns) as ipr:
        assert nl.find_address(ipr, VIP6) is None
    assert not os.path.exists(pin_dir(daemon.name))
