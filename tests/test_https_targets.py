"""HTTPS target groups: TLS from lb to its targets, and HTTPS health checks.

Real TLS targets (tests.l7_backends.backend with a server context) with
certificates made in the test (tests.tls_certs.Certs): a target's
certificate is accepted whatever it is without a CA bundle (as ALB), and
verified against the bundle with one; a refusal is a 502 whose access log
line says TargetSSLHandshakeError, and an HTTPS health check that fails the
same way says why in the target's description (`lb targets`).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path
from typing import cast

import pytest
import trustme

from lb import config as configmod
from lb import model as m
from lb import tls
from lb.health.checker import HealthChecker
from lb.health.checks import check_target
from tests.l7_backends import (
    Client,
    backend,
    forward_to,
    http_listener,
    proxy,
    read_access_log,
    routing_table,
    run,
    target_group,
)
from tests.tls_certs import Certs

LOCAL = ipaddress.ip_address("127.0.0.1")


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def server_context(certs: Certs, expired: bool = False) -> ssl.SSLContext:
    """A target's server context: a certificate of the test CA for 127.0.0.1, or one expired yesterday."""
    now = datetime.datetime.now(datetime.timezone.utc)
    when = {"not_before": now - datetime.timedelta(days=30), "not_after": now - datetime.timedelta(days=1)}
    cert, key = certs.files("127.0.0.1", **(when if expired else {}))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def bundle(certs: Certs, ca: trustme.CA | None = None) -> m.TargetTls:
    """A TargetTls verifying against ``ca`` (the test CA by default), as lb.config reads it."""
    path = certs.dir / f"ca{id(ca)}.pem"
    (ca or certs.ca).cert_pem.write_to_path(str(path))
    return m.TargetTls(str(path), tls.read_ca_bundle(str(path)))


class _PlainHttp(asyncio.Protocol):
    """A plain HTTP server spoken TLS to: answers the ClientHello with a 400, as nginx does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        self.transport.close()


async def plain_http_server() -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(_PlainHttp, "127.0.0.1", 0)


# --- the proxy ------------------------------------------------------------------------------------


def test_https_target_gets_tls_and_keeps_its_connection(certs: Certs) -> None:
    async def body() -> None:
        async with backend("http", "secure", tls=server_context(certs)) as b:
            groups = (target_group("g", b, tls=m.TargetTls()),)
            async with proxy(routing_table(http_listener(forward_to("g")), groups)) as (_, port):
                async with await Client.open(port) as client:
                    for size in (0, 200_000):  # a body both ways: 200 kB up, the echo's JSON down
                        response = await client.request("POST", "/x", body=b"y" * size)
                        assert response.status == 200, response
                        assert response.json()["body_len"] == size
            assert b.stats.connections == 1  # TLS once, then the kept-alive connection
            ssl_object = b.protocols[0].transport.get_extra_info("ssl_object")
            assert ssl_object is not None and ssl_object.version() in ("TLSv1.2", "TLSv1.3")

    run(body())


def test_plain_http_target_behind_an_https_group_is_a_tls_failure(certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def body() -> None:
        server = await plain_http_server()
        try:
            groups = (target_group("g", ("127.0.0.1", server.sockets[0].getsockname()[1], 1), tls=m.TargetTls()),)
            table = routing_table(http_listener(forward_to("g")), groups, access_log=str(log))
            async with proxy(table) as (_, port), await Client.open(port) as client:
                assert (await client.request()).status == 502
        finally:
            server.close()

    run(body())
    assert read_access_log(log)[0]["error_reason"] == "TargetSSLHandshakeError"


@pytest.mark.parametrize(
    ("expired", "verify", "status"),
    [
        (False, "none", 200),
        (True, "none", 200),  # no CA bundle: any certificate, as ALB
        (False, "ca", 200),  # the bundle has the target's CA
        (True, "ca", 502),  # ...but the certificate expired
        (False, "other-ca", 502),  # a bundle of another CA
    ],
)
def test_ca_bundle_verifies_target_certificates(certs: Certs, tmp_path: Path, expired: bool, verify: str,
                                                status: int) -> None:
    log = tmp_path / "access.log"
    target_tls = {"none": m.TargetTls(), "ca": bundle(certs), "other-ca": bundle(certs, trustme.CA())}[verify]

    async def body() -> None:
        async with backend("http", "t", tls=server_context(certs, expired)) as b:
            groups = (target_group("g", b, tls=target_tls),)
            table = routing_table(http_listener(forward_to("g")), groups, access_log=str(log))
            async with proxy(table) as (_, port), await Client.open(port) as client:
                assert (await client.request()).status == status

    run(body())
    line = read_access_log(log)[0]
    assert line["error_reason"] == (None if status == 200 else "TargetSSLHandshakeError")


def test_one_endpoint_in_an_http_and_an_https_group_has_a_pool_each(certs: Certs) -> None:
    # The same address:port, once plain and once with TLS: connections must not be shared.
    async def body() -> None:
        async with backend("http", "t", tls=server_context(certs)) as b:
            rule = m.Rule(1, (m.Condition(m.ConditionField.PATH_PATTERN, ("/plain",)),), forward_to("plain"))
            groups = (target_group("secure", b, tls=m.TargetTls()), target_group("plain", b))
            async with proxy(routing_table(http_listener(forward_to("secure"), (rule,)), groups)) as (worker, port):
                async with await Client.open(port) as client:
                    assert (await client.request()).status == 200
                    assert (await client.request(path="/plain")).status == 502  # plain HTTP to a TLS port
                    assert (await client.request()).status == 200
                assert {key[2] is not None for key in worker.pools.pools} == {True, False}

    run(body())


def test_websocket_through_an_https_target(certs: Certs) -> None:
    async def body() -> None:
        async with backend("websocket", tls=server_context(certs)) as ws:
            groups = (target_group("g", ws, tls=m.TargetTls()),)
            async with proxy(routing_table(http_listener(forward_to("g")), groups)) as (_, port):
                client = await Client.open(port)
                assert (await client.upgrade_to_websocket()).startswith(b"HTTP/1.1 101 ")
                assert await client.websocket_echo(2, b"z" * 50000) == b"z" * 50000
                client.writer.write_eof()  # a half-close toward a TLS target: the tunnel closes
                assert await client.closed_by_peer()
                await client.close()

    run(body())


# --- health checks ----------------------------------------------------------------------------------

HTTPS_CHECK = m.HealthCheck(protocol=m.HealthCheckProtocol.HTTPS, timeout=3)


@pytest.mark.parametrize(
    ("expired", "verify", "ok", "description"),
    [
        (False, "none", True, "HTTP 200"),
        (True, "none", True, "HTTP 200"),
        (True, "ca", False, "TLS: certificate verify failed: certificate has expired"),
        (False, "other-ca", False, "TLS: certificate verify failed: unable to get local issuer certificate"),
    ],
)
def test_https_health_check(certs: Certs, expired: bool, verify: str, ok: bool, description: str) -> None:
    target_tls = {"none": m.TargetTls(), "ca": bundle(certs), "other-ca": bundle(certs, trustme.CA())}[verify]

    async def body() -> None:
        async with backend("http", tls=server_context(certs, expired)) as b:
            result = await check_target(HTTPS_CHECK, LOCAL, b.port, target_tls)
            assert (result.ok, result.description) == (ok, description)

    run(body())


def test_https_health_check_of_a_plain_target_says_tls_failed() -> None:
    async def body() -> None:
        server = await plain_http_server()
        try:
            result = await check_target(HTTPS_CHECK, LOCAL, server.sockets[0].getsockname()[1], m.TargetTls())
            assert (result.ok, result.description) == (False, "TLS handshake failed: WRONG_VERSION_NUMBER"), result
            assert result.reason is m.TargetReason.FAILED_HEALTH_CHECKS
        finally:
            server.close()

    run(body())


def test_refused_certificate_is_the_checkers_reason(certs: Certs) -> None:
    async def body() -> None:
        async with backend("http", tls=server_context(certs, expired=True)) as b:
            check = m.HealthCheck(protocol=m.HealthCheckProtocol.HTTPS, interval=5, timeout=2,
                                  unhealthy_threshold=2)
            group = m.TargetGroup("g", m.Protocol.HTTP, b.port, (m.Target(LOCAL),), check, tls=bundle(certs))
            checker = HealthChecker([group])
            task = asyncio.get_running_loop().create_task(checker.run())
            try:
                await checker.first_round(5.0)
                record = checker.health("g")[group.targets[0]]
            finally:
                checker.stop()
                await task
            # What `lb targets` says of it once the unhealthy threshold is reached (states.py).
            assert record.last_result is not None and not record.last_result.ok
            assert record.last_result.description == "TLS: certificate verify failed: certificate has expired"

    run(body())


# --- configuration ----------------------------------------------------------------------------------


def group_config(extra: str, protocol: str = "HTTPS") -> str:
    return f"""
[load_balancer]
name = "t"
[[listeners]]
name = "web"
protocol = "HTTP"
address = "127.0.0.1"
port = 8080
default_action = {{ type = "forward", target_group = "g" }}
[[target_groups]]
name = "g"
protocol = "{protocol}"
port = 443
targets = [{{ id = "127.0.0.1" }}]
{extra}
"""


def _issues(text: str) -> list[str]:
    with pytest.raises(configmod.ConfigError) as caught:
        configmod.loads(text)
    return [str(issue) for issue in caught.value.errors]


def test_https_group_config(certs: Certs, tmp_path: Path) -> None:
    lb = configmod.loads(group_config(""))
    group = lb.target_groups[0]
    assert group.scheme == "HTTPS" and group.tls == m.TargetTls() and group.protocol is m.Protocol.HTTP
    assert group.health_check.protocol is m.HealthCheckProtocol.HTTPS  # the group's protocol by default
    ca = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(ca))
    path = tmp_path / "lb.toml"
    path.write_text(group_config('ca_bundle = "ca.pem"'))  # relative to the config file
    group = configmod.load(path).target_groups[0]
    assert group.tls is not None and group.tls.ca_bundle == str(ca) and b"BEGIN CERTIFICATE" in group.tls.ca_pem
    http = configmod.loads(group_config('health_check = { protocol = "HTTP" }')).target_groups[0]
    assert http.health_check.protocol is m.HealthCheckProtocol.HTTP


def test_bad_ca_bundles_are_named(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    missing = tmp_path / "missing.pem"
    assert _issues(group_config(f'ca_bundle = "{missing}"')) == [
        f"target_groups[0].ca_bundle: {missing}: cannot read: No such file or directory"]
    assert _issues(group_config(f'ca_bundle = "{garbage}"')) == [
        f"target_groups[0].ca_bundle: {garbage}: no PEM certificate in it"]
    assert _issues(group_config(f'ca_bundle = "{garbage}"', "HTTP")) == [
        "target_groups[0].ca_bundle: only for HTTPS target groups; this one is HTTP"]
