"""`lb up` with an HTTPS listener on the lab: `lb reload` renews its certificate
while a TLS connection stays open, refuses a bad file by name and keeps
serving the old one; `lb status` shows what is served."""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest

from lb import admin
from lb import lab as labmod
from lb.lab import Lab
from tests import labclient
from tests.daemon_fixture import RunningDaemon, lab_config
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
