"""IPv6 VIPs end to end: a real `lb up` with IPv6 TCP and UDP listeners whose
targets are IPv6 addresses, beside an IPv4 TCP VIP in the same program, in
each forwarding mode:

- nat and full-nat on the namespace lab (VIP fd00::100, fd00::101 on the client link,
  targets fd00:1::11..13). Full NAT takes the backends' IPv6 default route
  away for its run: a backend can then answer only lb's own address on its
  link (fd00:1::1), which is what full NAT gives it as the source;
- dsr on the DSR lab (lb.lab_dsr: VIP fd30:9::100 routed to lb, targets
  fd30:1::11..13 on lb's segment holding the VIP on `lo`, replies through
  the router).

Real TCP and UDP from the client; what the target sees of its peer; a
target deregistered while a long-lived connection goes on; what `lb vips`,
`lb targets`, `lb conntrack`, `lb explain flow` and the metrics say; a
`kill -9` and restart that adopts the IPv6 maps; `lb down` that removes the
address lb placed and the maps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from lb import lab as labmod
from lb import lab_dsr
from lb import netlink as nl
from lb.cli import cli
from lb.dataplane.pins import pin_dir
from lb.hostnet import ADDRESS_PROTO
from lb.lab import Backend, Lab
from lb.lab_dsr import DsrLab
from tests import labclient
from tests.daemon_fixture import CHECKS, RunningDaemon, StreamPump, forwarded, lab_config, target_list
from tests.l4_lab import (
    answer_with_byte_count,
    answer_with_peer,
    assert_even,
    link_mtu,
    named_echo,
    spread,
    tcp_connect,
    tcp_server,
    udp_echoes,
    udp_server,
    upload,
)
from tests.names import name

pytestmark = pytest.mark.root

PORT = labmod.ECHO_PORT  # lb.labserver's TCP echo (banner: the target's name), on IPv4 and IPv6
PEER_PORT = 9301  # the test's own servers on every target: what the target sees of its peer
UDP_PORT = 9401  # the test's own UDP echo on every target, bound to the address replies must come from
SINK_PORT = 9501  # the test's own sink on the first target alone: reads to EOF, answers with the count
NARROW_MTU = 1280  # IPv6's minimum: lb's link to the first target, for path MTU discovery
UPLOAD = 2 * 1024 * 1024
METRICS = "127.0.0.1:9476"
INTERVAL = 5  # CHECKS: the fastest lb.config allows
GROUP_MODE = {"nat": "", "full-nat": "preserve_client_ip = false\n", "dsr": "direct_server_return = true\n"}


@dataclass
class Site:
    """Where one mode runs: the daemon, the client, the VIPs and the targets."""

    mode: str
    daemon: RunningDaemon
    client_ns: str
    client: str  # the client's IPv6 address
    vip: str  # the IPv6 VIP
    vip4: str  # the IPv4 VIP beside it
    lb_ns: str
    vip_ifname: str  # where lb places the IPv6 VIP
    targets: tuple[Backend, ...]
    lb_link: str  # lb's IPv6 address on the targets' link (full NAT's source)

    def target(self, banner: str) -> Backend:
        return next(t for t in self.targets if t.name == banner)

    @property
    def served_at(self) -> str | None:
        """The address the test's own servers bind on a target: the VIP for
        DSR (its answers leave from it), else none (the target's own, below)."""
        return self.vip if self.mode == "dsr" else None


def ipv6_listeners(targets: tuple[Backend, ...], vip: str, mode: str) -> str:
    """On `vip`: the TCP echo, the peer server and the UDP echo, each to every
    target, and the sink on the first target, in `mode`."""
    every = "[" + ", ".join(f'{{ id = "{t.address6}" }}' for t in targets) + "]"
    first = f'[{{ id = "{targets[0].address6}" }}]'
    check = f'{{ protocol = "TCP", port = {PORT}, {CHECKS} }}'
    return "".join(forwarded(listener, protocol, port, listed, check, address=vip) + GROUP_MODE[mode]
                   for listener, protocol, port, listed in (
                       ("echo6-tcp", "TCP", PORT, every), ("peer6", "TCP", PEER_PORT, every),
                       ("echo6-udp", "UDP", UDP_PORT, every), ("sink6", "TCP", SINK_PORT, first)))


def lab_site(lab: Lab, mode: str) -> Site:
    lb_name = name("v6" + mode.replace("-", ""))
    # A VIP of its own per mode: the client keeps the path MTU it learns toward
    # a destination (an IPv6 route exception, which a route flush leaves alone).
    vip = {"nat": labmod.VIP6, "full-nat": "fd00::101"}[mode]
    text = lab_config(lab, lb_name).replace("workers = 1\n", f'workers = 1\nmetrics_address = "{METRICS}"\n')
    text += ipv6_listeners(lab.backends, vip, mode)
    return Site(mode, RunningDaemon(lab, lb_name, text), lab.client_ns, labmod.CLIENT_ADDR6, vip,
                labmod.VIP, lab.lb_ns, labmod.LB_CLIENT_IF, lab.backends, labmod.BACKEND_GATEWAY6)


def dsr_site(lab: DsrLab) -> Site:
    lb_name = name("v6dsr")
    text = f"""
[load_balancer]
name = "{lb_name}"
netns = "{lab.lb_ns}"
interfaces = ["{lab_dsr.LB_IF}"]
xdp_mode = "native"
admin_socket = "/run/lb/{lb_name}.sock"
workers = 1
metrics_address = "{METRICS}"
"""
    text += forwarded("echo-tcp", "TCP", PORT, target_list(lab.targets), f"{{ {CHECKS} }}", address=lab_dsr.VIP)
    text += GROUP_MODE["dsr"] + ipv6_listeners(lab.targets, lab_dsr.VIP6, "dsr")
    return Site("dsr", RunningDaemon(None, lb_name, text), lab.client_ns, lab_dsr.CLIENT_ADDR6, lab_dsr.VIP6,
                lab_dsr.VIP, lab.lb_ns, "lo", lab.targets, lab_dsr.LB_ADDR6)


@pytest.fixture(scope="module", params=["nat", "full-nat", "dsr"])
def site(request: pytest.FixtureRequest) -> Iterator[Site]:
    mode = request.param
    with ExitStack() as stack:
        if mode == "dsr":
            dsr_lab = DsrLab(name("dsr6"))
            stack.callback(dsr_lab.down)
            dsr_lab.up()
            the = dsr_site(dsr_lab)
        else:
            lab = request.getfixturevalue("lab")
            the = lab_site(lab, mode)
        if mode == "full-nat":  # the backends answer lb's address on their link, nothing else
            for backend in the.targets:
                with nl.iproute(backend.netns) as ipr:
                    nl.remove_route(ipr, "::/0")
                stack.callback(restore_default_route, backend)
        stack.callback(the.daemon.cleanup)
        the.daemon.start()
        for target in the.targets:
            the.daemon.wait_for("echo6-tcp", target.address6, "healthy", timeout=INTERVAL * 2 + 3)
        for target in the.targets:  # what each target sees of its peer; UDP echo from the right address
            at = the.served_at or target.address6
            stack.enter_context(tcp_server(target.netns, at, PEER_PORT, answer_with_peer))
            stack.enter_context(udp_server(target.netns, at, UDP_PORT, named_echo(target.name)))
        first = the.targets[0]
        stack.enter_context(tcp_server(first.netns, the.served_at or first.address6, SINK_PORT,
                                       answer_with_byte_count))
        yield the


def restore_default_route(backend: Backend) -> None:
    with nl.iproute(backend.netns) as ipr:
        nl.add_route(ipr, "::/0", gateway=labmod.BACKEND_GATEWAY6)


def connect(site: Site, port: int = PORT, source_port: int = 0) -> socket.socket:
    """A TCP connection from the client to the IPv6 VIP (from a fixed source port if given)."""
    source = (site.client, source_port) if source_port else None
    return tcp_connect(site.client_ns, site.vip, port, source)


def lb(site: Site, *args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "-c", site.daemon.config_path])
    assert result.exit_code == 0, result.output
    return result.output


def lb_json(site: Site, *args: str) -> Any:
    out = json.loads(lb(site, *args, "--json"))
    assert out["schema"] == 2
    return out


def counters(site: Site) -> dict[str, int]:
    """`lb stats`: packets by reason."""
    return {c["reason"]: c["packets"] for c in lb_json(site, "stats")["counters"]}


def test_300_connections_spread_over_the_three_targets(site: Site) -> None:
    assert_even(spread(lambda: connect(site), 300), (t.name for t in site.targets), 300)  # within ±25 % of 100
    stats = counters(site)
    assert stats["ipv6_forwarded"] >= 300 * 2, stats  # SYN and ACK at least, to the targets
    if site.mode == "dsr":
        assert stats["dsr"] >= 300 * 2 and stats["reverse_nat"] == 0, stats  # no reply crossed lb


def test_the_target_sees_the_client_or_lb(site: Site) -> None:
    with connect(site, PEER_PORT) as sock:
        seen = labclient.read_line(sock)
        client = f"[{site.client}]:{sock.getsockname()[1]}"
        flows = lb_json(site, "conntrack", "--vip", f"[{site.vip}]:{PEER_PORT}")["flows"]
        flow = next(f for f in flows if f["client"] == client)
    assert flow["vip"] == f"[{site.vip}]:{PEER_PORT}" and flow["client_address"] == site.client
    assert flow["mode"] == site.mode
    if site.mode == "full-nat":
        assert seen == flow["source"]  # lb's address on the target's link, the port it allocated
        assert seen.startswith(f"[{site.lb_link}]:")
    else:
        assert seen == client  # the client's own address and port
        assert flow["source"] is None


def test_udp_through_the_vip(site: Site) -> None:
    names = set(udp_echoes(site.client_ns, site.vip, UDP_PORT, 30))  # each reply from the VIP, the ping echoed
    assert names <= {t.name for t in site.targets} and len(names) >= 2  # 30 flows over the ring


def test_ipv4_and_ipv6_vips_in_one_program(site: Site) -> None:
    with labclient.tcp_connect(site.client_ns, site.vip4, PORT) as v4, connect(site) as v6:
        assert labclient.read_line(v4) in {t.name for t in site.targets}
        assert labclient.read_line(v6) in {t.name for t in site.targets}


def test_a_deregistered_target_drains_its_long_lived_connection(site: Site) -> None:
    daemon = site.daemon
    stream = connect(site)
    owner = site.target(labclient.read_line(stream))
    pump = StreamPump(stream)
    pump.start()
    try:
        answer = daemon.request("deregister", group="echo6-tcp", target=owner.address6)
        assert answer["deregister"] == f"[{owner.address6}]:{PORT}"
        assert daemon.targets("echo6-tcp")[owner.address6]["state"] == "draining"
        deadline = time.monotonic() + 5
        while True:  # the reconcile that takes it out of the ring runs after the answer
            row = next(r for r in lb_json(site, "vips")["vips"] if r["vip"] == f"[{site.vip}]:{PORT}"
                       and r["protocol"] == "TCP")
            if owner.address6 not in {t["target"]["address"] for t in row["targets"]}:
                break
            assert time.monotonic() < deadline, row
            time.sleep(0.05)
        new = spread(lambda: connect(site), 60)
        exchanged = pump.exchanged
        time.sleep(0.5)
        assert pump.exchanged > exchanged and not pump.errors  # the drained target's connection goes on
        assert owner.name not in new and sum(new.values()) == 60
    finally:
        pump.stop()
        stream.close()
        registered = lb(site, "targets", "register", "echo6-tcp", owner.address6)
    assert registered.strip() == f"registered [{owner.address6}]:{PORT} in echo6-tcp (weight 1)"
    assert not pump.errors
    daemon.wait_for("echo6-tcp", owner.address6, "healthy", timeout=INTERVAL * 2 + 3)


def test_vips_targets_conntrack_and_explain_show_ipv6(site: Site) -> None:
    vip = f"[{site.vip}]:{PORT}"
    rows = {(r["protocol"], r["vip"]): r for r in lb_json(site, "vips")["vips"]}
    row = rows[("TCP", vip)]
    assert row["address"] == site.vip and row["listener"] == "echo6-tcp" and row["mode"] == site.mode
    assert {(t["target"]["address"], t["target"]["port"]) for t in row["targets"]} == \
        {(t.address6, PORT) for t in site.targets}
    assert ("TCP", f"{site.vip4}:{PORT}") in rows  # the IPv4 VIP beside it
    assert f"TCP {vip}" in lb(site, "vips")

    targets = {(t["group"], t["target"]["address"]): t for t in lb_json(site, "targets")["targets"]}
    assert all(targets[("echo6-tcp", t.address6)]["state"] == "healthy" for t in site.targets)

    with connect(site) as sock:
        target = site.target(labclient.read_line(sock))
        client = f"[{site.client}]:{sock.getsockname()[1]}"
        info = lb_json(site, "explain", "flow", "tcp", client, vip)
        assert info["decision"] == "conntrack" and info["listener"] == "echo6-tcp" and info["mode"] == site.mode
        assert info["conntrack"]["state"] == "live" and info["conntrack"]["tcp_state"] == "established"
        assert info["target"] == info["ring"]["target"] == {"address": target.address6, "port": PORT}
        if site.mode == "nat":
            assert info["reply"]["vips"] == [vip] and info["reply"]["by"] == "entry"
        elif site.mode == "full-nat":
            assert info["full_nat"]["source"].startswith(f"[{site.lb_link}]:")
        text = lb(site, "conntrack")
        assert client in text and vip in text
        text = lb(site, "explain", "flow", "tcp", client, vip)
        assert f"TCP {client} -> {vip} (listener echo6-tcp" in text
        assert f"conntrack: target [{target.address6}]:{PORT}" in text and "the conntrack entry decides" in text

    for port in range(23100, 23106):  # the Python flow hash (flow_hash6) picks the kernel's ring slot
        info = lb_json(site, "explain", "flow", "tcp", f"[{site.client}]:{port}", vip)
        assert info["conntrack"] is None and info["decision"] == "ring"
        with connect(site, source_port=port) as sock:
            owner = site.target(labclient.read_line(sock))
        assert info["target"] == {"address": owner.address6, "port": PORT}, port


# Not DSR: the DSR lab's lb has one link, toward the client and the targets
# alike, so there is no narrower path between lb and a target to discover.
@pytest.mark.parametrize("site", ["nat", "full-nat"], indirect=True)
def test_a_large_upload_completes_over_a_narrow_target_link(site: Site) -> None:
    """Path MTU discovery through lb over IPv6: lb's link to the first target
    has MTU 1280 (the target's side keeps 1500, so its SYN-ACK advertises a
    1440-byte MSS and only the path in between is narrow). lb answers the
    client's first 1500-byte segment with "packet too big" quoting it as the
    client sent it (client -> VIP), so the client lowers its path MTU and the
    upload completes."""
    with link_mtu(site.lb_ns, site.targets[0].lb_ifname, NARROW_MTU):
        before = counters(site)
        assert upload(site.client_ns, site.vip, SINK_PORT, UPLOAD) == str(UPLOAD)
        assert counters(site)["icmp_too_big"] > before["icmp_too_big"]


def test_maps_dump_decodes_the_ipv6_maps(site: Site) -> None:
    vips = lb_json(site, "maps", "dump", "vips6")["entries"]
    assert {(e["key"]["addr"], e["key"]["port"], e["key"]["proto"]) for e in vips} == {
        (site.vip, PORT, "TCP"), (site.vip, PEER_PORT, "TCP"), (site.vip, UDP_PORT, "UDP"),
        (site.vip, SINK_PORT, "TCP")}
    targets = {(e["value"]["addr"], e["value"]["port"]) for e in lb_json(site, "maps", "dump", "targets6")["entries"]}
    assert {(t.address6, PORT) for t in site.targets} <= targets
    with connect(site) as sock:
        client_port = sock.getsockname()[1]
        labclient.read_line(sock)
        flows = lb_json(site, "maps", "dump", "conntrack6", "--limit", "100000")["entries"]
    entry = next(e for e in flows if e["key"]["sport"] == client_port and e["key"]["dport"] == PORT)
    assert (entry["key"]["src"], entry["key"]["dst"]) == (site.client, site.vip)
    assert entry["value"]["tcp_state"] == "established" and entry["value"]["age_s"] >= 0
    if site.mode == "full-nat":
        assert entry["value"]["snat_addr"] == site.lb_link


def test_metrics_label_ipv6_vips_and_targets(site: Site) -> None:
    def scrape() -> str:
        with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=5) as response:
            return str(response.read().decode())

    samples = [sample for family in text_string_to_metric_families(nl.run_in_netns(site.lb_ns, scrape))
               for sample in family.samples]
    info = [x.labels for x in samples if x.name == "lb_vip_info" and x.labels["vip"].startswith(f"[{site.vip}]:")]
    assert {(x["vip"], x["protocol"], x["listener"], x["mode"]) for x in info} == {
        (f"[{site.vip}]:{PORT}", "TCP", "echo6-tcp", site.mode),
        (f"[{site.vip}]:{PEER_PORT}", "TCP", "peer6", site.mode),
        (f"[{site.vip}]:{UDP_PORT}", "UDP", "echo6-udp", site.mode),
        (f"[{site.vip}]:{SINK_PORT}", "TCP", "sink6", site.mode)}
    sent = {x.labels["target"]: x.value for x in samples if x.name == "lb_target_packets_total"}
    assert all(sent[f"[{t.address6}]:{PORT}"] > 0 for t in site.targets), sent


def test_kill_9_and_restart_adopt_the_ipv6_maps(site: Site) -> None:
    daemon = site.daemon
    stream = connect(site)
    labclient.read_line(stream)
    before = {(r["protocol"], r["vip"]): r["vip_id"] for r in lb_json(site, "vips")["vips"]}
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
        for target in site.targets:
            daemon.wait_for("echo6-tcp", target.address6, "healthy", timeout=INTERVAL * 2 + 3)
        time.sleep(0.3)
    finally:
        pump.stop()
        stream.close()
    assert not pump.errors
    assert {(r["protocol"], r["vip"]): r["vip_id"] for r in lb_json(site, "vips")["vips"]} == before


def test_lb_down_removes_the_ipv6_vip_address_and_the_maps(site: Site) -> None:
    """Last in the module: the fixture's daemon goes."""
    daemon = site.daemon
    with nl.iproute(site.lb_ns) as ipr:
        assert nl.find_address(ipr, site.vip) == (site.vip_ifname, 128, ADDRESS_PROTO)
    daemon.stop()
    daemon.down()
    with nl.iproute(site.lb_ns) as ipr:
        assert nl.find_address(ipr, site.vip) is None
    assert not os.path.exists(pin_dir(daemon.name))
