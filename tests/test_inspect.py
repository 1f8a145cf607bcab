"""lb.inspect and its commands against a real `lb up` on the lab: what the
tables and JSON say must match the traffic we send and where it went."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections import Counter as Tally
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from lb import lab as labmod
from lb.cli import cli
from lb.dataplane.structs import FLOW_HASH_SEED, MapName
from lb.lab import Lab
from lb.netlink import run_in_netns
from tests.daemon_fixture import RunningDaemon, lab_config
from tests.labclient import backend_address, read_line
from tests.names import name

pytestmark = pytest.mark.root

NAME = name("i")
NOTHING = name("none")  # a load balancer never brought up
METRICS = "127.0.0.1:9471"  # distinct from other test daemons in the lab's lb namespace
VIP = labmod.VIP
PORT = labmod.ECHO_PORT
HEALTH = "{ interval = 5, timeout = 2, healthy_threshold = 2, unhealthy_threshold = 2 }"

# Rules on the lab's HTTP listener "web" (all three backends by default):
# web-a is backend1 alone, web-b backend2 alone, so each rule's real
# destination is known from the X-Backend header.
RULES = f"""
  [[listeners.rules]]
  priority = 10
  conditions = [{{ field = "path-pattern", values = ["/api/*"] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-a", weight = 1 }}] }}]

  [[listeners.rules]]
  priority = 20
  conditions = [{{ field = "host-header", values = ["*.example.com"] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-b", weight = 1 }}] }}]

  [[listeners.rules]]
  priority = 30
  conditions = [{{ field = "http-header", header_name = "X-Env", values = ["canary"] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-a", weight = 1 }}] }}]

  [[listeners.rules]]
  priority = 40
  conditions = [{{ field = "http-request-method", values = ["POST"] }},
                {{ field = "path-pattern", values = ["/submit"] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-b", weight = 1 }}] }}]

  [[listeners.rules]]
  priority = 50
  conditions = [{{ field = "path-pattern", values = ["/old/*"] }}]
  actions = [{{ type = "redirect", status_code = 302, path = "/new" }}]

  [[listeners.rules]]
  priority = 60
  conditions = [{{ field = "path-pattern", values = ["/lb-health"] }}]
  actions = [{{ type = "fixed-response", status_code = 200, content_type = "text/plain", body = "ok" }}]

  [[listeners.rules]]
  priority = 70
  conditions = [{{ field = "query-string", values = [{{ key = "team", value = "red" }}] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-b", weight = 1 }}] }}]

  [[listeners.rules]]
  priority = 80
  conditions = [{{ field = "source-ip", values = ["10.0.0.0/24"] }}, {{ field = "path-pattern", values = ["/src/*"] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-a", weight = 1 }}] }}]

  [[listeners.rules]]
  priority = 90
  conditions = [{{ field = "source-ip", values = ["192.168.0.0/16"] }},
                {{ field = "path-pattern", values = ["/nosrc/*"] }}]
  actions = [{{ type = "forward", target_groups = [{{ name = "web-b", weight = 1 }}] }}]

[[target_groups]]
name = "web-a"
protocol = "HTTP"
port = 80
targets = [{{ id = "10.0.1.11" }}]
health_check = {HEALTH}

[[target_groups]]
name = "web-b"
protocol = "HTTP"
port = 80
targets = [{{ id = "10.0.1.12" }}]
health_check = {HEALTH}
"""


CONNTRACK_SIZE, HALF_OPEN_SIZE = 262144, 65536


def config_text(lab: Lab, name: str = NAME) -> str:
    text = lab_config(lab, name, udp=True, http=True)
    # Flow tables of other sizes than the defaults: the config's keys size the maps.
    sizes = f"conntrack_size = {CONNTRACK_SIZE}\nhalf_open_size = {HALF_OPEN_SIZE}\n"
    return text.replace("workers = 1\n", f'workers = 1\nmetrics_address = "{METRICS}"\n{sizes}', 1) + RULES


@pytest.fixture(scope="module")
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, NAME, config_text(lab))
    try:
        running.start()
        for group, backends in (("echo-tcp", lab.backends), ("echo-udp", lab.backends), ("web", lab.backends),
                                ("web-a", lab.backends[:1]), ("web-b", lab.backends[1:2])):
            for backend in backends:
                running.wait_for(group, backend.address, "healthy", timeout=15)
        yield running
    finally:
        running.cleanup()


def lb(daemon: RunningDaemon, *args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(cli, [*args, "-c", daemon.config_path])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def lb_json(daemon: RunningDaemon, *args: str) -> Any:
    out = json.loads(lb(daemon, *args, "--json").stdout)
    assert out["schema"] == 2
    return out


def ep(target: dict[str, Any]) -> str:
    """A target as --json gives it, {"address", "port"}, as ADDRESS:PORT."""
    return f"{target['address']}:{target['port']}"


# --- traffic -------------------------------------------------------------------


def tcp_from(lab: Lab, port: int = 0) -> socket.socket:
    """A TCP connection to the echo VIP from the client, from source `port` (0: any)."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((labmod.CLIENT_ADDR, port))
            sock.connect((VIP, PORT))
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(lab.client_ns, connect)


def udp_from(lab: Lab, port: int) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(5)
        sock.bind((labmod.CLIENT_ADDR, port))
        return sock

    return run_in_netns(lab.client_ns, make)


def udp_echo(sock: socket.socket, payload: bytes) -> str:
    """Send one datagram to the UDP VIP; the name of the backend that answered."""
    sock.sendto(payload, (VIP, PORT))
    data, _ = sock.recvfrom(4096)
    name, _, echoed = data.partition(b" ")
    assert echoed == payload
    return name.decode()


def http_request(lab: Lab, method: str, path: str, host: str | None,
                 headers: tuple[str, ...] = ()) -> tuple[int, dict[str, str], bytes]:
    def send() -> bytes:
        with socket.create_connection((VIP, labmod.HTTP_PORT), timeout=5) as sock:
            lines = [f"{method} {path} HTTP/1.1", *([f"Host: {host}"] if host else []), *headers,
                     "Content-Length: 0", "Connection: close", "", ""]
            sock.sendall("\r\n".join(lines).encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    head, _, body = run_in_netns(lab.client_ns, send).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), fields, body


def vip_row(stats: dict[str, Any], protocol: str) -> dict[str, Any]:
    return next(v for v in stats["vips"] if v["protocol"] == protocol and v["vip"] == f"{VIP}:{PORT}")


def target_new_flows(stats: dict[str, Any]) -> dict[str, int]:
    return {ep(t["target"]): t["new_flows"] for t in stats["targets"]}


def counter(stats: dict[str, Any], reason: str) -> int:
    return int(next(c["packets"] for c in stats["counters"] if c["reason"] == reason))


# --- status, vips, targets ---------------------------------------------------------


def test_status_shows_daemon_program_config_and_listeners(daemon: RunningDaemon, lab: Lab) -> None:
    assert daemon.proc is not None
    info = lb_json(daemon, "status")
    assert info["daemon"]["running"] and info["daemon"]["pid"] == daemon.proc.pid
    assert info["config"]["path"] == daemon.config_path and info["config"]["loaded_at"] > 0
    assert info["program"]["id"] > 0 and info["maps_pinned"]
    assert [x["interface"] for x in info["xdp"]] == list(lab.lb_interfaces)
    assert all(x["mode"] == "native" and x["program_id"] == info["program"]["id"] and x["ours"] for x in info["xdp"])
    assert {(li["name"], li["protocol"], li["port"]) for li in info["listeners"]} == {
        ("echo-tcp", "TCP", 9000), ("echo-udp", "UDP", 9000), ("web", "HTTP", 80)}
    text = lb(daemon, "status").output
    assert f"lb {NAME}: running (pid {daemon.proc.pid})" in text
    assert f"config: {daemon.config_path} (loaded " in text
    assert f"program: id {info['program']['id']} (xdp_lb)" in text
    assert re.search(rf"to-client\s+native\s+{info['program']['id']}\s+yes", text)
    assert re.search(r"echo-udp\s+UDP\s+10\.0\.0\.100:9000", text)


def test_vips_show_each_ring_and_its_shares(daemon: RunningDaemon, lab: Lab) -> None:
    rows = lb_json(daemon, "vips")["vips"]
    assert [(r["protocol"], r["vip"], r["listener"], r["target_group"]) for r in rows] == [
        ("TCP", f"{VIP}:{PORT}", "echo-tcp", "echo-tcp"), ("UDP", f"{VIP}:{PORT}", "echo-udp", "echo-udp")]
    for row in rows:
        assert row["ring_size"] == 65537 and row["empty_slots"] == 0
        assert {ep(t["target"]) for t in row["targets"]} == {f"{b.address}:{PORT}" for b in lab.backends}
        assert sum(t["slots"] for t in row["targets"]) == 65537
        assert all(abs(t["share"] - 1 / 3) < 0.001 and t["active"] and t["in_service"] for t in row["targets"])
    text = lb(daemon, "vips").output
    assert re.search(r"TCP 10\.0\.0\.100:9000\s+echo-tcp\s+echo-tcp\s+nat\s+65537\s+10\.0\.1\.11:9000\s+\d+\s+2184[56]"
                     r"\s+33\.3%", text)
    assert len(re.findall(r"10\.0\.1\.1[123]:9000\s+\d+\s+\d+\s+33\.3%", text)) == 6


def test_targets_with_state_reason_and_latency(daemon: RunningDaemon, lab: Lab) -> None:
    info = lb_json(daemon, "targets")
    assert info["daemon"] == {"running": True, "reason": None}
    rows = {(t["group"], t["target"]["address"]): t for t in info["targets"]}
    assert len(rows) == 3 + 3 + 3 + 1 + 1
    for row in rows.values():
        assert row["state"] == "healthy" and row["reason"] is None
        assert row["last_latency_ms"] is not None and 0 <= row["last_latency_ms"] < 2000
    assert rows[("web", "10.0.1.12")]["target"]["port"] == 80
    assert rows[("echo-udp", "10.0.1.13")]["target"]["port"] == 9000
    only = lb_json(daemon, "targets", "web-b")["targets"]
    assert [(t["group"], ep(t["target"])) for t in only] == [("web-b", "10.0.1.12:80")]
    text = lb(daemon, "targets", "echo-tcp").output
    assert len(re.findall(r"echo-tcp\s+10\.0\.1\.1[123]\s+9000\s+1\s+healthy\s+-\s+\S.*ms\s+config", text)) == 3, text
    missing = lb(daemon, "targets", "nope", ok=False)
    assert missing.exit_code == 1 and "no target group 'nope'" in missing.output and "Traceback" not in missing.output


# --- conntrack and stats against real flows --------------------------------------------


def test_100_tcp_connections_show_in_conntrack_and_stats(daemon: RunningDaemon, lab: Lab) -> None:
    before = lb_json(daemon, "stats")
    socks: list[socket.socket] = []
    try:
        owner: dict[int, str] = {}  # client port → backend address, from the banner
        for _ in range(100):
            sock = tcp_from(lab)
            socks.append(sock)
            owner[sock.getsockname()[1]] = backend_address(lab, read_line(sock))
        after = lb_json(daemon, "stats")
        flows = lb_json(daemon, "conntrack", "--vip", f"{VIP}:{PORT}")
        ours = {f["client_port"]: f for f in flows["flows"]
                if f["protocol"] == "TCP" and f["client_port"] in owner}
        assert len(ours) == 100
        for port, flow in ours.items():
            assert flow["client"] == f"{labmod.CLIENT_ADDR}:{port}" and flow["vip"] == f"{VIP}:{PORT}"
            assert ep(flow["target"]) == f"{owner[port]}:{PORT}" and flow["listener"] == "echo-tcp"
            assert flow["state"] == "live" and 0 <= flow["age_s"] < 60
        # --target keeps exactly the flows that backend got.
        b2 = lab.backends[1].address
        to_b2 = lb_json(daemon, "conntrack", "--target", f"{b2}:{PORT}")["flows"]
        assert {f["client_port"] for f in to_b2 if f["client_port"] in owner} == {
            p for p, a in owner.items() if a == b2}
        assert all(ep(f["target"]) == f"{b2}:{PORT}" for f in to_b2)
        # The table: one line per flow, and the count.
        text = lb(daemon, "conntrack", "--vip", VIP).output
        for port in list(owner)[:10]:
            assert re.search(rf"TCP\s+10\.0\.0\.2:{port}\s+10\.0\.0\.100:9000\s+nat\s+-\s+{re.escape(owner[port])}:9000\s+"
                             r"[\d.]+s\s+[\d.]+s\s+live", text)
        assert f"{flows['count']} flows" in text
        # Stats count them: 100 new flows on the VIP, split as the banners say.
        assert vip_row(after, "TCP")["new_flows"] - vip_row(before, "TCP")["new_flows"] == 100
        assert vip_row(after, "TCP")["packets"] - vip_row(before, "TCP")["packets"] >= 200  # SYN, ACK, ...
        replies = vip_row(after, "TCP")["reply_packets"] - vip_row(before, "TCP")["reply_packets"]
        assert replies >= 200  # SYN-ACK, banner
        got = Tally(owner.values())
        new, old = target_new_flows(after), target_new_flows(before)
        for backend in lab.backends:
            endpoint = f"{backend.address}:{PORT}"
            assert new[endpoint] - old.get(endpoint, 0) == got[backend.address]
        assert counter(after, "conntrack_miss") - counter(before, "conntrack_miss") >= 100
        # The flow tables' bookkeeping: 100 SYNs went into half_open, 100 handshakes moved them to conntrack.
        tables = {t["table"]: t for t in after["tables"]}
        tables0 = {t["table"]: t for t in before["tables"]}
        assert (tables["conntrack"]["capacity"], tables["half_open"]["capacity"]) == (CONNTRACK_SIZE, HALF_OPEN_SIZE)
        assert {(name, f): tables[name][f] - tables0[name][f] for name in tables for f in ("inserts", "removed")} == {
            ("conntrack", "inserts"): 100, ("conntrack", "removed"): 0,
            ("half_open", "inserts"): 100, ("half_open", "removed"): 100,
            **{(name, f): 0 for name in ("conntrack6", "half_open6") for f in ("inserts", "removed")}}  # IPv4 flows
        assert counter(after, "flow_established") - counter(before, "flow_established") == 100
        assert tables["conntrack"]["entries"] >= 100 and tables["conntrack"]["evictions"] == 0
        # And the table shows the same numbers.
        text = lb(daemon, "stats").output
        tcp = vip_row(lb_json(daemon, "stats"), "TCP")
        assert re.search(rf"TCP 10\.0\.0\.100:9000\s+echo-tcp\s+\d+\s+\d+\s+{tcp['new_flows']}\s", text)
        assert re.search(r"conntrack_miss\s+\d+\s+new flow hashed onto the ring", text)
        assert re.search(rf"conntrack\s+\d+\s+{CONNTRACK_SIZE}\s+[\d.]+%\s+\d+\s+\d+\s+0\n", text)
    finally:
        for sock in socks:
            sock.close()


def test_udp_datagrams_show_in_conntrack_and_stats(daemon: RunningDaemon, lab: Lab) -> None:
    before = lb_json(daemon, "stats")
    socks = [udp_from(lab, 21000 + i) for i in range(5)]
    try:
        owner = {}
        for sock in socks:
            names = {udp_echo(sock, f"datagram {n}".encode()) for n in range(4)}
            assert len(names) == 1  # one flow, one target
            owner[sock.getsockname()[1]] = backend_address(lab, names.pop())
        after = lb_json(daemon, "stats")
        flows = [f for f in lb_json(daemon, "conntrack")["flows"]
                 if f["protocol"] == "UDP" and f["client_port"] in owner]
        assert {f["client_port"]: ep(f["target"]) for f in flows} == {p: f"{a}:{PORT}" for p, a in owner.items()}
        udp, udp0 = vip_row(after, "UDP"), vip_row(before, "UDP")
        assert udp["packets"] - udp0["packets"] == 20 and udp["reply_packets"] - udp0["reply_packets"] == 20
        assert udp["new_flows"] - udp0["new_flows"] == 5
    finally:
        for sock in socks:
            sock.close()


def test_stats_watch_prints_rates(daemon: RunningDaemon, lab: Lab) -> None:
    lines = lb(daemon, "stats", "--watch", "0.2", "--count", "2", "--json").stdout.splitlines()
    assert len(lines) == 2
    for line in lines:
        info = json.loads(line)
        assert 0.15 < info["interval_s"] < 2
        assert all(set(row["rates"]) == {"packets", "bytes", "new_flows"} for row in info["vips"] + info["targets"])
        assert all(row["rates"]["packets"] >= 0 for row in info["counters"])
    text = lb(daemon, "stats", "--watch", "0.2", "--count", "1").output
    assert "rates over" in text and "pkt/s" in text and "flows/s" in text


# --- maps --------------------------------------------------------------------------


def test_maps_list_and_dump(daemon: RunningDaemon, lab: Lab) -> None:
    rows = {m["name"]: m for m in lb_json(daemon, "maps", "list")["maps"]}
    assert set(rows) == {"vips", "targets", "rings", "conntrack", "vip_gens", "vip_stats", "target_stats", "counters",
                         "replies", "reply_ports", "flood_guard", "next_hops", "half_open", "table_stats", "table_fill",
                         "fullnat_sources", "fullnat_flows", "vips6", "targets6", "conntrack6", "half_open6",
                         "replies6", "fullnat_srcs6", "fullnat_flows6"}
    assert (rows["vips"]["type"], rows["vips"]["key_size"], rows["vips"]["value_size"], rows["vips"]["entries"]) == (
        "hash", 8, 16, 2)
    assert rows["conntrack"]["type"] == "lru_hash" and rows["conntrack"]["max_entries"] == CONNTRACK_SIZE
    assert rows["half_open"]["type"] == "lru_hash" and rows["half_open"]["max_entries"] == HALF_OPEN_SIZE
    assert rows["conntrack"]["entries"] >= 105  # the flows of the tests above, one entry each
    assert rows["rings"]["max_entries"] == 64 * 2 * 65537 and rows["counters"]["per_cpu"]
    text = lb(daemon, "maps", "list").output
    assert re.search(rf"conntrack\s+lru_hash\s+\d+\s+16\s+40\s+{CONNTRACK_SIZE}\s+\d+", text)

    vips = lb_json(daemon, "maps", "dump", "vips")
    assert {(e["key"]["addr"], e["key"]["port"], e["key"]["proto"]) for e in vips["entries"]} == {
        (VIP, PORT, "TCP"), (VIP, PORT, "UDP")}
    targets = lb_json(daemon, "maps", "dump", "targets")["entries"]
    assert {(e["value"]["addr"], e["value"]["port"], e["value"]["flags"]) for e in targets} == {
        (b.address, PORT, 3) for b in lab.backends}  # TARGET_F_ACTIVE | TARGET_F_IN_SERVICE
    some = lb_json(daemon, "maps", "dump", "conntrack", "--limit", "5")
    assert some["count"] == 5 and some["truncated"]
    assert all(e["value"]["age_s"] >= 0 for e in some["entries"])
    for entry in some["entries"]:  # one entry a flow, keyed client -> VIP
        assert entry["key"]["dst"] == VIP, entry
        assert entry["value"]["tcp_state"] in (None, "syn_sent", "established", "closing", "time_wait", "closed")
    assert lb_json(daemon, "maps", "dump", "half_open")["count"] >= 0
    routes = lb_json(daemon, "maps", "dump", "replies")["entries"]
    assert {(e["key"]["addr"], e["key"]["port"], e["key"]["proto"]) for e in routes} >= {
        (b.address, PORT, "TCP") for b in lab.backends}
    assert all(e["value"]["vips"] == [{"addr": VIP, "port": PORT, "vip_id": e["value"]["vips"][0]["vip_id"],
                                       "gen": e["value"]["vips"][0]["gen"]}] for e in routes)
    counters = {e["key"]["reason"]: e["value"]["total"] for e in lb_json(daemon, "maps", "dump", "counters")["entries"]}
    assert counters["conntrack_miss"] >= 105 and counters["redirected"] > 0
    text = lb(daemon, "maps", "dump", "target_stats").output
    assert re.search(r"key\s+packets\s+bytes\s+new_flows", text)
    unknown = lb(daemon, "maps", "dump", "nope", ok=False)
    assert unknown.exit_code == 1 and "no map 'nope'" in unknown.output and "Traceback" not in unknown.output


# --- explain flow ----------------------------------------------------------------------


def test_flow_hash_seed_is_the_programs() -> None:
    consts = (Path(__file__).resolve().parent.parent / "bpf" / "consts.h").read_text()
    found = re.search(r"#define FLOW_HASH_SEED (0x[0-9a-fA-F]+)", consts)
    assert found is not None and int(found.group(1), 16) == FLOW_HASH_SEED


def test_explain_flow_agrees_with_the_kernel_conntrack(daemon: RunningDaemon, lab: Lab) -> None:
    """For 30 real connections: the entry is found, and the Python hash picks
    the very ring slot the kernel picked when it created the entry."""
    socks = [tcp_from(lab) for _ in range(30)]
    try:
        for sock in socks:
            backend = backend_address(lab, read_line(sock))
            client = f"{labmod.CLIENT_ADDR}:{sock.getsockname()[1]}"
            info = lb_json(daemon, "explain", "flow", "tcp", client, f"{VIP}:{PORT}")
            assert info["decision"] == "conntrack" and info["listener"] == "echo-tcp"
            assert info["conntrack"]["state"] == "live" and info["conntrack"]["tcp_state"] == "established"
            assert info["syn"]["decision"] == "conntrack"  # open, its target in service: a SYN would follow it
            assert info["reply"] == {"target": {"address": backend, "port": PORT}, "vips": [f"{VIP}:{PORT}"],
                                     "by": "entry", "half_flow": False}
            assert info["target"] == info["conntrack"]["target"] == info["ring"]["target"] == {"address": backend,
                                                                                              "port": PORT}
        text = lb(daemon, "explain", "flow", "tcp", client, f"{VIP}:{PORT}").output
        assert f"conntrack: target {backend}:{PORT}" in text and "the conntrack entry decides" in text
        assert "live, established: it decides, for a SYN too" in text
        assert "back to the VIP by the flow's entry" in text
    finally:
        for sock in socks:
            sock.close()


def test_explain_flow_predicts_where_a_new_flow_goes(daemon: RunningDaemon, lab: Lab) -> None:
    for port in range(23000, 23012):
        info = lb_json(daemon, "explain", "flow", "tcp", f"{labmod.CLIENT_ADDR}:{port}", f"{VIP}:{PORT}")
        assert info["conntrack"] is None and info["decision"] == "ring"
        with tcp_from(lab, port) as sock:
            assert f"{backend_address(lab, read_line(sock))}:{PORT}" == ep(info["target"]), port
    for port in range(24000, 24006):
        info = lb_json(daemon, "explain", "flow", "udp", f"{labmod.CLIENT_ADDR}:{port}", f"{VIP}:{PORT}")
        assert info["decision"] == "ring"
        with udp_from(lab, port) as sock:
            assert f"{backend_address(lab, udp_echo(sock, b'x'))}:{PORT}" == ep(info["target"]), port
    text = lb(daemon, "explain", "flow", "tcp", "10.0.0.2:25000", f"{VIP}:{PORT}").output
    assert "conntrack: no entry" in text and re.search(r"ring: hash 0x[0-9a-f]{8} -> slot \d+ of 65537", text)
    assert "a new flow, hashed onto the ring" in text
    other = lb_json(daemon, "explain", "flow", "tcp", "10.0.0.2:25000", f"{VIP}:9999")
    assert other["decision"] == "pass" and other["vip_id"] is None
    bad = lb(daemon, "explain", "flow", "tcp", "10.0.0.2", f"{VIP}:{PORT}", ok=False)
    assert bad.exit_code == 1 and "a port is needed" in bad.output


# --- explain http ----------------------------------------------------------------------

# (method, host, path, headers, expected rule priority or None for the default)
HTTP_CASES = [
    ("GET", "lab", "/api/users", (), 10),
    ("GET", "shop.example.com", "/", (), 20),
    ("GET", "lab", "/page", ("X-Env: canary",), 30),
    ("POST", "lab", "/submit", (), 40),
    ("GET", "lab", "/submit", (), None),  # 40 wants POST
    ("GET", "lab", "/old/page?x=1", (), 50),
    ("GET", "lab", "/lb-health", (), 60),
    ("GET", "lab", "/search?team=red", (), 70),
    ("GET", "lab", "/search?team=blue", (), None),
    ("GET", "lab", "/src/a", (), 80),  # source-ip 10.0.0.0/24: the client is 10.0.0.2
    ("GET", "lab", "/nosrc/a", (), None),  # 192.168.0.0/16 is not the client
    ("GET", "example.com", "/", (), None),  # *.example.com needs a subdomain
    ("GET", "lab", "/API/users", (), None),  # paths are case-sensitive
    ("GET", "SHOP.EXAMPLE.COM:80", "/api/x", (), 10),  # the lowest priority wins
]


@pytest.mark.parametrize("method,host,path,headers,expected", HTTP_CASES,
                         ids=[f"{c[0]} {c[1]}{c[2]}" for c in HTTP_CASES])
def test_explain_http_agrees_with_real_requests(daemon: RunningDaemon, lab: Lab, method: str, host: str,
                                                path: str, headers: tuple[str, ...], expected: int | None) -> None:
    args = ["explain", "http", "--listener", "web", "--method", method, "--host", host, "--path", path,
            "--source", labmod.CLIENT_ADDR, *[a for h in headers for a in ("--header", h)]]
    info = lb_json(daemon, *args)
    assert info["selected"]["priority"] == expected
    before = [r for r in info["rules"] if r["priority"] is not None and (expected is None or r["priority"] < expected)]
    assert all(not r["matched"] and r["reason"] for r in before)  # each earlier rule says why not

    status, fields, body = http_request(lab, method, path, host, headers)
    action = info["selected"]["action"]
    if action["type"] == "forward":
        assert status == 200 and "x-backend" in fields
        backend = backend_address(lab, fields["x-backend"])
        (group,) = info["target_groups"]
        assert backend in {t["target"]["address"] for t in group["targets"]}
        assert all(t["state"] == "healthy" for t in group["targets"])
        if group["name"] in ("web-a", "web-b"):
            assert [t["target"]["address"] for t in group["targets"]] == [backend]
    elif action["type"] == "redirect":
        assert "x-backend" not in fields
        assert status == info["response"]["status"] == 302
        assert fields["location"] == info["response"]["location"] == "http://lab/new?x=1"
    else:
        assert "x-backend" not in fields
        assert (status, body) == (info["response"]["status"], info["response"]["body"].encode())

    text = lb(daemon, *args).output
    rule = "the default rule" if expected is None else f"rule {expected}"
    assert f"=> {rule}: " in text
    for r in before:
        assert re.search(rf"^{r['priority']}\s+no\s+", text, re.M)


def test_explain_http_errors(daemon: RunningDaemon) -> None:
    for args, message in ((["--listener", "echo-tcp"], "no HTTP listener 'echo-tcp'"),
                          (["--header", "nocolon"], "is not NAME:VALUE"),
                          (["--source", "nowhere"], "is not an IP address")):
        result = lb(daemon, "explain", "http", *args, ok=False)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


# --- errors --------------------------------------------------------------------------


def test_nothing_loaded_says_so(lab: Lab) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(lab_config(lab, NOTHING))
        f.flush()
        for args in (["vips"], ["conntrack"], ["stats"], ["maps", "list"], ["maps", "dump", "vips"],
                     ["explain", "flow", "tcp", "10.0.0.2:1000", f"{VIP}:{PORT}"]):
            result = CliRunner().invoke(cli, [*args, "-c", f.name])
            assert result.exit_code == 1, (args, result.output)
            assert f"nothing loaded for {NOTHING}: is lb up?" in result.output and "Traceback" not in result.output
        result = CliRunner().invoke(cli, ["targets", "-c", f.name])
        assert result.exit_code == 0 and "daemon not running" in result.stderr


def test_status_names_a_missing_namespace(lab: Lab) -> None:
    text = lab_config(lab, NOTHING).replace(f'netns = "{lab.lb_ns}"', 'netns = "lbt-no-such-ns"')
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        result = CliRunner().invoke(cli, ["status", "-c", f.name, "--json"])
    assert result.exit_code == 3, result.output  # not running
    info = json.loads(result.output)
    assert info["xdp"] and all(x["mode"] == "no namespace lbt-no-such-ns" for x in info["xdp"])


def test_not_root_is_refused_cleanly(daemon: RunningDaemon) -> None:
    fd, path = tempfile.mkstemp(suffix=".toml", prefix=f"{NAME}-public-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(Path(daemon.config_path).read_text())
        os.chmod(path, 0o644)
        # Imported as root, then run as nobody: the checkout may sit in a directory only root can
        # read (a clone into `mktemp -d`, mode 0700), and what is tested is the command, not the import.
        program = "import os, sys; from lb.cli import cli; os.setgid(65534); os.setuid(65534); cli(sys.argv[1:])"
        for args in (["status"], ["vips"], ["targets"], ["maps", "list"], ["maps", "dump", "vips"], ["conntrack"],
                     ["stats"], ["explain", "flow", "tcp", "10.0.0.2:1000", f"{VIP}:{PORT}"]):
            result = subprocess.run([sys.executable, "-c", program, *args, "-c", path], capture_output=True,
                                    text=True, timeout=30, cwd=Path(__file__).resolve().parent.parent)
            assert result.returncode == 1, (args, result.stderr)
            assert "needs root: run with sudo" in result.stderr and "Traceback" not in result.stderr
    finally:
        os.unlink(path)


# --- the daemon down (last: it stops the module's daemon) ------------------------------------


def test_daemon_down_maps_still_read_and_targets_say_so(daemon: RunningDaemon, lab: Lab) -> None:
    with tcp_from(lab) as sock:
        backend = backend_address(lab, read_line(sock))
        client = f"{labmod.CLIENT_ADDR}:{sock.getsockname()[1]}"
        assert daemon.stop(signal.SIGTERM) == 0
        result = lb(daemon, "status", "--json", ok=False)
        assert result.exit_code == 3  # the daemon is not running
        info = json.loads(result.stdout)
        assert not info["daemon"]["running"] and info["program"] is not None and info["maps_pinned"]
        assert info["config"]["path"] == daemon.config_path
        stopped = lb(daemon, "status", ok=False)
        assert stopped.exit_code == 3 and "not running" in stopped.output
        down = lb(daemon, "targets")
        assert "daemon not running" in down.stderr
        targets = lb_json(daemon, "targets")
        assert not targets["daemon"]["running"] and targets["daemon"]["reason"]
        assert {t["state"] for t in targets["targets"]} == {"unknown"} and len(targets["targets"]) == 11
        assert len(lb_json(daemon, "vips")["vips"]) == 2
        flows = lb_json(daemon, "conntrack", "--vip", f"{VIP}:{PORT}")["flows"]
        assert any(f["client"] == client and ep(f["target"]) == f"{backend}:{PORT}" for f in flows)
        assert ep(lb_json(daemon, "explain", "flow", "tcp", client, f"{VIP}:{PORT}")["target"]) == f"{backend}:{PORT}"
        assert vip_row(lb_json(daemon, "stats"), "TCP")["new_flows"] > 0
        assert len(lb_json(daemon, "maps", "list")["maps"]) == len(MapName)
        sock.sendall(b"still here\n")  # the kernel forwards with no daemon
        assert read_line(sock) == "still here"
