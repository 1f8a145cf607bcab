"""The admin socket under hostile input: a real AdminServer on a temporary
path, the real AdminCommands and HealthChecker (not running checks), and a
plain blocking client. Every bad line gets one error answer naming its key,
nothing is half-applied, and the server keeps serving. No root needed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lb import admin, config
from lb.admin_commands import AdminCommands
from lb.health import HealthChecker
from lb.model import LoadBalancer, Target
from lb.registrations import Registrations


class Daemon:
    """What AdminCommands sees of a daemon (lb.admin_commands.DaemonView)."""

    def __init__(self, lb: LoadBalancer) -> None:
        self.config = lb
        self.config_path: str | None = None
        self.state: Any = None
        self.program: Any = None
        self.health: HealthChecker | None = HealthChecker(lb.target_groups)
        self.registrations = Registrations(lb.name, persist=False)  # nothing written to /run/lb
        self.passive: Any = None
        self.reconciles = 0

    def schedule_reconcile(self) -> None:
        self.reconciles += 1

    async def reload(self) -> dict[str, Any]:
        return {"reloaded": True}


class Server:
    """An AdminServer on its own event loop in a thread, as in the daemon."""

    def __init__(self, path: str, daemon: Daemon) -> None:
        self.path = path
        self.daemon = daemon
        self.loop = asyncio.new_event_loop()
        self.server = admin.AdminServer(path, AdminCommands(daemon).handle)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    def registered(self, group: str) -> tuple[Target, ...]:
        """The group's targets, read on the server's loop."""
        assert self.daemon.health is not None
        health = self.daemon.health

        async def read() -> tuple[Target, ...]:
            return health.registered(group)

        return asyncio.run_coroutine_threadsafe(read(), self.loop).result(5)


class Client:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, line: bytes) -> dict[str, Any]:
        self.sock.sendall(line + b"\n")
        return self.answer()

    def answer(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection without answering"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def at_eof(self) -> bool:
        return self.buffer == b"" and self.sock.recv(65536) == b""


def small_lb(**groups: int) -> LoadBalancer:
    """The lab's config, with the given groups holding that many targets."""
    lb = config.load_default()
    data: dict[str, Any] = {
        "load_balancer": {"name": lb.name},
        "target_groups": [
            {"name": g.name, "protocol": g.protocol.value, "port": g.port,
             "targets": [{"id": str(t.address)} for t in g.targets]}
            for g in lb.target_groups
        ],
    }  # fmt: skip
    for spec in data["target_groups"]:
        n = groups.get(spec["name"].replace("-", "_"))
        if n is not None:
            third = len(spec["name"])
            spec["targets"] = [{"id": f"10.{third}.{i // 250}.{i % 250 + 1}"} for i in range(n)]
    return config.parse(data)


@pytest.fixture(autouse=True)
def served_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket serves uid 0 only; run as someone else, these tests count as root."""
    if os.geteuid() != 0:
        monkeypatch.setattr(admin, "peer_uid", lambda sock: 0)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with Server(str(tmp_path / "run" / "admin.sock"), Daemon(config.load_default())) as running:
        yield running


def request(**fields: object) -> bytes:
    return json.dumps(fields).encode()


REG = b'{"cmd": "register", "group": "web", "target": "10.0.1.20"'
DEEP = 30_000  # a line of 60 KB: under the 64 KiB limit, far over any stack

HOSTILE = [
    # numbers JSON does not have, and numbers out of range or of the wrong kind
    pytest.param(REG + b', "weight": Infinity}', "register.weight: expected an integer, got float inf", id="infinity"),
    pytest.param(REG + b', "weight": -Infinity}', "register.weight: expected an integer, got float -inf", id="-inf"),
    pytest.param(REG + b', "weight": NaN}', "register.weight: expected an integer, got float nan", id="nan"),
    pytest.param(REG + b', "weight": -5}', "register.weight: -5 is outside 1..100", id="weight-negative"),
    pytest.param(REG + b', "weight": 0}', "register.weight: 0 is outside 1..100", id="weight-zero"),
    pytest.param(REG + b', "weight": 1000000000}', "register.weight: 1000000000 is outside 1..100", id="weight-huge"),
    pytest.param(REG + b', "weight": 1e9}', "register.weight: expected an integer, got float 1000000000.0",
                 id="weight-float"),  # fmt: skip
    pytest.param(REG + b', "port": 0}', "register.port: 0 is outside 1..65535", id="port-zero"),
    pytest.param(REG + b', "port": 65536}', "register.port: 65536 is outside 1..65535", id="port-high"),
    # booleans are not integers
    pytest.param(REG + b', "port": true}', "register.port: expected an integer, got boolean true", id="port-true"),
    pytest.param(REG + b', "weight": false}', "register.weight: expected an integer, got boolean false",
                 id="weight-false"),  # fmt: skip
    # unknown keys, with a did-you-mean
    pytest.param(REG + b', "wieght": 3}', "register.wieght: unknown key (did you mean 'weight'?)", id="unknown-key"),
    pytest.param(request(cmd="deregister", group="web", target="10.0.1.11", weight=1), "deregister.weight: unknown key",
                 id="weight-on-deregister"),  # fmt: skip
    pytest.param(request(cmd="status", verbose=True), "status.verbose: unknown key", id="unknown-key-status"),
    pytest.param(request(cmd="regster", group="web"), "cmd: 'regster' is not one of status, targets, register",
                 id="unknown-command"),  # fmt: skip
    pytest.param(request(group="web"), "cmd: required key is missing", id="no-command"),
    # wrong types and values
    pytest.param(request(cmd=5), "cmd: expected a string, got integer 5", id="command-integer"),
    pytest.param(request(cmd="targets", group=["web"]), "targets.group: expected a string, got an array",
                 id="group-array"),  # fmt: skip
    pytest.param(request(cmd="targets", group="nope"),
                 "targets.group: 'nope' is not a defined target group (defined: api, echo-tcp, echo-udp, web)",
                 id="group-undefined"),  # fmt: skip
    pytest.param(request(cmd="register", group=5, target="10.0.1.20"),
                 "register.group: expected a string, got integer 5", id="group-integer"),  # fmt: skip
    pytest.param(request(cmd="register", group="web"), "register.target: required key is missing", id="no-target"),
    pytest.param(request(cmd="register", group=None, target="10.0.1.20"), "register.group: required key is missing",
                 id="group-null"),  # fmt: skip
    pytest.param(request(cmd="register", group="web", target={"id": "10.0.1.20"}),
                 "register.target: expected a string, got a table", id="target-object"),  # fmt: skip
    pytest.param(request(cmd="register", group="web", target="web1"),
                 "register.target: 'web1' is not an IPv4 or IPv6 address", id="target-hostname"),  # fmt: skip
    pytest.param(request(cmd="register", group="web", target="10.0.1.20\r\nx"),
                 r"register.target: '10.0.1.20\r\nx' contains a control character (U+000D)",
                 id="target-crlf"),  # fmt: skip
    pytest.param(request(cmd="register", group="web", target="0.0.0.0"), "register.target: 0.0.0.0 is not a unicast",
                 id="target-unspecified"),  # fmt: skip
    pytest.param(request(cmd="register", group="echo-tcp", target="2001:db8::1"),
                 "register.target: 2001:db8::1 is IPv6; target group 'echo-tcp' serves listener 'echo-tcp' on "
                 "10.0.0.100: a flow stays within one family", id="target-ipv6-behind-an-ipv4-listener"),  # fmt: skip
    pytest.param(request(cmd="deregister", group="web", target="10.0.1.99"),
                 "deregister.target: 10.0.1.99:80 is not registered in target group 'web'", id="deregister-unknown"),
    # the framing: nesting, non-objects, not JSON, not UTF-8, a key twice
    pytest.param(REG[:-len(b'"10.0.1.20"')] + b"[" * DEEP + b"]" * DEEP + b"}",
                 "register.target: nested more than 32 levels deep", id="deep-value"),  # fmt: skip
    pytest.param(b"[" * DEEP + b"]" * DEEP, "nested more than 32 levels deep", id="deep-array"),
    pytest.param(b'{"cmd": "status", "x": ' + b'{"a": ' * 8_000 + b"1" + b"}" * 8_000 + b"}",
                 "status.x: nested more than 32 levels deep", id="deep-objects"),  # fmt: skip
    pytest.param(b"[1, 2]", "a request is a JSON object", id="array"),
    pytest.param(b'"status"', "a request is a JSON object", id="string"),
    pytest.param(b"null", "a request is a JSON object", id="null"),
    pytest.param(b"5", "a request is a JSON object", id="number"),
    pytest.param(b'{"cmd": "status"', "invalid JSON", id="truncated"),
    pytest.param(b"", "invalid JSON", id="empty-line"),
    pytest.param(b'{"cmd": "st\xffatus"}', "byte 11 is not valid UTF-8", id="invalid-utf8"),
    pytest.param(b'\xff\xfe{\x00}\x00', "byte 0 is not valid UTF-8", id="utf16"),
    pytest.param(REG + b', "weight": 1, "weight": -5}', "the key 'weight' appears twice", id="duplicate-key"),
]


@pytest.mark.parametrize(("line", "error"), HOSTILE)
def test_a_hostile_request_gets_an_error_answer_and_the_server_goes_on(
    server: Server, line: bytes, error: str
) -> None:
    before = {g.name: server.registered(g.name) for g in server.daemon.config.target_groups}
    with Client(server.path) as client:
        answer = client.send(line)
        assert answer["ok"] is False
        assert error in answer["error"], answer
        assert "Traceback" not in answer["error"] and "\r" not in answer["error"]
        # the same connection goes on
        assert client.send(request(cmd="targets", group="web"))["ok"] is True
    # and so does the next one; nothing was half-applied
    with Client(server.path) as client:
        assert client.send(request(cmd="targets", group="api"))["ok"] is True
    assert {g.name: server.registered(g.name) for g in server.daemon.config.target_groups} == before
    assert server.daemon.reconciles == 0


def test_every_issue_of_a_request_is_answered_at_once(server: Server) -> None:
    with Client(server.path) as client:
        answer = client.send(request(cmd="register", group="web", target="10.0.1.20", port=True, weight=-5, x=1))
    assert answer["error"].splitlines() == [
        "register.x: unknown key; allowed keys: cmd, group, target, port, weight",
        "register.port: expected an integer, got boolean true",
        "register.weight: -5 is outside 1..100",
    ]


def test_an_over_long_line_is_answered_and_the_connection_closed(server: Server) -> None:
    line = request(cmd="status", pad="x" * 70_000)
    with Client(server.path) as client:
        answer = client.send(line)
        assert answer == {"ok": False, "error": "a request line is at most 65536 bytes; closing the connection"}
        assert client.at_eof()  # closed cleanly after the answer: EOF, not a reset
    with Client(server.path) as client:
        assert client.send(request(cmd="targets", group="web"))["ok"] is True


def test_a_good_registration_still_works(server: Server) -> None:
    with Client(server.path) as client:
        answer = client.send(request(cmd="register", group="web", target="10.0.1.20", port=8080, weight=7))
        assert answer == {"ok": True, "result": {"register": "10.0.1.20:8080", "group": "web", "target": "10.0.1.20",
                                                 "port": 8080, "weight": 7}}
        assert client.send(request(cmd="deregister", group="web", target="10.0.1.20", port=8080))["ok"] is True
    address = ipaddress.IPv4Address("10.0.1.20")
    assert Target(address, 8080, 7) in server.registered("web")
    assert server.daemon.reconciles == 2


def test_null_is_a_key_left_out(server: Server) -> None:
    """lb.inspect asks for the targets of group None: every group."""
    rows = admin.request(server.path, "targets", group=None)
    assert {row["group"] for row in rows} == {"web", "api", "echo-tcp", "echo-udp"}


def test_the_client_reports_the_error(server: Server) -> None:
    with pytest.raises(admin.AdminError, match=r"^register\.port: expected an integer, got boolean true$"):
        admin.request(server.path, "register", group="web", target="10.0.1.20", port=True)


def test_a_handler_bug_is_answered_not_raised(tmp_path: Path) -> None:
    async def broken(request: dict[str, Any]) -> Any:
        raise ZeroDivisionError("division by zero")

    daemon = Daemon(config.load_default())
    with Server(str(tmp_path / "admin.sock"), daemon) as running:
        running.server.handler = broken
        with Client(running.path) as client:
            answer = client.send(request(cmd="status"))
            assert answer["ok"] is False
            assert answer["error"].startswith("internal error: ZeroDivisionError: division by zero")
            assert client.send(request(cmd="status"))["ok"] is False  # still serving


# quotas: register counts what each group has now, as the config counts a file


@pytest.mark.parametrize(
    ("groups", "register", "error"),
    [
        pytest.param({"web": 1000, "api": 0, "echo_tcp": 0, "echo_udp": 0}, "web",
                     "register.target: target group 'web' would have 1001 targets; at most 1000", id="per-group"),
        pytest.param({"web": 993}, "api",  # 993 + 1 + 3 + 3 = 1000
                     "register.target: the load balancer would have 1001 targets; at most 1000"
                     " (each target of each group counts)", id="per-lb"),
    ],
)  # fmt: skip
def test_register_keeps_the_target_quotas(tmp_path: Path, groups: dict[str, int], register: str, error: str) -> None:
    lb = small_lb(**groups)
    with Server(str(tmp_path / "admin.sock"), Daemon(lb)) as running, Client(running.path) as client:
        answer = client.send(request(cmd="register", group=register, target="10.9.9.9"))
        assert answer == {"ok": False, "error": error}
        existing = str(lb.target_group(register).targets[0].address) if lb.target_group(register).targets else None
        if existing:  # a target already there may change its weight at the limit
            assert client.send(request(cmd="register", group=register, target=existing, weight=5))["ok"] is True


def test_register_at_the_limit_is_accepted(tmp_path: Path) -> None:
    lb = small_lb(web=992)  # 992 + 1 (api) + 3 (echo-tcp) + 3 (echo-udp) = 999
    with Server(str(tmp_path / "admin.sock"), Daemon(lb)) as running, Client(running.path) as client:
        assert client.send(request(cmd="register", group="web", target="10.9.9.9"))["ok"] is True
        assert client.send(request(cmd="register", group="web", target="10.9.9.10"))["ok"] is False


def test_register_into_an_l4_group_stays_within_the_ring(tmp_path: Path) -> None:
    text = config.default_config_text().replace("ring_size = 65537 ", "ring_size = 3 ", 1)
    lb = config.loads(text)
    assert lb.ring_size == 3
    with Server(str(tmp_path / "admin.sock"), Daemon(lb)) as running, Client(running.path) as client:
        answer = client.send(request(cmd="register", group="echo-tcp", target="10.0.1.20"))
        assert answer == {"ok": False, "error": "register.target: target group 'echo-tcp' would have 4 targets, "
                                                "more than ring_size (3)"}  # fmt: skip


def test_register_into_an_l4_group_stays_within_max_targets(tmp_path: Path) -> None:
    """The XDP program gives each TCP/UDP target endpoint an id out of max_targets:
    a registration past it is refused, by name; one more HTTP target is not concerned."""
    text = config.default_config_text().replace("ring_size = 65537 ", "ring_size = 65537\nmax_targets = 3 ", 1)
    lb = config.loads(text)
    assert lb.max_targets == 3  # echo-tcp and echo-udp: the same 3 endpoints (an id is per address and port)
    with Server(str(tmp_path / "admin.sock"), Daemon(lb)) as running, Client(running.path) as client:
        answer = client.send(request(cmd="register", group="echo-tcp", target="10.0.1.20"))
        assert answer == {"ok": False, "error": "register.target: the load balancer would have 4 TCP/UDP targets; "
                                                "at most max_targets (3)"}  # fmt: skip
        existing = str(lb.target_group("echo-tcp").targets[0].address)
        assert client.send(request(cmd="register", group="echo-tcp", target=existing, weight=5))["ok"] is True
        assert client.send(request(cmd="register", group="web", target="10.0.1.20"))["ok"] is True
