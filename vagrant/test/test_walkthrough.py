"""The Vagrant lab's walk-through (vagrant/README.md) as assertions, on booted VMs.

vagrant/test/run.sh (`sudo make vagrant-test`) brings the lab up and passes
`vagrant ssh-config` in LB_VAGRANT_SSH_CONFIG; without it every test is
skipped. Everything runs over ssh, as the README's `vagrant ssh NAME -c`
lines do (one multiplexed connection per VM: a handshake costs seconds
under TCG). The tests run in file order on one lab; a test that changes it
(a stopped server, an edited config) puts it back before it ends, and each
starts once every target is healthy.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

TOPOLOGY: dict[str, Any] = json.loads((Path(__file__).resolve().parent.parent / "topology.json").read_text())
VIP = TOPOLOGY["vip"]
HTTP_PORT = TOPOLOGY["ports"]["http"]
ECHO_PORT = TOPOLOGY["ports"]["echo"]


def _address_on(role: str, network: str) -> dict[str, str]:
    return {h["name"]: nic["address"] for h in TOPOLOGY["hosts"] if h["role"] == role
            for nic in h["interfaces"] if nic["network"] == network}


TARGETS = _address_on("target", "backend")  # {"web1": "10.0.1.11", ...}
(CLIENT_ADDRESS,) = _address_on("client", "client").values()
(LB_BACKEND_ADDRESS,) = _address_on("lb", "backend").values()
WEB_GROUP = ["web1", "web2"]  # vagrant/lb.toml: group "web"; "api" is web3
CONFIG = "/etc/lb/lb.toml"

SSH_CONFIG = os.environ.get("LB_VAGRANT_SSH_CONFIG", "")
SSH_CONTROL = os.environ.get("LB_VAGRANT_SSH_CONTROL", "")
pytestmark = pytest.mark.skipif(not SSH_CONFIG, reason="needs the booted lab: sudo make vagrant-test")

T = TypeVar("T")


# --- ssh -----------------------------------------------------------------------------------


def ssh_args(host: str, command: str) -> list[str]:
    args = ["ssh", "-F", SSH_CONFIG, "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=60",
            "-o", "ServerAliveInterval=15"]
    if SSH_CONTROL:
        args += ["-o", "ControlMaster=auto", "-o", f"ControlPath={SSH_CONTROL}/ssh-%C", "-o", "ControlPersist=900"]
    return [*args, host, command]


def sh(host: str, command: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `command` on `host` (as the vagrant user: sudo where needed)."""
    result = subprocess.run(ssh_args(host, command), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{host}$ {command}\nexit {result.returncode}\n{result.stdout}{result.stderr}")
    return result


def out(host: str, command: str, timeout: float = 180) -> str:
    return sh(host, command, timeout).stdout.strip()


def lb_json(command: str) -> Any:
    return json.loads(out("lb", f"sudo lb {command} --json"))


@pytest.fixture(scope="module", autouse=True)
def _ssh_masters() -> Iterator[None]:
    yield
    if SSH_CONTROL:
        for host in ["client", "lb", *TARGETS]:
            subprocess.run(ssh_args(host, "")[:-2] + ["-O", "exit", host], capture_output=True, timeout=30)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 120, interval: float = 2) -> T:
    """`probe()`'s first true value within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s (last: {last!r})")
        time.sleep(interval)


# --- what lb says ------------------------------------------------------------------------


def target_states(config: str = CONFIG) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, address) -> the `lb targets` row (`config`: where lb's CLI finds the daemon)."""
    info = lb_json(f"targets -c {config}")
    assert info["daemon"]["running"], info["daemon"]
    return {(t["group"], t["target"]): t for t in info["targets"]}


def all_healthy() -> dict[tuple[str, str], dict[str, Any]] | None:
    states = target_states()
    return states if all(t["state"] == "healthy" for t in states.values()) else None


def states_of(address: str) -> dict[str, str]:
    """group -> state of the target at `address`."""
    return {group: t["state"] for (group, a), t in target_states().items() if a == address}


def new_flows_by_address() -> Counter[str]:
    """New flows per target address, from the XDP counters (`lb stats`)."""
    counts: Counter[str] = Counter()
    for row in lb_json("stats")["targets"]:
        counts[row["target"].rsplit(":", 1)[0]] += row["new_flows"]
    return counts


def xdp_new_flows_during(action: Callable[[], T]) -> tuple[T, dict[str, int]]:
    before = new_flows_by_address()
    result = action()
    after = new_flows_by_address()
    return result, {name: after[address] - before[address] for name, address in TARGETS.items()}


@pytest.fixture(autouse=True)
def _healthy_lab() -> None:
    """Each test starts with lb running and every target healthy."""
    wait_for("every target healthy", all_healthy, timeout=240)


# --- what the client sees -----------------------------------------------------------------------


def http_get(count: int, path: str = "/", extra: str = "") -> list[str]:
    """Bodies of `count` requests from the client, one connection each; "(failed)" for an error."""
    url = shlex.quote(f"http://{VIP}:{HTTP_PORT}{path}")
    script = f"for i in $(seq {count}); do curl -sf -m 10 {extra} {url} || printf '(failed)'; echo; done"
    return [line for line in out("client", script, timeout=60 + 15 * count).splitlines() if line]


def tcp_banners(count: int) -> list[str]:
    """The echo server's first line on `count` TCP connections to the VIP (a new source port each)."""
    script = (f"for i in $(seq {count}); do "
              f"if exec 3<>/dev/tcp/{VIP}/{ECHO_PORT}; then read -r -t 10 name <&3 || name='(no banner)'; "
              f"echo \"$name\"; exec 3<&-; else echo '(failed)'; fi; done")
    return out("client", f"bash -c {shlex.quote(script)} 2>&1", timeout=60 + 15 * count).splitlines()


def udp_replies(count: int) -> list[str]:
    """Replies to one datagram on each of `count` UDP sockets (a new source port each)."""
    # head, not bash's read, takes the reply: read(2) one byte at a time would
    # get a datagram's first byte only.
    script = (f"for i in $(seq {count}); do exec 3<>/dev/udp/{VIP}/{ECHO_PORT}; echo \"ping$i\" >&3; "
              f"timeout 10 head -n 1 <&3 || echo '(no reply)'; exec 3<&-; done")
    return out("client", f"bash -c {shlex.quote(script)} 2>&1", timeout=60 + 15 * count).splitlines()


class EchoSession:
    """One long-lived TCP connection from the client to the VIP's echo port (socat over ssh)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(ssh_args("client", f"socat -T 900 - TCP:{VIP}:{ECHO_PORT}"),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.buffer = b""
        self.name = self.readline(60)  # the server's banner: its host name

    def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, remaining))
            if not ready:
                raise AssertionError(f"no line within {timeout:.0f}s (so far: {self.buffer!r})")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"connection closed (so far: {self.buffer!r}); {self.stderr()}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def echo(self, text: str, timeout: float = 30) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()
        return self.readline(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "socat still running"
        return self.proc.stderr.read().decode(errors="replace").strip()

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- lb itself --------------------------------------------------------------------------------------------


def test_lb_runs_under_systemd_with_xdp_on_both_lab_nics() -> None:
    assert out("lb", "systemctl is-active lb") == "active"
    status = lb_json("status")
    assert status["daemon"]["running"], status["daemon"]
    assert status["config"]["path"] == CONFIG
    modes = {x["interface"]: x["mode"] for x in status["xdp"] if x["ours"]}
    assert set(modes) == {"eth1", "eth2"}, status["xdp"]
    assert set(modes.values()) <= {"native", "generic"}, modes
    link = out("lb", "ip -d link show eth1")
    assert "xdp" in link, link
    print(f"XDP modes: {modes}")


def test_every_target_healthy() -> None:
    states = target_states()
    expected = {("web", TARGETS["web1"]), ("web", TARGETS["web2"]), ("api", TARGETS["web3"])}
    expected |= {(group, a) for group in ("echo-tcp", "echo-udp") for a in TARGETS.values()}
    assert set(states) == expected
    assert {t["state"] for t in states.values()} == {"healthy"}


# --- HTTP: the L7 proxy's rules ------------------------------------------------------------------------------


def test_http_default_rule_answers_from_web1_and_web2() -> None:
    bodies = http_get(20)
    print(f"20 requests to /: {' '.join(bodies)}")
    assert set(bodies) == set(WEB_GROUP), bodies
    # Two L7 workers (one per CPU of the lb VM), each with its own round-robin
    # position, and the kernel picks the worker per connection: both targets
    # answer, about half each, but not strictly in turn.
    assert min(Counter(bodies).values()) >= 4, Counter(bodies)


def test_http_rule_api_path_goes_to_web3() -> None:
    assert http_get(3, "/api/users") == ["web3"] * 3


def test_http_rule_redirects_old_host() -> None:
    head = out("client", f"curl -si -m 10 -H 'Host: old.example.com' http://{VIP}/page?q=1 | head -n 20")
    status_line, *headers = head.splitlines()
    assert status_line.split()[1] == "301", head
    assert "location: http://www.example.com/page?q=1" in [h.strip().lower() for h in headers], head


def test_http_fixed_response_from_lb_itself() -> None:
    assert http_get(1, "/health-of-lb") == ["ok"]


def test_nginx_sees_lb_and_the_client_in_x_forwarded_for() -> None:
    marker = f"/api/walkthrough-{uuid.uuid4().hex[:8]}"
    assert http_get(1, marker) == ["web3"]
    line = wait_for("the request in web3's access log",
                    lambda: out("web3", f"sudo grep -F {marker} /var/log/nginx/access.log || true"), timeout=30)
    print(f"web3's nginx: {line}")
    assert line.split()[0] == LB_BACKEND_ADDRESS, line  # the L7 proxy connects from its own address
    assert f"xff={CLIENT_ADDRESS}" in line.split(), line


def test_wrk_load_is_all_2xx() -> None:
    report = out("client", f"wrk -t2 -c20 -d10s http://{VIP}/", timeout=120)
    print(report)
    assert "Non-2xx" not in report, report
    requests = int(report.split(" requests in ")[0].split()[-1])
    assert requests > 0, report


# --- TCP and UDP: the XDP fast path ---------------------------------------------------------------------------


def test_tcp_echo_banner_then_echo() -> None:
    lines = out("client", f"echo hello | socat -t 2 - TCP:{VIP}:{ECHO_PORT}").splitlines()
    assert len(lines) == 2 and lines[0] in TARGETS and lines[1] == "hello", lines


def test_udp_echo_names_its_target() -> None:
    reply = out("client", f"echo hello | socat -t 5 - UDP:{VIP}:{ECHO_PORT}")
    name, _, payload = reply.partition(" ")
    assert name in TARGETS and payload == "hello", reply


def test_tcp_flows_spread_over_three_targets() -> None:
    banners, flows = xdp_new_flows_during(lambda: tcp_banners(30))
    print(f"30 TCP connections: {dict(Counter(banners))}; XDP new flows: {flows}")
    assert set(banners) == set(TARGETS), banners
    assert all(flows[name] >= 1 for name in TARGETS), flows
    assert sum(flows.values()) >= 30, flows
    assert {name: flows[name] >= Counter(banners)[name] for name in TARGETS} == dict.fromkeys(TARGETS, True)


def test_udp_flows_spread_over_three_targets() -> None:
    replies, flows = xdp_new_flows_during(lambda: udp_replies(30))
    names = [r.split()[0] for r in replies]
    print(f"30 UDP sockets: {dict(Counter(names))}; XDP new flows: {flows}")
    assert set(names) == set(TARGETS), replies
    assert all(r == f"{r.split()[0]} ping{i}" for i, r in enumerate(replies, 1)), replies
    assert all(flows[name] >= 1 for name in TARGETS), flows
    assert sum(flows.values()) >= 30, flows


def test_xdp_path_keeps_the_clients_address() -> None:
    session = EchoSession()
    try:
        assert session.echo("who am I") == "who am I"
        peers = out(session.name, f"ss -Htn state established '( sport = :{ECHO_PORT} )'")
        print(f"{session.name}: {peers}")
        assert f"{CLIENT_ADDRESS}:" in peers, peers
    finally:
        session.close()


# --- failover and return ------------------------------------------------------------------------------------------


def test_http_moves_off_a_stopped_nginx_and_returns() -> None:
    web2 = TARGETS["web2"]
    sh("web2", "sudo systemctl stop nginx")
    try:
        began = time.monotonic()
        row = wait_for("web2 unhealthy in group web",
                       lambda: (r := target_states()[("web", web2)])["state"] == "unhealthy" and r, timeout=90)
        print(f"web2 unhealthy after {time.monotonic() - began:.1f}s: {row['reason']} ({row['description']})")
        assert row["reason"], row
        assert http_get(10) == ["web1"] * 10
    finally:
        sh("web2", "sudo systemctl start nginx")
    began = time.monotonic()
    wait_for("web2 healthy again", lambda: states_of(web2)["web"] == "healthy", timeout=90)
    print(f"web2 healthy again after {time.monotonic() - began:.1f}s")
    bodies = wait_for("web2 answering again", lambda: b if "web2" in (b := http_get(10)) else None, timeout=60)
    assert set(bodies) == set(WEB_GROUP), bodies


def test_tcp_and_udp_move_off_a_stopped_echo_server_and_return() -> None:
    web2 = TARGETS["web2"]
    sh("web2", "sudo systemctl stop lb-labserver")
    try:
        began = time.monotonic()
        wait_for("web2 unhealthy in echo-tcp and echo-udp",
                 lambda: states_of(web2) == {"web": "healthy", "echo-tcp": "unhealthy", "echo-udp": "unhealthy"},
                 timeout=90)
        print(f"web2's echo groups unhealthy after {time.monotonic() - began:.1f}s")
        (banners, replies), flows = xdp_new_flows_during(lambda: (tcp_banners(20), udp_replies(20)))
        print(f"without web2: TCP {dict(Counter(banners))}, UDP {dict(Counter(r.split()[0] for r in replies))}, "
              f"XDP new flows {flows}")
        assert set(banners) == {"web1", "web3"}, banners
        assert {r.split()[0] for r in replies} == {"web1", "web3"}, replies
        assert flows["web2"] == 0 and flows["web1"] > 0 and flows["web3"] > 0, flows
    finally:
        sh("web2", "sudo systemctl start lb-labserver")
    wait_for("web2 healthy again in the echo groups",
             lambda: set(states_of(web2).values()) == {"healthy"}, timeout=90)
    (banners, replies), flows = xdp_new_flows_during(lambda: (tcp_banners(20), udp_replies(20)))
    print(f"web2 back: TCP {dict(Counter(banners))}, UDP {dict(Counter(r.split()[0] for r in replies))}, "
          f"XDP new flows {flows}")
    assert "web2" in banners and flows["web2"] > 0, (banners, flows)


# --- reload ----------------------------------------------------------------------------------------------------------


def with_web3_in_web_group(config: str) -> str:
    """The config with web3 added to target group "web" (the README's example edit)."""
    head, *groups = config.split("[[target_groups]]")
    (web,) = [i for i, g in enumerate(groups) if '\nname = "web"\n' in g]
    lines = groups[web].split("\n")
    (i,) = [n for n, line in enumerate(lines) if line.startswith("targets = [")]
    before, bracket, comment = lines[i].partition("]")
    lines[i] = f'{before}, {{ id = "{TARGETS["web3"]}" }}{bracket}{comment}'
    groups[web] = "\n".join(lines)
    return "[[target_groups]]".join([head, *groups])


def write_config(text: str) -> None:
    subprocess.run(ssh_args("lb", f"sudo tee {CONFIG} >/dev/null"), input=text, text=True, check=True, timeout=60)


def test_reload_applies_a_good_config_and_refuses_a_broken_one() -> None:
    original = out("lb", f"sudo cat {CONFIG}") + "\n"
    web3 = TARGETS["web3"]
    try:
        # A good edit: web3 joins the web group, with no restart.
        pid = out("lb", "systemctl show -p MainPID --value lb")
        write_config(with_web3_in_web_group(original))
        sh("lb", "sudo systemctl reload lb")
        wait_for("web3 healthy in group web", lambda: target_states().get(("web", web3), {}).get("state") == "healthy",
                 timeout=90)
        bodies = wait_for("web3 answering /", lambda: b if "web3" in (b := http_get(12)) else None, timeout=60)
        assert set(bodies) == {"web1", "web2", "web3"}, bodies
        assert out("lb", "systemctl show -p MainPID --value lb") == pid, "reload restarted lb"

        # A broken one: refused by `lb reload` (ExecReload), nothing changes.
        # (lb's CLI reads the config too, to find the daemon: with the file
        # broken, `lb targets` needs -c and a good copy.)
        good = "/tmp/lb-walkthrough-good.toml"
        sh("lb", f"sudo cp {CONFIG} {good}")
        since = out("lb", "date +%s")
        write_config(with_web3_in_web_group(original).replace('algorithm = "round_robin"', 'algorithm = "fastest"'))
        refused = sh("lb", "sudo systemctl reload lb", check=False)
        assert refused.returncode != 0, refused
        journal = out("lb", f"sudo journalctl -u lb --since @{since} --no-pager")
        print(f"refused reload, lb's journal:\n{journal}")
        assert "fastest" in journal, journal
        assert out("lb", "systemctl is-active lb") == "active"
        assert out("lb", "systemctl show -p MainPID --value lb") == pid
        assert target_states(good)[("web", web3)]["state"] == "healthy"
        assert http_get(3, "/health-of-lb") == ["ok"] * 3
        assert "web3" in wait_for("web3 still answering /", lambda: b if "web3" in (b := http_get(6)) else None,
                                  timeout=60)
    finally:
        write_config(original)
        sh("lb", "sudo systemctl reload lb")
    wait_for("web3 gone from group web", lambda: ("web", web3) not in target_states(), timeout=90)


# --- restart --------------------------------------------------------------------------------------------------------


def test_restart_keeps_established_tcp_flows() -> None:
    sessions = [EchoSession() for _ in range(3)]
    try:
        print(f"3 connections, to {', '.join(s.name for s in sessions)}")
        for s in sessions:
            assert s.echo("before") == "before"
        pid = out("lb", "systemctl show -p MainPID --value lb")
        began = time.monotonic()
        restart = subprocess.Popen(ssh_args("lb", "sudo systemctl restart lb"), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        rounds = 0
        try:
            while restart.poll() is None:  # the flows go on while lb stops and starts again
                for s in sessions:
                    assert s.echo(f"during {rounds}") == f"during {rounds}"
                rounds += 1
                time.sleep(3)
            output = restart.communicate(timeout=10)[0]
        finally:
            if restart.poll() is None:
                restart.kill()
                restart.communicate()
        print(f"systemctl restart lb: {time.monotonic() - began:.1f}s, {rounds} rounds of echoes meanwhile")
        assert restart.returncode == 0, output
        assert rounds > 0
        assert out("lb", "systemctl is-active lb") == "active"
        assert out("lb", "systemctl show -p MainPID --value lb") != pid
        for s in sessions:
            assert s.echo("after") == "after"
        assert lb_json("status")["daemon"]["running"]
    finally:
        for s in sessions:
            s.close()
