"""lb.metrics: the collector on its own, then /metrics of a real `lb up`
scraped from inside the lab's lb namespace and checked against the traffic sent."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.error
import urllib.request
from collections import Counter as Tally
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb import lab as labmod
from lb import metrics
from lb.l7.stats import WorkerStats
from lb.lab import Lab
from lb.model import LoadBalancer
from lb.netlink import run_in_netns
from tests import labclient
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.labclient import backend_address, read_line
from tests.names import name

NAME = name("m")
METRICS_PORT = 9472  # distinct from other test daemons in the lab's lb namespace
VIP, PORT = labmod.VIP, labmod.ECHO_PORT

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def scrape_url(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


# --- the collector alone (no root, nothing pinned) ----------------------------------------


def test_collector_sums_workers_and_serves_on_its_own_registry() -> None:
    stats = [WorkerStats(), WorkerStats()]
    stats[0].record("web", None, "g", "10.0.1.11:80", 200, False, 0.003)
    stats[0].record("web", 10, "api", "10.0.1.12:80", 404, False, 0.02)
    stats[1].record("web", None, "g", "10.0.1.11:80", 200, False, 0.5)
    stats[1].record("web", 20, "-", "-", 301, True, -1.0)  # a redirect: no upstream time
    stats[0].record("web", None, "g", "10.0.1.11:80", 502, True, -1.0)  # lb's: connect refused
    stats[1].record("web", None, "g", "10.0.1.11:80", 502, True, -1.0)
    stats[1].record("web", None, "g", "10.0.1.12:80", 500, False, 0.001)  # the target's own
    stats[1].record("web", None, "-", "-", 400, True, -1.0)  # a malformed request
    stats[1].connections = 2
    health = [{"group": "web", "target": "10.0.1.11", "port": 80, "state": "unhealthy",
               "last_latency_ms": 12.5, "last_ok": False}]
    collector = metrics.Collector(lambda: LoadBalancer(name=name("nothing-pinned")), health=lambda: health,
                                  l7_stats=lambda: [s.snapshot() for s in stats])
    server = metrics.serve("127.0.0.1:0", collector)
    try:
        host, port = server.address
        samples = parse(scrape_url(f"http://{host}:{port}/metrics"))
    finally:
        server.close()
    assert value(samples, "lb_maps_loaded") == 0
    assert value(samples, "lb_http_requests_total", rule="default", target="10.0.1.11:80", code="200") == 2
    assert value(samples, "lb_http_requests_total", rule="10", group="api", code="404") == 1
    assert value(samples, "lb_http_requests_total", rule="20", group="-", target="-", code="301") == 1
    # lb's own errors apart from the targets' (ALB's HTTPCode_ELB_5XX_Count and HTTPCode_Target_5XX_Count)
    assert value(samples, "lb_http_elb_5xx_total", listener="web", group="g", target="10.0.1.11:80") == 2
    assert value(samples, "lb_http_elb_5xx_total") == 2
    assert value(samples, "lb_http_target_5xx_total", listener="web", group="g", target="10.0.1.12:80") == 1
    assert value(samples, "lb_http_target_5xx_total") == 1
    assert value(samples, "lb_http_elb_4xx_total", group="-", target="-") == 1
    assert value(samples, "lb_http_target_4xx_total", group="api") == 1
    assert value(samples, "lb_http_upstream_latency_seconds_count") == 4
    assert value(samples, "lb_http_upstream_latency_seconds_count", group="g", target="10.0.1.11:80") == 2
    assert value(samples, "lb_http_upstream_latency_seconds_bucket", target="10.0.1.11:80", le="0.005") == 1
    assert value(samples, "lb_http_upstream_latency_seconds_bucket", le="0.005") == 2
    assert value(samples, "lb_http_upstream_latency_seconds_bucket", le="0.025") == 3
    assert value(samples, "lb_http_upstream_latency_seconds_bucket", le="+Inf") == 4
    assert value(samples, "lb_http_upstream_latency_seconds_sum") == pytest.approx(0.524)
    assert value(samples, "lb_http_connections") == 2
    assert value(samples, "lb_target_health", target="10.0.1.11", state="unhealthy") == 1
    assert value(samples, "lb_target_health", target="10.0.1.11") == 1  # one state at a time
    assert value(samples, "lb_target_health_check_latency_seconds", target="10.0.1.11") == 0.0125
    assert value(samples, "lb_target_health_check_success", target="10.0.1.11") == 0
    with pytest.raises(urllib.error.URLError):  # closed: the port is free again
        scrape_url(f"http://{host}:{port}/metrics")


def test_on_loop_runs_the_call_on_the_loop_thread() -> None:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        call = metrics.on_loop(loop, threading.get_ident)
        assert call() == thread.ident
        failing = metrics.on_loop(loop, lambda: 1 // 0)
        with pytest.raises(ZeroDivisionError):
            failing()
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


# --- a real daemon -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    text = lab_config(lab, NAME, udp=True, http=True)
    text = text.replace("workers = 1\n", f'workers = 1\nmetrics_address = "127.0.0.1:{METRICS_PORT}"\n', 1)
    running = RunningDaemon(lab, NAME, text)
    try:
        running.start()
        for group in ("echo-tcp", "echo-udp", "web"):
            for backend in lab.backends:
                running.wait_for(group, backend.address, "healthy", timeout=15)
        yield running
    finally:
        running.cleanup()


def scrape(lab: Lab) -> Samples:
    return parse(run_in_netns(lab.lb_ns, scrape_url, f"http://127.0.0.1:{METRICS_PORT}/metrics"))


def tcp_exchange(lab: Lab) -> str:
    """One TCP connection through the VIP: banner, one echo, close. The backend's name."""

    def run() -> str:
        with socket.create_connection((VIP, PORT), timeout=5) as sock:
            name = read_line(sock)
            sock.sendall(b"ping\n")
            assert read_line(sock) == "ping"
            return name

    return run_in_netns(lab.client_ns, run)


def udp_exchange(lab: Lab, datagrams: int) -> str:
    def run() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            names = set()
            for n in range(datagrams):
                sock.sendto(b"d%d" % n, (VIP, PORT))
                names.add(sock.recvfrom(4096)[0].split(b" ")[0].decode())
            assert len(names) == 1
            return names.pop()

    return run_in_netns(lab.client_ns, run)


def http_get(lab: Lab, path: str) -> tuple[int, str]:
    status, headers, _ = labclient.http_get(lab.client_ns, VIP, labmod.HTTP_PORT, path)
    return status, headers["x-backend"]


@pytest.mark.root
def test_scrape_counts_the_traffic_sent(daemon: RunningDaemon, lab: Lab) -> None:
    before = scrape(lab)
    assert value(before, "lb_maps_loaded") == 1
    tcp = Tally(backend_address(lab, tcp_exchange(lab)) for _ in range(30))
    udp = Tally(backend_address(lab, udp_exchange(lab, 4)) for _ in range(10))
    http: Tally[tuple[str, int]] = Tally()
    for n in range(20):
        status, served_by = http_get(lab, "/status/404" if n % 4 == 0 else f"/page{n}")
        http[(backend_address(lab, served_by), status)] += 1
    after = scrape(lab)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    vip = f"{VIP}:{PORT}"
    # L4, per VIP: one new flow per connection / socket, every UDP datagram a packet each way.
    assert delta("lb_vip_new_flows_total", vip=vip, protocol="TCP", listener="echo-tcp") == 30
    assert delta("lb_vip_packets_total", vip=vip, protocol="TCP") >= 30 * 4  # SYN, ACK, data, FIN at least
    assert delta("lb_vip_reply_packets_total", vip=vip, protocol="TCP") >= 30 * 3  # SYN-ACK, banner, echo
    assert delta("lb_vip_new_flows_total", vip=vip, protocol="UDP", listener="echo-udp") == 10
    assert delta("lb_vip_packets_total", vip=vip, protocol="UDP") == 40
    assert delta("lb_vip_reply_packets_total", vip=vip, protocol="UDP") == 40
    assert delta("lb_vip_bytes_total", vip=vip, protocol="UDP") == 40 * (14 + 20 + 8 + 2)  # eth+ip+udp+"dN"
    # Per target: the new flows add up to what each backend said it served.
    for backend in lab.backends:
        target = f"{backend.address}:{PORT}"
        assert delta("lb_target_new_flows_total", target=target) == tcp[backend.address] + udp[backend.address]
    assert delta("lb_xdp_packets_total", reason="conntrack_miss") == 40
    # The flow tables, without a walk: 30 SYNs half-open, 30 handshakes and 10 UDP flows into conntrack.
    assert delta("lb_flow_table_inserts_total", table="half_open") == 30
    assert delta("lb_flow_table_inserts_total", table="conntrack") == 40
    assert delta("lb_xdp_packets_total", reason="flow_established") == 30
    assert value(after, "lb_flow_table_capacity", table="conntrack") == 524288
    assert value(after, "lb_flow_table_capacity", table="half_open") == 131072
    assert value(after, "lb_flow_table_entries", table="conntrack") >= 40
    assert delta("lb_flow_table_evictions_total", table="conntrack") == 0
    assert delta("lb_xdp_packets_total", reason="reverse_nat") >= 30 * 3 + 40
    # Conntrack still holds every flow (closed TCP ones stay until they idle out).
    assert value(after, "lb_conntrack_entries", vip=vip, protocol="TCP", state="live") >= 30
    assert value(after, "lb_conntrack_entries", vip=vip, protocol="UDP", state="live") >= 10
    assert value(after, "lb_conntrack_walk_truncated") == 0
    # Each of the 30 connections was closed by the client (a FIN at least): the entries say so.
    assert sum(value(after, "lb_conntrack_tcp_entries", vip=vip, tcp_state=state)
               for state in ("closing", "time_wait")) >= 30
    # L7: requests by target and status code, and one latency observation each.
    for (address, status), count in http.items():
        assert delta("lb_http_requests_total", listener="web", rule="default", target=f"{address}:80",
                     code=str(status)) == count
    assert delta("lb_http_requests_total", code="404") == 5
    assert delta("lb_http_upstream_latency_seconds_count") == 20
    assert delta("lb_http_upstream_latency_seconds_bucket", le="+Inf") == 20
    # Health: every target healthy, with its last check's latency.
    for group in ("echo-tcp", "echo-udp", "web"):
        for backend in lab.backends:
            assert value(after, "lb_target_health", group=group, target=backend.address, state="healthy") == 1
            assert value(after, "lb_target_health_check_success", group=group, target=backend.address) == 1
            assert 0 < value(after, "lb_target_health_check_latency_seconds", group=group, target=backend.address) < 2


@pytest.mark.root
def test_metrics_endpoint_closes_with_the_daemon(daemon: RunningDaemon, lab: Lab) -> None:
    assert value(scrape(lab), "lb_maps_loaded") == 1
    daemon.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(lab)
    daemon.start()  # the port is free again for the next `lb up`
    assert value(scrape(lab), "lb_maps_loaded") == 1


def test_split_address() -> None:
    assert metrics.split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert metrics.split_address("[::1]:9464") == ("::1", 9464)
    assert metrics.split_address(":9464") == ("0.0.0.0", 9464)

