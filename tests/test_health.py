"""Tests for lb.health: matcher, state machine, fail open, draining, real checks on loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

import pytest
import uvloop

from lb.health import (
    CheckResult,
    HealthChecker,
    Matcher,
    StateChange,
    TargetRecord,
    check_http,
    check_target,
    check_tcp,
)
from lb.health.checker import JITTER
from lb.health.checks import StatusLineProtocol
from lb.health.states import DISABLED, DRAINING, HEALTHY, INITIAL_CHECKING, NOT_REGISTERED, REGISTERING
from lb.model import (
    HealthCheck,
    HealthCheckProtocol,
    Protocol,
    Target,
    TargetGroup,
    TargetHealth,
    TargetReason,
    TargetState,
)

T = TypeVar("T")
LOCALHOST = ipaddress.IPv4Address("127.0.0.1")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {"asyncio": None, "uvloop": uvloop.new_event_loop}


def run(coro: Coroutine[Any, Any, T], *, timeout: float = 5.0, loop: str = "asyncio") -> T:
    """Run one test coroutine on a fresh loop, bounded in time."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(bounded())


async def wait_for(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll `predicate` every 10 ms; returns the seconds it took to hold."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def fast_check(**settings: Any) -> HealthCheck:
    """A HealthCheck with fractional seconds, which the checker takes as given."""
    return HealthCheck(**settings)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- a loopback backend ----------------------------------------------------------


class _BackendProtocol(asyncio.Protocol):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.backend.connections.add(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.backend.status is not None:
            self.backend.requests.append(self.buffer)
            asyncio.get_running_loop().call_later(self.backend.delay, self.answer)

    def answer(self) -> None:
        assert self.transport is not None
        if not self.transport.is_closing():
            status = self.backend.status
            self.transport.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        assert self.transport is not None
        self.backend.connections.discard(self.transport)


class Backend:
    """An HTTP server on 127.0.0.1 answering `status` after `delay`; status None: never answers."""

    def __init__(self, status: int | None = 200, delay: float = 0.0) -> None:
        self.status = status
        self.delay = delay
        self.port = 0
        self.requests: list[bytes] = []
        self.connections: set[asyncio.Transport] = set()
        self.server: asyncio.Server | None = None

    async def start(self, port: int = 0) -> Backend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _BackendProtocol(self), "127.0.0.1", port, backlog=512)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for transport in list(self.connections):
                transport.abort()
            await self.server.wait_closed()
            self.server = None
        await asyncio.sleep(0)  # let the aborted transports run connection_lost

    async def __aenter__(self) -> Backend:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def running(checker: HealthChecker, body: Callable[[], Awaitable[None]]) -> None:
    """Run `checker` around `body`, and always wait for it to stop."""
    task = asyncio.create_task(checker.run())
    try:
        await body()
    finally:
        checker.stop()
        await task


# --- matcher ---------------------------------------------------------------------


@pytest.mark.parametrize("spec, inside, outside", [
    ("200", [200], [199, 201, 503]),
    ("200,202", [200, 202], [201, 203]),
    ("200-299", [200, 250, 299], [199, 300]),
    ("200, 302-304", [200, 302, 304], [301, 305]),
])
def test_matcher_parses(spec: str, inside: list[int], outside: list[int]) -> None:
    matcher = Matcher.parse(spec)
    assert all(code in matcher for code in inside)
    assert not any(code in matcher for code in outside)


@pytest.mark.parametrize("spec", ["", "ok", "200-", "-200", "299-200", "200,,202", "99", "600", "2OO", "200-299-300"])
def test_matcher_rejects(spec: str) -> None:
    with pytest.raises(ValueError, match="matcher"):
        Matcher.parse(spec)


# --- the state machine (no sockets) -----------------------------------------------

PASS = CheckResult(True, "HTTP 200", 1.0, status=200)
RESULTS = {
    "P": PASS,
    "M": CheckResult.failed(TargetReason.RESPONSE_CODE_MISMATCH, "Health checks failed with these codes: [503]",
                            1.0, 503),
    "T": CheckResult.failed(TargetReason.TIMEOUT, "Request timed out", 100.0),
    "R": CheckResult.failed(TargetReason.FAILED_HEALTH_CHECKS, "Connection refused", 0.2),
}
STATES = {"i": TargetState.INITIAL, "h": TargetState.HEALTHY, "u": TargetState.UNHEALTHY}
UNHEALTHY = TargetHealth(TargetState.UNHEALTHY, TargetReason.TIMEOUT, "Request timed out")
TARGET = Target(ipaddress.IPv4Address("10.0.1.11"))


@pytest.mark.parametrize("start, healthy_threshold, unhealthy_threshold, results, states", [
    pytest.param(INITIAL_CHECKING, 5, 2, "P", "h", id="initial: one pass is enough"),
    pytest.param(REGISTERING, 5, 2, "P", "h", id="registering: one pass is enough"),
    pytest.param(INITIAL_CHECKING, 5, 2, "MP", "ih", id="initial: a fail then a pass"),
    pytest.param(INITIAL_CHECKING, 5, 2, "MM", "iu", id="initial: unhealthy_threshold fails"),
    pytest.param(INITIAL_CHECKING, 5, 3, "TRM", "iiu", id="initial: fails of any kind count"),
    pytest.param(HEALTHY, 5, 2, "MPMPT", "hhhhh", id="healthy: a pass resets the fails"),
    pytest.param(HEALTHY, 5, 2, "TT", "hu", id="healthy: two fails"),
    pytest.param(HEALTHY, 5, 3, "RRR", "hhu", id="healthy: three fails"),
    pytest.param(UNHEALTHY, 3, 2, "PPP", "uuh", id="unhealthy: healthy_threshold passes"),
    pytest.param(UNHEALTHY, 3, 2, "PPMPPP", "uuuuuh", id="unhealthy: a fail resets the passes"),
    pytest.param(UNHEALTHY, 2, 2, "PPTTPP", "uhhuuh", id="round trip"),
])
def test_state_machine(start: TargetHealth, healthy_threshold: int, unhealthy_threshold: int,
                       results: str, states: str) -> None:
    check = HealthCheck(healthy_threshold=healthy_threshold, unhealthy_threshold=unhealthy_threshold)
    record = TargetRecord(TARGET, 80, start, now=0.0)
    for step, (result, state) in enumerate(zip(results, states), start=1):
        before = record.state
        old = record.observe(RESULTS[result], check, now=float(step))
        assert record.state is STATES[state], f"after {results[:step]}"
        assert (old is not None) == (record.state is not before)  # a change is reported iff the state changed
    assert record.last_checked == len(results)
    assert record.last_result is RESULTS[results[-1]]


@pytest.mark.parametrize("start, results, reason, description", [
    (HEALTHY, "MM", TargetReason.RESPONSE_CODE_MISMATCH, "Health checks failed with these codes: [503]"),
    (HEALTHY, "TT", TargetReason.TIMEOUT, "Request timed out"),
    (HEALTHY, "RR", TargetReason.FAILED_HEALTH_CHECKS, "Connection refused"),
    (HEALTHY, "TM", TargetReason.RESPONSE_CODE_MISMATCH, "Health checks failed with these codes: [503]"),
    (INITIAL_CHECKING, "MR", TargetReason.FAILED_HEALTH_CHECKS, "Connection refused"),
    (UNHEALTHY, "PM", TargetReason.RESPONSE_CODE_MISMATCH, "Health checks failed with these codes: [503]"),
])
def test_reason_is_the_last_failure(start: TargetHealth, results: str, reason: TargetReason,
                                    description: str) -> None:
    record = TargetRecord(TARGET, 80, start, now=0.0)
    for result in results:
        record.observe(RESULTS[result], HealthCheck(), now=1.0)
    assert record.health == TargetHealth(TargetState.UNHEALTHY, reason, description)


def test_record_bookkeeping() -> None:
    record = TargetRecord(TARGET, 80, INITIAL_CHECKING, now=0.0)
    assert record.last_checked is None and record.last_latency_ms is None
    record.observe(RESULTS["T"], HealthCheck(), now=5.0)
    assert (record.consecutive_passes, record.consecutive_fails) == (0, 1)
    assert record.last_latency_ms == 100.0 and record.last_change == 0.0
    assert record.observe(PASS, HealthCheck(), now=7.0) == INITIAL_CHECKING
    assert (record.consecutive_passes, record.consecutive_fails) == (1, 0)
    assert record.last_change == 7.0 and record.last_checked == 7.0 and record.description == ""
    # A new failure while unhealthy updates the reason but is no change of state.
    record = TargetRecord(TARGET, 80, UNHEALTHY, now=0.0)
    assert record.observe(RESULTS["M"], HealthCheck(), now=1.0) is None
    assert record.health.reason is TargetReason.RESPONSE_CODE_MISMATCH and record.last_change == 0.0


# --- the checker without running it: fake clock, results fed in -------------------


def group(name: str = "web", *targets: Target, check: HealthCheck | None = None,
          delay: int = 300, port: int = 80) -> TargetGroup:
    return TargetGroup(name, Protocol.HTTP, port, targets=targets, health_check=check or HealthCheck(),
                       deregistration_delay=delay)


def ip(last: int) -> Target:
    return Target(ipaddress.IPv4Address(f"10.0.1.{last}"))


A, B, C = ip(11), ip(12), ip(13)
FAIL = RESULTS["T"]


def make(*groups: TargetGroup) -> tuple[HealthChecker, FakeClock, list[StateChange]]:
    clock, changes = FakeClock(), list[StateChange]()
    return HealthChecker(groups, clock=clock, on_change=changes.append), clock, changes


def test_initial_targets_and_fail_open() -> None:
    checker, _, changes = make(group("web", A, B, C))
    assert all(r.health == REGISTERING for r in checker.health("web").values())
    assert checker.in_service("web") == (A, B, C)  # none healthy yet: fail open
    checker.observe("web", B, PASS)
    assert checker.in_service("web") == (B,)  # initial targets are not in service
    for _ in range(2):
        checker.observe("web", B, FAIL)
        checker.observe("web", C, FAIL)
    assert checker.target_health("web", B).state is TargetState.UNHEALTHY
    assert checker.in_service("web") == (A, B, C)  # none healthy: fail open again
    checker.deregister("web", A)
    assert checker.in_service("web") == (B, C)  # draining targets never fail open
    assert checker.registered("web") == (A, B, C) and checker.draining("web") == (A,)
    assert [(c.target, c.old.state, c.new.state) for c in changes] == [
        (B, TargetState.INITIAL, TargetState.HEALTHY),
        (B, TargetState.HEALTHY, TargetState.UNHEALTHY),
        (C, TargetState.INITIAL, TargetState.UNHEALTHY),
        (A, TargetState.INITIAL, TargetState.DRAINING),
    ]


def test_healthy_since_is_when_the_target_last_became_healthy() -> None:
    """What slow start ramps from: set on the change to healthy, kept while healthy."""
    checker, clock, _ = make(group("web", A, B))
    assert checker.healthy_since("web", A) is None  # initial
    clock.now = 1010.0
    checker.observe("web", A, PASS)
    clock.now = 1020.0
    checker.observe("web", A, PASS)
    assert checker.healthy_since("web", A) == 1010.0
    for _ in range(2):
        checker.observe("web", A, FAIL)
    assert checker.healthy_since("web", A) is None
    assert checker.healthy_since("api", A) is None


def test_unknown_group_has_no_targets() -> None:
    checker, _, _ = make(group("web", A))
    assert checker.in_service("api") == () and checker.health("api") == {}
    assert checker.target_health("api", A) == NOT_REGISTERED
    with pytest.raises(KeyError):
        checker.register("api", A)


def test_draining_then_removed_after_the_delay() -> None:
    checker, clock, changes = make(group("web", A, B, delay=300))
    checker.observe("web", A, PASS)
    clock.now += 10
    checker.deregister("web", A)
    record = checker.health("web")[A]
    assert record.health == DRAINING and record.last_change == 1010.0
    assert checker.draining("web") == (A,) and checker.in_service("web") == (B,)  # B fails open
    checker.observe("web", A, FAIL)  # a late result does not count
    assert checker.target_health("web", A) == DRAINING
    clock.now += 299.9
    assert checker.draining("web") == (A,)
    clock.now += 0.1
    assert checker.draining("web") == () and A not in checker.health("web")
    assert checker.target_health("web", A) == NOT_REGISTERED
    assert changes[-1] == StateChange("web", A, DRAINING, NOT_REGISTERED, 1310.0)
    checker.deregister("web", A)  # no longer registered: nothing happens
    assert len(changes) == 3


def test_zero_delay_and_reregistration() -> None:
    checker, _, changes = make(group("web", A, B, delay=0))
    checker.deregister("web", A)
    assert checker.registered("web") == (B,)
    assert [c.new.state for c in changes] == [TargetState.DRAINING, TargetState.UNUSED]
    checker.register("web", A)
    assert checker.target_health("web", A) == REGISTERING and changes[-1].old == NOT_REGISTERED
    checker.register("web", A)  # already registered: nothing happens
    assert len(changes) == 3


def test_register_a_draining_target_starts_over() -> None:
    checker, _, _ = make(group("web", A))
    checker.observe("web", A, PASS)
    checker.deregister("web", A)
    checker.register("web", A)
    record = checker.health("web")[A]
    assert record.health == REGISTERING and record.consecutive_passes == 0 and record.drain_deadline is None


def test_disabled_checks_are_unavailable_and_in_service() -> None:
    disabled = HealthCheck(enabled=False)
    checker, _, changes = make(group("web", A, B, check=disabled), group("api", C))
    checker.observe("api", C, PASS)
    assert checker.target_health("web", A) == DISABLED
    assert checker.in_service("web") == (A, B)
    checker.observe("web", A, FAIL)  # nothing checks them; a result changes nothing
    assert checker.target_health("web", A) == DISABLED
    checker.update_groups([group("web", A, B), group("api", C, check=disabled)])
    assert checker.target_health("web", A) == REGISTERING
    assert checker.target_health("api", C) == DISABLED and checker.in_service("api") == (C,)
    assert (changes[-1].old.state, changes[-1].new) == (TargetState.HEALTHY, DISABLED)


def test_update_groups() -> None:
    checker, clock, changes = make(group("web", A, B, delay=60), group("old", C, delay=30))
    checker.observe("web", A, PASS)
    heavier = Target(A.address, weight=5)
    checker.update_groups([group("web", heavier, C, delay=60), group("new", B)])
    web = checker.health("web")
    assert web[heavier].state is TargetState.HEALTHY  # same endpoint: a new weight keeps its health
    assert web[B].state is TargetState.DRAINING and web[C].health == REGISTERING
    assert checker.draining("old") == (C,) and checker.registered("new") == (B,)
    clock.now += 30
    assert checker.health("old") == {}  # a removed group is forgotten once drained
    clock.now += 30
    assert checker.registered("web") == (heavier, C)
    assert {(c.group, c.new.state) for c in changes} >= {("new", TargetState.INITIAL), ("old", TargetState.UNUSED)}


def test_a_new_group_port_is_a_new_endpoint() -> None:
    checker, _, _ = make(group("web", A, port=80))
    checker.update_groups([group("web", A, port=8080)])
    [old, new] = checker.health("web").values()
    assert (old.port, old.state, new.port, new.state) == (80, TargetState.DRAINING, 8080, TargetState.INITIAL)
    assert checker.draining("web") == (Target(A.address, port=80),)  # pinned to the port it drains on
    assert checker.in_service("web") == (A,)


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="matcher"):
        HealthChecker([group("web", check=HealthCheck(matcher="ok"))])
    with pytest.raises(ValueError, match="duplicate"):
        HealthChecker([group("web"), group("web")])
    with pytest.raises(ValueError, match="path"):
        HealthChecker([group("web", check=HealthCheck(path="/a b"))])


def test_on_change_sees_the_whole_update() -> None:
    seen: list[tuple[str, Target, TargetState, tuple[Target, ...], tuple[Target, ...]]] = []

    def on_change(change: StateChange) -> None:  # the controller reconciles here: it queries the checker
        seen.append((change.group, change.target, change.new.state, checker.registered("web"),
                     checker.registered("old")))

    checker = HealthChecker([group("web", A, B), group("old", C, delay=0)], on_change=on_change)
    checker.update_groups([group("web", B, C, delay=0)])
    assert [s[:3] for s in seen] == [
        ("old", C, TargetState.DRAINING),
        ("web", A, TargetState.DRAINING),
        ("web", C, TargetState.INITIAL),
        ("web", A, TargetState.UNUSED),
        ("old", C, TargetState.UNUSED),
    ]
    assert all(s[3:] == ((B, C), ()) for s in seen)  # each callback saw the reload complete


def test_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    checker, _, _ = make(group("web", A, check=HealthCheck(unhealthy_threshold=2)))
    checker.observe("web", A, PASS)
    with caplog.at_level(logging.INFO, logger="lb.health"):
        checker.observe("web", A, FAIL)
        checker.observe("web", A, FAIL)
    assert caplog.messages == ["web 10.0.1.11:80: healthy -> unhealthy (Target.Timeout: Request timed out)"]


def test_a_failing_on_change_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    def boom(change: StateChange) -> None:
        raise RuntimeError("boom")

    checker = HealthChecker([group("web", A)], on_change=boom)
    with caplog.at_level(logging.ERROR, logger="lb.health"):
        checker.observe("web", A, PASS)
    assert checker.target_health("web", A) == HEALTHY
    assert "on_change failed" in caplog.text


# --- the status line protocol (no sockets) -------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)


@pytest.mark.parametrize("chunks, outcome", [
    ([b"HTTP/1.1 200 OK\r\n\r\n"], 200),
    ([b"HTT", b"P/1.0 404", b" Not Found\r", b"\nbody"], 404),
    ([b"HTTP/1.1 204\n"], 204),
    ([b"SSH-2.0-OpenSSH\r\n"], "Invalid HTTP response"),
    ([b"HTTP/1.1 200 OK"], "Connection closed before a response"),
    ([b"x" * 9000], "Status line too long"),
])
def test_status_line_protocol(chunks: list[bytes], outcome: int | str) -> None:
    async def main() -> None:
        status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        protocol, transport = StatusLineProtocol(b"GET / HTTP/1.1\r\n\r\n", status), FakeTransport()
        protocol.connection_made(transport)
        assert transport.written == b"GET / HTTP/1.1\r\n\r\n"
        for chunk in chunks:
            protocol.data_received(chunk)
        protocol.eof_received()
        protocol.connection_lost(None)
        if isinstance(outcome, int):
            assert await status == outcome
        else:
            with pytest.raises(Exception, match=outcome):
                await status

    run(main())


# --- single checks against real loopback sockets ------------------------------------


@pytest.mark.parametrize("loop", LOOPS)
def test_http_checks(loop: str) -> None:
    async def main() -> None:
        async with Backend(200) as ok, Backend(503) as down, Backend(None) as silent, Backend(204) as empty:
            matcher = Matcher.parse("200")
            result = await check_http(LOCALHOST, ok.port, timeout=1.0, matcher=matcher, path="/health")
            assert (result.ok, result.status, result.reason) == (True, 200, None)
            assert 0 < result.latency_ms < 1000
            [request] = ok.requests
            assert request == (f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{ok.port}\r\nUser-Agent: lb-health/1\r\n"
                               "Accept: */*\r\nConnection: close\r\n\r\n").encode()

            result = await check_http(LOCALHOST, down.port, timeout=1.0, matcher=matcher)
            assert (result.ok, result.reason, result.status) == (False, TargetReason.RESPONSE_CODE_MISMATCH, 503)
            assert result.description == "Health checks failed with these codes: [503]"

            result = await check_http(LOCALHOST, empty.port, timeout=1.0, matcher=Matcher.parse("200-299"),
                                      method="HEAD")
            assert result.ok and empty.requests[0].startswith(b"HEAD / HTTP/1.1\r\n")

            start = time.monotonic()
            result = await check_http(LOCALHOST, silent.port, timeout=0.2, matcher=matcher)
            assert (result.reason, result.description) == (TargetReason.TIMEOUT, "Request timed out")
            assert 0.19 <= time.monotonic() - start < 0.5 and result.latency_ms >= 190  # uvloop timers: 1 ms

            result = await check_http(LOCALHOST, closed_port(), timeout=1.0, matcher=matcher)
            assert (result.reason, result.description) == (TargetReason.FAILED_HEALTH_CHECKS, "Connection refused")

    run(main(), loop=loop)


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp_checks(loop: str) -> None:
    async def main() -> None:
        async with Backend(None) as backend:
            result = await check_tcp(LOCALHOST, backend.port, timeout=1.0)
            assert (result.ok, result.description) == (True, "Connected")
            result = await check_tcp(LOCALHOST, closed_port(), timeout=1.0)
            assert (result.ok, result.reason, result.description) == (
                False, TargetReason.FAILED_HEALTH_CHECKS, "Connection refused")
            await asyncio.sleep(0.01)  # the server side sees the close
            assert not backend.connections

    run(main(), loop=loop)


def test_check_target_uses_the_check_port() -> None:
    async def main() -> None:
        async with Backend(200) as backend:
            tcp = HealthCheck(protocol=HealthCheckProtocol.TCP, port=backend.port, timeout=1)
            assert (await check_target(tcp, LOCALHOST, traffic_port=closed_port())).ok
            http = HealthCheck(timeout=1)
            assert (await check_target(http, LOCALHOST, traffic_port=backend.port)).status == 200

    run(main())


# --- the checker running on real sockets ---------------------------------------------


def test_registration_then_initial_checking() -> None:
    async def main() -> None:
        async with Backend(None) as silent:
            target = Target(LOCALHOST, port=silent.port)
            checker = HealthChecker([group("web", target, check=fast_check(interval=0.3, timeout=1))])
            assert checker.target_health("web", target) == REGISTERING

            async def body() -> None:
                await wait_for(lambda: checker.target_health("web", target) == INITIAL_CHECKING, 0.5)
                await wait_for(lambda: bool(silent.connections), 0.5)
                assert checker.target_health("web", target) == INITIAL_CHECKING

            await running(checker, body)

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_backend_stopped_and_restarted(loop: str) -> None:
    interval, unhealthy_threshold, healthy_threshold = 0.2, 2, 3
    slack = 0.15  # scheduling on a busy CI host

    async def main() -> None:
        backend = await Backend(200).start()
        try:
            target = Target(LOCALHOST, port=backend.port)
            check = fast_check(interval=interval, timeout=0.1, healthy_threshold=healthy_threshold,
                               unhealthy_threshold=unhealthy_threshold)
            changes: list[StateChange] = []
            checker = HealthChecker([group("web", target, check=check)], on_change=changes.append)
            record = checker.health("web")[target]
            passes_at_change: list[int] = []

            def state() -> TargetState:
                return record.state

            async def body() -> None:
                await wait_for(lambda: state() is TargetState.HEALTHY, interval + slack)
                await backend.stop()
                took = await wait_for(lambda: state() is TargetState.UNHEALTHY,
                                      interval * (1 + JITTER) * (unhealthy_threshold + 1) + slack)
                assert took >= interval * (1 - JITTER) * (unhealthy_threshold - 1)
                assert record.health.reason is TargetReason.FAILED_HEALTH_CHECKS
                assert checker.in_service("web") == (target,)  # the only target: fail open
                await backend.start(backend.port)
                took = await wait_for(lambda: state() is TargetState.HEALTHY,
                                      interval * (1 + JITTER) * (healthy_threshold + 1) + slack)
                assert took >= interval * (1 - JITTER) * (healthy_threshold - 1)
                passes_at_change.append(record.consecutive_passes)

            await running(checker, body)
            assert passes_at_change == [healthy_threshold]
            assert [c.new.state for c in changes] == [TargetState.HEALTHY, TargetState.UNHEALTHY, TargetState.HEALTHY]
        finally:
            await backend.stop()

    run(main(), loop=loop)


def test_reload_applies_at_the_next_check() -> None:
    async def main() -> None:
        async with Backend(200) as backend:
            target = Target(LOCALHOST, port=backend.port)
            check = fast_check(interval=0.1, timeout=0.5, unhealthy_threshold=2)
            checker = HealthChecker([group("web", target, check=check)])

            async def body() -> None:
                await wait_for(lambda: checker.target_health("web", target) == HEALTHY, 1.0)
                stricter = fast_check(interval=0.1, timeout=0.5, unhealthy_threshold=2, matcher="202")
                checker.update_groups([group("web", target, check=stricter, delay=0)])
                await wait_for(lambda: checker.target_health("web", target).state is TargetState.UNHEALTHY, 1.0)
                assert checker.target_health("web", target).reason is TargetReason.RESPONSE_CODE_MISMATCH
                requests = len(backend.requests)
                checker.update_groups([group("web", delay=0)])  # deregistered: checks stop
                assert checker.target_health("web", target) == NOT_REGISTERED
                await asyncio.sleep(0.25)
                assert len(backend.requests) == requests

            await running(checker, body)

    run(main())


def test_draining_ends_on_time_while_running() -> None:
    async def main() -> None:
        changes: list[StateChange] = []
        checker = HealthChecker([group("web", A, check=HealthCheck(enabled=False))], on_change=changes.append)

        async def body() -> None:
            fractional = TargetGroup("web", Protocol.HTTP, 80, health_check=HealthCheck(enabled=False),
                                     deregistration_delay=0.2)  # type: ignore[arg-type]  # float: keeps the test short
            checker.update_groups([fractional])
            took = await wait_for(lambda: len(changes) == 2, 1.0)  # nobody asks: the checker's own timer
            assert 0.15 <= took < 0.5 and changes[-1].new == NOT_REGISTERED

        await running(checker, body)

    run(main())


@pytest.mark.parametrize("loop", LOOPS)
def test_300_targets_one_round_within_an_interval(loop: str) -> None:
    interval, delay, n = 1.0, 0.05, 300  # serialised, one round would take n × delay = 15 s

    async def main() -> None:
        async with Backend(200, delay=delay) as backend:
            targets = [Target(LOCALHOST, port=10000 + k) for k in range(n)]
            check = fast_check(interval=interval, timeout=0.5, port=backend.port)
            checker = HealthChecker([group("web", *targets, check=check)])
            records = list(checker.health("web").values())

            async def body() -> None:
                start = time.monotonic()
                took = await wait_for(lambda: all(r.last_checked is not None for r in records), interval + 0.5)
                assert took < interval + delay + 0.3
                assert all(r.state is TargetState.HEALTHY for r in records)
                firsts = sorted(r.last_checked - start for r in records if r.last_checked is not None)
                assert firsts[-1] - firsts[0] > interval / 2  # spread over the interval, not one burst
                assert len(backend.requests) >= n

            await running(checker, body)

    run(main(), loop=loop)
