"""One health check against one target: no state, no schedule.

HTTP checks send a minimal ``Connection: close`` request and read only the
status line (:class:`StatusLineProtocol`, testable without sockets); HTTPS
checks are HTTP checks over TLS, made with the group's client context
(:func:`lb.tls.target_context`: the certificate verified only against the
group's CA bundle, if it has one); TCP checks only connect. A target's failure never raises: it is a failed
:class:`CheckResult` carrying ELB's reason code. :class:`Matcher` reads
ELB's success codes ("200", "200,202", "200-299").
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
import time
from dataclasses import dataclass
from typing import cast

from lb import tls
from lb.model import HealthCheck, HealthCheckProtocol, IPAddress, TargetReason, TargetTls

USER_AGENT = "lb-health/1"
MAX_STATUS_LINE = 8192  # bytes read looking for the status line


# --- matcher -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Matcher:
    """Success codes: "200", "200,202", "200-299", or a comma list of those."""

    ranges: tuple[tuple[int, int], ...]

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def parse(spec: str) -> Matcher:
        ranges = []
        for part in spec.split(","):
            lo, dash, hi = part.strip().partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise ValueError(f"{spec!r} is not a valid matcher: use '200', '200,202' or '200-299'")
            first, last = int(lo), int(hi) if dash else int(lo)
            if not 100 <= first <= last <= 599:
                raise ValueError(f"{spec!r} is not a valid matcher: {part.strip()!r} is not within 100..599")
            ranges.append((first, last))
        return Matcher(tuple(ranges))

    def __contains__(self, code: object) -> bool:
        return isinstance(code, int) and any(lo <= code <= hi for lo, hi in self.ranges)


# --- one check -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The outcome of one check; reason is None when it passed."""

    ok: bool
    description: str
    latency_ms: float
    reason: TargetReason | None = None
    status: int | None = None  # HTTP status code, when one was read

    @classmethod
    def failed(cls, reason: TargetReason, description: str, latency_ms: float = 0.0,
               status: int | None = None) -> CheckResult:
        return cls(False, description, latency_ms, reason, status)


class MalformedResponse(Exception):
    """The target did not answer with an HTTP status line."""


class StatusLineProtocol(asyncio.Protocol):
    """Sends the request on connect; resolves `status` with the status code."""

    def __init__(self, request: bytes, status: asyncio.Future[int]) -> None:
        self.request = request
        self.status = status
        self.buffer = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(self.request)  # uvloop's are no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.status.done():
            return  # the body: ignored
        self.buffer += data
        line, newline, _ = self.buffer.partition(b"\n")
        if not newline:
            if len(self.buffer) > MAX_STATUS_LINE:
                self.status.set_exception(MalformedResponse("Status line too long"))
            return
        match = re.fullmatch(rb"HTTP/1\.[01] ([1-5]\d\d)(?: [^\r\n]*)?\r?", line)
        if match is None:
            self.status.set_exception(MalformedResponse("Invalid HTTP response"))
        else:
            self.status.set_result(int(match[1]))

    def eof_received(self) -> bool:
        self._fail(MalformedResponse("Connection closed before a response"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or MalformedResponse("Connection closed before a response"))

    def _fail(self, exc: BaseException) -> None:
        if not self.status.done():
            self.status.set_exception(exc)


def _failure(exc: Exception) -> tuple[TargetReason, str]:
    why = tls.tls_failure(exc)
    if why is not None:  # before OSError: ssl.SSLError is one
        return TargetReason.FAILED_HEALTH_CHECKS, why
    if isinstance(exc, TimeoutError):
        return TargetReason.TIMEOUT, "Request timed out"
    if isinstance(exc, ConnectionRefusedError):
        return TargetReason.FAILED_HEALTH_CHECKS, "Connection refused"
    if isinstance(exc, ConnectionResetError):
        return TargetReason.FAILED_HEALTH_CHECKS, "Connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return TargetReason.FAILED_HEALTH_CHECKS, exc.strerror
    return TargetReason.FAILED_HEALTH_CHECKS, str(exc) or type(exc).__name__


def _family(address: IPAddress) -> socket.AddressFamily:
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


async def check_http(address: IPAddress, port: int, *, timeout: float, matcher: Matcher,
                     method: str = "GET", path: str = "/", context: ssl.SSLContext | None = None) -> CheckResult:
    """One HTTP check (HTTPS with a `context`): pass when the status code is in `matcher`."""
    loop = asyncio.get_running_loop()
    request = (f"{method} {path} HTTP/1.1\r\nHost: {hostport(address, port)}\r\n"
               f"User-Agent: {USER_AGENT}\r\nAccept: */*\r\nConnection: close\r\n\r\n").encode("ascii")
    start = time.perf_counter()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            status: asyncio.Future[int] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda: StatusLineProtocol(request, status), str(address), port, family=_family(address),
                ssl=context, server_hostname="" if context is not None else None)
            code = await status
    except Exception as exc:  # noqa: BLE001 - every failure is a failed check
        return CheckResult.failed(*_failure(exc), (time.perf_counter() - start) * 1000)
    finally:
        if transport is not None:
            transport.close()
    latency_ms = (time.perf_counter() - start) * 1000
    if code in matcher:
        return CheckResult(True, f"HTTP {code}", latency_ms, status=code)
    return CheckResult.failed(TargetReason.RESPONSE_CODE_MISMATCH,
                              f"Health checks failed with these codes: [{code}]", latency_ms, code)


async def check_tcp(address: IPAddress, port: int, *, timeout: float) -> CheckResult:
    """One TCP check: pass when the connection is established."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(asyncio.Protocol, str(address), port,
                                                        family=_family(address))
    except Exception as exc:  # noqa: BLE001 - every failure is a failed check
        return CheckResult.failed(*_failure(exc), (time.perf_counter() - start) * 1000)
    transport.close()
    return CheckResult(True, "Connected", (time.perf_counter() - start) * 1000)


@functools.lru_cache(maxsize=64)
def _context(target: TargetTls) -> ssl.SSLContext:
    # One per group's settings (a reload with another bundle makes another),
    # not one per check: building one reads the bundle again.
    return tls.target_context(target)


async def check_target(check: HealthCheck, address: IPAddress, traffic_port: int,
                       target_tls: TargetTls | None = None) -> CheckResult:
    """Run `check` once against a target listening on `traffic_port`
    (``target_tls``: its group's, for the CA bundle of HTTPS checks)."""
    port = check.port if check.port is not None else traffic_port
    if check.protocol is HealthCheckProtocol.TCP:
        return await check_tcp(address, port, timeout=check.timeout)
    context = None
    if check.protocol is HealthCheckProtocol.HTTPS:
        context = _context(target_tls or TargetTls())
    return await check_http(address, port, timeout=check.timeout, matcher=Matcher.parse(check.matcher),
                            method=check.method, path=check.path, context=context)
