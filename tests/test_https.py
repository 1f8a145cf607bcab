"""HTTPS listeners: real TLS handshakes against certificates made in the test.

The proxy serves in the test's loop (:func:`tests.l7_backends.proxy`); the
blocking client (:func:`tests.tls_certs.tls_request`) runs in a thread.
Covered: the SNI choice, each ELB policy's versions and ciphers, ALPN,
session resumption, certificates replaced under an open connection, the
forwarded headers and redirects of an HTTPS listener, WebSocket over TLS,
and every bad certificate lb.config refuses, with its message.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
from pathlib import Path

import pytest

from lb import config as configmod
from lb import model as m
from lb import tls
from lb.l7.config import L7Config
from tests.l7_backends import (
    Client,
    backend,
    forward_to,
    free_port,
    http_listener,
    proxy,
    routing_table,
    run,
    target_group,
)
from tests.tls_certs import Certs, tls_request

V = ssl.TLSVersion


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def fixed(text: str = "ok") -> m.FixedResponseAction:
    return m.FixedResponseAction(200, "text/plain", text)


# --- SNI ------------------------------------------------------------------------------

SNI_CASES = [
    ("www.example.com", ("www.example.com",)),  # the default certificate's own name
    ("api.example.com", ("api.example.com",)),  # exact, in the list
    ("API.Example.COM", ("api.example.com",)),  # names are case-insensitive
    ("a.wild.example", ("*.wild.example",)),  # wildcard
    ("exact.wild.example", ("exact.wild.example",)),  # exact beats the wildcard
    ("b.a.wild.example", ("www.example.com",)),  # a wildcard covers one label: default
    ("wild.example", ("www.example.com",)),  # nor the bare domain
    ("unknown.test", ("www.example.com",)),  # unknown name: default
    (None, ("www.example.com",)),  # no SNI: default
]


@pytest.mark.parametrize(("server_name", "names"), SNI_CASES)
def test_sni_selects_exact_then_wildcard_then_default(
    certs: Certs, server_name: str | None, names: tuple[str, ...]
) -> None:
    listener_tls = certs.listener_tls(
        "www.example.com", others=(("*.wild.example",), ("api.example.com",), ("exact.wild.example",))
    )

    async def body() -> None:
        async with proxy(routing_table(http_listener(fixed(), tls=listener_tls))) as (_, port):
            shake = await asyncio.to_thread(tls_request, port, certs.client(), server_name)
            assert shake.names == names
            assert shake.response.startswith(b"HTTP/1.1 200 ")

    run(body())


# --- security policies ------------------------------------------------------------------

POLICY_VERSIONS = {
    "ELBSecurityPolicy-TLS13-1-2-2021-06": {V.TLSv1_2, V.TLSv1_3},
    "ELBSecurityPolicy-TLS13-1-3-2021-06": {V.TLSv1_3},
    "ELBSecurityPolicy-TLS13-1-2-Res-2021-06": {V.TLSv1_2, V.TLSv1_3},
    "ELBSecurityPolicy-FS-1-2-Res-2020-10": {V.TLSv1_2},
    "ELBSecurityPolicy-FS-2018-06": {V.TLSv1, V.TLSv1_1, V.TLSv1_2},
    "ELBSecurityPolicy-TLS13-1-0-2021-06": {V.TLSv1, V.TLSv1_1, V.TLSv1_2, V.TLSv1_3},
}
# TLS 1.2 ciphers a client may pin; each policy accepts those of its table.
PROBE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-SHA256",
    "ECDHE-ECDSA-AES128-SHA", "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-SHA256", "AES128-GCM-SHA256", "AES256-SHA256", "AES128-SHA",
)  # fmt: skip


def _accepted(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        tls_request(port, ctx)
    except (ssl.SSLError, ConnectionError):
        return False
    return True


@pytest.mark.parametrize("policy", sorted(POLICY_VERSIONS))
def test_each_policy_accepts_its_versions_and_ciphers_and_refuses_the_rest(certs: Certs, policy: str) -> None:
    ecdsa = certs.listener_tls("www.example.com", policy=policy)
    rsa = certs.listener_tls("www.example.com", rsa=True, policy=policy)
    listeners = (http_listener(fixed(), name="ecdsa", tls=ecdsa), http_listener(fixed(), name="rsa", tls=rsa))

    async def body() -> None:
        async with proxy(routing_table(listeners)) as (worker, _):
            ports = {name: worker.addresses[name][1] for name in ("ecdsa", "rsa")}
            for version in (V.TLSv1, V.TLSv1_1, V.TLSv1_2, V.TLSv1_3):
                ok = await asyncio.to_thread(_accepted, ports["ecdsa"], certs.client(version))
                assert ok == (version in POLICY_VERSIONS[policy]), (policy, version)
            allowed = tls.POLICIES[policy].ciphers
            if V.TLSv1_2 in POLICY_VERSIONS[policy]:
                for cipher in PROBE_CIPHERS:
                    port = ports["ecdsa" if "ECDSA" in cipher else "rsa"]
                    ok = await asyncio.to_thread(_accepted, port, certs.client(V.TLSv1_2, cipher))
                    assert ok == (cipher in allowed), (policy, cipher)
            if V.TLSv1_3 in POLICY_VERSIONS[policy]:
                shake = await asyncio.to_thread(tls_request, ports["ecdsa"], certs.client(V.TLSv1_3))
                assert shake.cipher in tls.TLS13_SUITES

    run(body(), timeout=60)


def test_server_cipher_order_wins(certs: Certs) -> None:
    # The client prefers a CBC cipher; the policy's order puts AES128-GCM first.
    async def body() -> None:
        listener = http_listener(fixed(), tls=certs.listener_tls("www.example.com"))
        async with proxy(routing_table(listener)) as (_, port):
            ctx = certs.client(V.TLSv1_2, "ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-GCM-SHA256")
            shake = await asyncio.to_thread(tls_request, port, ctx)
            assert shake.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256"

    run(body())


def test_policy_table_names_the_policies_asked_for() -> None:
    for name in ("ELBSecurityPolicy-TLS13-1-2-2021-06", "ELBSecurityPolicy-TLS13-1-3-2021-06",
                 "ELBSecurityPolicy-TLS13-1-2-Res-2021-06", "ELBSecurityPolicy-FS-1-2-Res-2020-10"):
        assert name in tls.POLICIES
    assert m.DEFAULT_SSL_POLICY == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    for policy in tls.POLICIES.values():  # OpenSSL knows every cipher of every policy
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        for cipher in policy.ciphers:
            ctx.set_ciphers(cipher + ":@SECLEVEL=0")


# --- ALPN, resumption ------------------------------------------------------------------------


def test_alpn_chooses_http11(certs: Certs) -> None:
    async def body() -> None:
        listener = http_listener(fixed(), tls=certs.listener_tls("www.example.com"))
        async with proxy(routing_table(listener)) as (_, port):
            shake = await asyncio.to_thread(tls_request, port, certs.client(alpn=("http/1.1",)))
            assert shake.alpn == "http/1.1"
            shake = await asyncio.to_thread(tls_request, port, certs.client())  # no ALPN: HTTP/1.1 anyway
            assert shake.alpn is None and shake.response.startswith(b"HTTP/1.1 200")

    run(body())


@pytest.mark.parametrize("version", [V.TLSv1_2, V.TLSv1_3])
def test_session_resumption(certs: Certs, version: ssl.TLSVersion) -> None:
    async def body() -> None:
        listener = http_listener(fixed(), tls=certs.listener_tls("www.example.com"))
        async with proxy(routing_table(listener)) as (_, port):
            ctx = certs.client(version)
            first = await asyncio.to_thread(tls_request, port, ctx)
            assert not first.reused and first.session is not None
            again = await asyncio.to_thread(tls_request, port, ctx, "www.example.com", first.session)
            assert again.reused and again.version == first.version

    run(body())


def test_tls_session_resumption_off_makes_every_handshake_full(certs: Certs, tmp_path: Path) -> None:
    # nginx's ssl_session_tickets off and ssl_session_cache off (TLS 1.2 resumes by session id without
    # tickets); what tests/bench/https.py runs `lb up` with (wrk resumes otherwise).
    cert, key = certs.files("www.example.com")
    path = tmp_path / "lb.toml"
    path.write_text(https_config(cert.name, key.name).replace('name = "t"', 'name = "t"\ntls_session_resumption = false'))
    config = L7Config.for_load_balancer(configmod.load(path), connect_timeout=2.0)
    assert not config.session_resumption and L7Config.for_load_balancer(configmod.loads(
        https_config(str(cert), str(key)))).session_resumption  # on by default, as ELB
    assert any("tls_session_resumption" in issue for issue in _issues(
        https_config(str(cert), str(key)).replace('name = "t"', 'name = "t"\ntls_session_resumption = "no"')))

    async def body() -> None:
        listener = http_listener(fixed(), tls=certs.listener_tls("www.example.com"))
        async with proxy(routing_table(listener), config) as (_, port):
            for version in (V.TLSv1_2, V.TLSv1_3):
                ctx = certs.client(version)
                first = await asyncio.to_thread(tls_request, port, ctx)
                again = await asyncio.to_thread(tls_request, port, ctx, "www.example.com", first.session)
                assert not again.reused

    run(body())


def test_shared_ticket_key_resumes_across_contexts(certs: Certs) -> None:
    # What lets a ticket from one worker resume on another: the same key.
    listener_tls = certs.listener_tls("www.example.com")
    key = os.urandom(tls.TICKET_KEY_BYTES)

    async def body() -> None:
        listeners = (http_listener(fixed("a"), name="a", tls=listener_tls),
                     http_listener(fixed("b"), name="b", tls=listener_tls))
        async with proxy(routing_table(listeners)) as (worker, _):
            ports = [worker.addresses[name][1] for name in ("a", "b")]
            ctx = certs.client(V.TLSv1_3)
            first = await asyncio.to_thread(tls_request, ports[0], ctx)
            other = await asyncio.to_thread(tls_request, ports[1], ctx, "www.example.com", first.session)
            assert not other.reused  # two listening contexts, two random keys
            worker.set_ticket_key(key)
            first = await asyncio.to_thread(tls_request, ports[0], ctx)
            other = await asyncio.to_thread(tls_request, ports[1], ctx, "www.example.com", first.session)
            assert other.reused and other.response.endswith(b"b")

    run(body())


# --- what an HTTPS listener forwards and answers -----------------------------------------------


def test_forwarded_proto_and_port_and_redirect_protocol(certs: Certs) -> None:
    async def body() -> None:
        async with backend("http", "b1") as b:
            rules = (m.Rule(1, (m.Condition(m.ConditionField.PATH_PATTERN, ("/old",)),),
                            m.RedirectAction(301, path="/new")),)
            listener = http_listener(forward_to("g"), rules, tls=certs.listener_tls("www.example.com"))
            async with proxy(routing_table(listener, (target_group("g", b),))) as (_, port):
                ctx = certs.client()
                async with await Client.open(port, ssl=ctx, server_hostname="www.example.com") as client:
                    seen = (await client.request("GET", "/x", host="www.example.com")).json()
                    headers = {name.lower(): value for name, value in seen["headers"]}
                    assert headers["x-forwarded-proto"] == "https"
                    assert headers["x-forwarded-port"] == str(port)
                    moved = await client.request("GET", "/old", host="www.example.com")
                    assert moved.header("location") == b"https://www.example.com:%d/new" % port

    run(body())


def test_websocket_over_tls(certs: Certs) -> None:
    async def body() -> None:
        async with backend("websocket") as ws:
            listener = http_listener(forward_to("g"), tls=certs.listener_tls("www.example.com"))
            async with proxy(routing_table(listener, (target_group("g", ws),))) as (_, port):
                client = await Client.open(port, ssl=certs.client(), server_hostname="www.example.com")
                assert (await client.upgrade_to_websocket()).startswith(b"HTTP/1.1 101 ")
                assert await client.websocket_echo(2, b"x" * 70000) == b"x" * 70000
                await client.close()

    run(body())


# --- certificates replaced at run time ---------------------------------------------------------


def test_renewed_certificate_served_to_new_handshakes_while_a_connection_stays(certs: Certs) -> None:
    async def body() -> None:
        async with backend("http", "b1") as b:
            old = certs.listener_tls("www.example.com")
            fixed_port = free_port()  # as L7Server resolves port 0 once for all workers
            listener = http_listener(forward_to("g"), port=fixed_port, tls=old)
            groups = (target_group("g", b),)
            async with proxy(routing_table(listener, groups)) as (worker, port):
                ctx = certs.client()
                before = await asyncio.to_thread(tls_request, port, ctx)
                async with await Client.open(port, ssl=ctx, server_hostname="www.example.com") as kept:
                    assert (await kept.request()).status == 200
                    renewed = certs.listener_tls("www.example.com", others=(("new.example.com",),))
                    renewed_listener = http_listener(forward_to("g"), port=fixed_port, tls=renewed)
                    await worker.update(routing_table(renewed_listener, groups, version=2))
                    after = await asyncio.to_thread(tls_request, port, ctx)
                    assert after.serial != before.serial
                    assert after.serial == int(_serial(renewed), 16)
                    added = await asyncio.to_thread(tls_request, port, ctx, "new.example.com")
                    assert added.names == ("new.example.com",)
                    assert (await kept.request()).status == 200  # the open connection goes on
                    # A new policy: a new listening socket on the same port, the connection still goes on.
                    strict = m.ListenerTls(renewed.default_certificate, (), "ELBSecurityPolicy-TLS13-1-3-2021-06")
                    strict_listener = http_listener(forward_to("g"), port=fixed_port, tls=strict)
                    await worker.update(routing_table(strict_listener, groups, version=3))
                    assert worker.addresses["web"][1] == port
                    assert not await asyncio.to_thread(_accepted, port, certs.client(V.TLSv1_2))
                    assert (await asyncio.to_thread(tls_request, port, certs.client(V.TLSv1_3))).version == "TLSv1.3"
                    assert (await kept.request()).status == 200

    run(body())


def _serial(listener_tls: m.ListenerTls) -> str:
    from cryptography import x509

    leaf = x509.load_pem_x509_certificate(listener_tls.default_certificate.chain)
    return format(leaf.serial_number, "x")


# --- configuration: HTTPS listeners and bad certificates -----------------------------------------


def https_config(cert: str, key: str | None = None, extra: str = "") -> str:
    key_line = f', key = "{key}"' if key is not None else ""
    return f"""
[load_balancer]
name = "t"
[[listeners]]
name = "web"
protocol = "HTTPS"
address = "127.0.0.1"
default_action = {{ type = "fixed-response", status_code = 200 }}
default_certificate = {{ certificate = "{cert}"{key_line} }}
{extra}
"""


def test_https_listener_config_defaults_and_relative_paths(certs: Certs, tmp_path: Path) -> None:
    cert, key = certs.files("www.example.com")
    other, _ = certs.files("api.example.com", split=False)
    path = tmp_path / "lb.toml"
    path.write_text(https_config(cert.name, key.name, f'certificates = [{{ certificate = "{other.name}" }}]'))
    lb = configmod.load(path)
    listener = lb.listeners[0]
    assert listener.port == 443 and listener.scheme == "HTTPS" and listener.protocol is m.Protocol.HTTP
    assert listener.tls is not None and listener.tls.ssl_policy == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    assert listener.tls.default_certificate.certificate_file == str(cert)
    assert listener.tls.default_certificate.names == ("www.example.com",)
    assert listener.tls.certificates[0].key_file == str(other)  # the key in the same file
    assert listener.tls.default_certificate.key_type == "ECDSA P-256"
    assert "PRIVATE KEY" not in repr(lb)  # keys never printed


def _issues(text: str) -> list[str]:
    with pytest.raises(configmod.ConfigError) as caught:
        configmod.loads(text)
    return [str(issue) for issue in caught.value.errors]


def test_bad_certificates_are_named_with_their_problem(certs: Certs, tmp_path: Path) -> None:
    cert, key = certs.files("www.example.com")
    _, other_key = certs.files("other.example.com")
    now = datetime.datetime.now(datetime.timezone.utc)
    expired, expired_key = certs.files("old.example.com", not_before=now - datetime.timedelta(days=30),
                                       not_after=now - datetime.timedelta(days=1))
    future, future_key = certs.files("new.example.com", not_before=now + datetime.timedelta(days=1),
                                     not_after=now + datetime.timedelta(days=30))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello\n")
    encrypted = tmp_path / "encrypted.pem"
    encrypted.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n")
    missing = tmp_path / "missing.pem"
    at = "listeners[0].default_certificate"
    cases = [
        (https_config(str(missing), str(key)), f"{at}.certificate: {missing}: cannot read: No such file or directory"),
        (https_config(str(tmp_path), str(key)), f"{at}.certificate: {tmp_path}: cannot read: Is a directory"),
        (https_config(str(cert), str(missing)), f"{at}.key: {missing}: cannot read: No such file or directory"),
        (https_config(str(cert), str(other_key)),
         f"{at}.key: {other_key}: the private key does not match the certificate in {cert}"),
        (https_config(str(expired), str(expired_key)), f"{at}.certificate: {expired}: the certificate expired on "),
        (https_config(str(future), str(future_key)),
         f"{at}.certificate: {future}: the certificate is not valid before "),
        (https_config(str(garbage), str(key)), f"{at}.certificate: {garbage}: no PEM certificate in it"),
        (https_config(str(cert), str(garbage)), f"{at}.key: {garbage}: no PEM private key in it"),
        (https_config(str(cert), str(encrypted)),
         f"{at}.key: {encrypted}: the private key is encrypted; lb needs it unencrypted"),
        (https_config(str(cert)), f"{at}.certificate: {cert}: no PEM private key in it"),
    ]
    for text, message in cases:
        issues = _issues(text)
        assert len(issues) == 1 and issues[0].startswith(message), (message, issues)


def test_tls_keys_only_on_https_listeners_and_policies_by_name(certs: Certs) -> None:
    cert, key = certs.files("www.example.com")
    issues = _issues(https_config(str(cert), str(key), 'ssl_policy = "ELBSecurityPolicy-TLS13-1-2-2021-07"'))
    assert issues[0].startswith("listeners[0].ssl_policy: 'ELBSecurityPolicy-TLS13-1-2-2021-07' is not one of ")
    assert "(did you mean 'ELBSecurityPolicy-TLS13-1-2-2021-06'?)" in issues[0]
    text = https_config(str(cert), str(key)).replace('"HTTPS"', '"HTTP"')
    text = text.replace("[[listeners]]", "[[listeners]]\nport = 80")
    assert _issues(text) == ["listeners[0].default_certificate: only for HTTPS listeners; this one is HTTP"]
    no_cert = https_config(str(cert), str(key)).replace("default_certificate", "# default_certificate")
    assert _issues(no_cert) == ["listeners[0].default_certificate: required key is missing"]


# --- worker processes: one ticket key for all, rotated -------------------------------------------


def test_tickets_resume_on_every_worker_until_the_key_rotates(certs: Certs) -> None:
    from lb.l7.config import L7Config
    from lb.l7.server import L7Server

    listener = http_listener(fixed(), tls=certs.listener_tls("www.example.com"))

    async def resumed(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession, n: int) -> list[bool]:
        # A new connection (a new source port) each time: SO_REUSEPORT spreads them over both workers.
        return [(await asyncio.to_thread(tls_request, port, ctx, "www.example.com", session)).reused
                for _ in range(n)]

    async def body() -> None:
        server = L7Server(L7Config(workers=2))
        await server.start(routing_table(listener))
        try:
            port = server.addresses["web"][1]
            for version in (V.TLSv1_2, V.TLSv1_3):
                ctx = certs.client(version)
                first = await asyncio.to_thread(tls_request, port, ctx)
                assert first.session is not None
                assert all(await resumed(port, ctx, first.session, 12)), version
            stats = await server.stats()
            assert min(sum(r[4] for r in s["requests"]) for s in stats) > 0  # both workers answered
            ctx = certs.client(V.TLSv1_2)
            first = await asyncio.to_thread(tls_request, port, ctx)
            server.rotate_ticket_key()
            await asyncio.sleep(0.3)  # the workers take the new key
            assert not any(await resumed(port, ctx, first.session, 6))  # type: ignore[arg-type]
        finally:
            await server.stop(grace=1.0)

    run(body(), timeout=60)


def test_certificate_expiry_metric_and_rows(certs: Certs) -> None:
    from lb import metrics

    listener_tls = certs.listener_tls("www.example.com", others=(("api.example.com", "*.api.example.com"),))
    lb = m.LoadBalancer(name="t", listeners=(http_listener(fixed(), tls=listener_tls),))
    rows = tls.certificate_rows(lb)
    assert [(r["names"], r["default"]) for r in rows] == [
        (["www.example.com"], True), (["api.example.com", "*.api.example.com"], False)]
    collector = metrics.Collector(lambda: lb)
    (family,) = [f for f in collector.collect() if f.name == "lb_certificate_expiry_seconds"]
    samples = {s.labels["names"]: s for s in family.samples}
    assert samples["www.example.com"].value == listener_tls.default_certificate.not_after
    assert samples["api.example.com,*.api.example.com"].labels["default"] == "false"
    assert samples["www.example.com"].labels["certificate"] == listener_tls.default_certificate.certificate_file
