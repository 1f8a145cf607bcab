"""`lb up` with an HTTPS listener on the lab: HTTP/2 to clients and TLS to the targets;
`lb reload` renews its certificate
while a TLS connection stays open, refuses a bad file by name and keeps
serving the old one; `lb status` shows what is served."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from lb import admin
from lb import lab as labmod
from lb.lab import Lab
from tests import labclient
from tests.daemon_fixture import CHECKS, RunningDaemon, lab_config, target_list
from tests.names import name
from tests.tls_certs import Certs

pytestmark = pytest.mark.root
NAME = name("tls")


def https_section(cert: Path, key: Path) -> str:
    return f"""
[[listeners]]
name = "secure"
protocol = "HTTPS"
address = "{labmod.VIP}"
default_action = {{ type = "forward", target_group = "web" }}
default_certificate = {{ certificate = "{cert}", key = "{key}" }}
"""


def connect(lab: Lab, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    sock = labclient.tcp_connect(lab.client_ns, labmod.VIP, 443, timeout=5)
    return ctx.wrap_socket(sock, server_hostname="www.example.com")


def get(conn: ssl.SSLSocket) -> bytes:
    conn.sendall(b"GET / HTTP/1.1\r\nHost: www.example.com\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return head


def serial(conn: ssl.SSLSocket) -> int:
    cert = conn.getpeercert() or {}
    return int(str(cert["serialNumber"]), 16)


def test_reload_renews_the_certificate_keeps_connections_and_refuses_a_bad_file(lab: Lab, tmp_path: Path) -> None:
    certs = Certs(tmp_path)
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"

    def install(files: tuple[Path, Path]) -> None:  # as certbot's renewal does: the same paths, new contents
        shutil.copyfile(files[0], live_cert)
        shutil.copyfile(files[1], live_key)

    install(certs.files("www.example.com"))
    daemon = RunningDaemon(lab, NAME, lab_config(lab, NAME, http=True) + https_section(live_cert, live_key))
    ctx = certs.client()
    try:
        daemon.start()
        for backend in lab.backends:
            daemon.wait_for("web", backend.address, "healthy", timeout=12)
        kept = connect(lab, ctx)
        try:
            assert get(kept).startswith(b"HTTP/1.1 200 ")
            first = serial(kept)
            (row,) = daemon.request("status")["certificates"]
            assert row["names"] == ["www.example.com"] and row["listener"] == "secure" and row["default"]

            install(certs.files("www.example.com"))  # renewed
            daemon.request("reload")
            with connect(lab, ctx) as fresh:
                renewed = serial(fresh)
                assert renewed != first and get(fresh).startswith(b"HTTP/1.1 200 ")
            assert get(kept).startswith(b"HTTP/1.1 200 ") and serial(kept) == first  # the old one goes on
            (row_after,) = daemon.request("status")["certificates"]
            assert row_after["not_after"] >= row["not_after"]

            live_key.write_text("not a key\n")  # a broken renewal: refused by name, nothing changes
            with pytest.raises(admin.AdminError, match=rf"(?s)reload rejected.*{live_key}: no PEM private key"):
                daemon.request("reload")
            with connect(lab, ctx) as fresh:
                assert serial(fresh) == renewed
            assert get(kept).startswith(b"HTTP/1.1 200 ")
        finally:
            kept.close()
    finally:
        install(certs.files("www.example.com"))  # else `lb down -c` refuses the config and leaves the pins
        daemon.cleanup()


def test_http2_to_clients_and_tls_to_targets_through_the_daemon(lab: Lab, tmp_path: Path) -> None:
    """An HTTPS listener (HTTP/2 by ALPN) forwarding to an HTTPS target group:
    the lab's targets serve TLS on 443, checked by HTTPS health checks. A
    second group verifies the targets' certificates against a CA bundle that
    did not sign them: `lb targets` says why they fail, and its requests are
    502 (TargetSSLHandshakeError)."""
    certs = Certs(tmp_path)
    cert, key = certs.files("www.example.com")
    bundle = tmp_path / "ca.pem"
    certs.ca.cert_pem.write_to_path(str(bundle))
    config = lab_config(lab, NAME, echo_targets=1) + f"""
[[listeners]]
name = "secure"
protocol = "HTTPS"
address = "{labmod.VIP}"
default_action = {{ type = "forward", target_group = "tls-web" }}
default_certificate = {{ certificate = "{cert}", key = "{key}" }}

  [[listeners.rules]]
  priority = 1
  conditions = [{{ field = "path-pattern", values = ["/verified"] }}]
  actions = [{{ type = "forward", target_group = "tls-verified" }}]

[[target_groups]]
name = "tls-verified"
protocol = "HTTPS"
port = {labmod.HTTPS_PORT}
ca_bundle = "{bundle}"
targets = {target_list(lab.backends[:1])}
health_check = {{ {CHECKS} }}

[[target_groups]]
name = "tls-web"
protocol = "HTTPS"
port = {labmod.HTTPS_PORT}
targets = {target_list(lab.backends)}
health_check = {{ {CHECKS} }}
"""
    daemon = RunningDaemon(lab, NAME, config)
    try:
        daemon.start()
        for backend in lab.backends:
            daemon.wait_for("tls-web", backend.address, "healthy", timeout=12)
        seen = set()
        for flag, version in (("--http2", "2"), ("--http1.1", "1.1")):
            for _ in range(3):
                out = subprocess.run(
                    ["ip", "netns", "exec", lab.client_ns, "curl", "-sSk", flag, "-w", " %{http_version} %{http_code}",
                     f"https://{labmod.VIP}/"], capture_output=True, timeout=10, check=True).stdout.decode()
                body, got_version, status = out.rsplit(" ", 2)
                assert (got_version, status) == (version, "200"), out
                seen.add(body.strip())
        assert seen <= {b.name for b in lab.backends} and len(seen) >= 2, seen
        address = lab.backends[0].address
        daemon.wait_for("tls-verified", address, "unhealthy", timeout=20)
        row = daemon.targets("tls-verified")[address]
        assert row["description"] == "TLS: certificate verify failed: self-signed certificate", row
        out = subprocess.run(["ip", "netns", "exec", lab.client_ns, "curl", "-sSk", "--http2", "-o", "/dev/null",
                              "-w", "%{http_code}", f"https://{labmod.VIP}/verified"],
                             capture_output=True, timeout=10, check=True).stdout
        assert out == b"502"  # fail-open sends it to its one target anyway, whose TLS is refused
    finally:
        daemon.cleanup()
